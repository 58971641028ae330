"""The web chat page of serve.py in a real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium), against a real server with the scripted model of
tests/serve_support.py, whose reply is known and contains HTML that must not run."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from src.infer.engine import Engine
from src.serve.app import create_app
from tests.serve_support import (
    running_server,
    scripted_model,
    scripted_text,
    scripted_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# The README's screenshot is (re)made with SERVE_SCREENSHOT=docs/serve-chat.png.
SCREENSHOT_ENV = "SERVE_SCREENSHOT"

# Record every request body the page sends, to check what it asks the server for.
RECORD_FETCH = """
window.__sent = [];
const original = window.fetch;
window.fetch = (url, init) => {
  if (init && init.body) window.__sent.push(JSON.parse(init.body));
  return original(url, init);
};
"""


@pytest.fixture(scope="module")
def server():
    tokenizer = scripted_tokenizer()
    engine = Engine(scripted_model(tokenizer), tokenizer, max_batch=4)
    with running_server(create_app(engine, "scripted"), engine) as running:
        yield running


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium and chromium-driver for the page's tests")
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1000,720",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(20)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, server):
    browser.get(server.base_url + "/")
    wait_for(lambda: browser.find_element("id", "model-name").text == "scripted")
    browser.execute_script(RECORD_FETCH)
    return browser


def wait_for(condition, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out waiting in the page"
        time.sleep(0.02)


def by_id(driver, element_id: str):
    return driver.find_element("id", element_id)


def set_setting(driver, element_id: str, value: str) -> None:
    if not by_id(driver, "settings").is_displayed():
        by_id(driver, "settings-toggle").click()
    field = by_id(driver, element_id)
    field.clear()
    if value:
        field.send_keys(value)


def send(driver, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = by_id(driver, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def replies(driver):
    return driver.find_elements("css selector", "#messages .message.assistant")


def finished(driver, index: int, state: str = "done"):
    items = replies(driver)
    return len(items) > index and items[index].get_attribute("data-state") == state


def health(server) -> dict:
    with urllib.request.urlopen(server.base_url + "/health", timeout=10) as response:
        return json.loads(response.read())


def test_send_with_enter_streams_the_reply_as_text_never_as_html(page):
    set_setting(page, "max-tokens", "40")
    # Count the reply's updates in the page: a streamed reply grows in several steps.
    page.execute_script("""
        window.__updates = 0;
        new MutationObserver(() => window.__updates++).observe(
            document.getElementById('messages'),
            {subtree: true, childList: true, characterData: true});""")
    typed = '<img src=x onerror="window.__xss=1">hello'
    send(page, typed)
    wait_for(lambda: finished(page, 0))
    [user] = page.find_elements("css selector", "#messages .message.user")
    assert user.text == typed
    [reply] = replies(page)
    assert reply.get_attribute("textContent") == scripted_text(40)
    assert reply.get_attribute("textContent").startswith("<script>document.title='pwned'")
    assert page.execute_script("return window.__updates") > 5
    # Neither the user's HTML nor the model's <script> became elements, and none ran.
    assert page.find_elements("css selector", "#messages script, #messages img") == []
    assert page.title == "gpt-model chat"
    assert page.execute_script("return window.__xss") is None
    [sent] = page.execute_script("return window.__sent")
    assert sent["stream"] is True and sent["model"] == "scripted" and sent["max_tokens"] == 40
    assert sent["messages"] == [{"role": "user", "content": typed}]


def test_stop_ends_a_long_reply_and_the_history_keeps_it(page, server):
    set_setting(page, "max-tokens", "1900")
    set_setting(page, "system-prompt", "Be brief.")
    send(page, "Tell me a long story")
    wait_for(lambda: len(replies(page)) == 1 and len(replies(page)[0].text) > 10)
    by_id(page, "stop").click()
    wait_for(lambda: finished(page, 0, "stopped"))
    text = replies(page)[0].get_attribute("textContent")
    time.sleep(0.3)
    assert replies(page)[0].get_attribute("textContent") == text  # no longer growing
    assert len(text) < len(scripted_text(1900))
    wait_for(lambda: health(server)["active"] == 0, timeout=5)  # the server freed the slot
    assert by_id(page, "send").is_displayed() and not by_id(page, "stop").is_displayed()

    set_setting(page, "max-tokens", "5")
    send(page, "And then?")
    wait_for(lambda: finished(page, 1))
    second = page.execute_script("return window.__sent")[1]
    assert second["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me a long story"},
        {"role": "assistant", "content": text},
        {"role": "user", "content": "And then?"},
    ]
    by_id(page, "new-chat").click()
    assert page.find_elements("css selector", "#messages .message") == []


def test_a_refused_request_shows_the_servers_error(page):
    set_setting(page, "system-prompt", "")
    set_setting(page, "max-tokens", "5000")  # more than the context of 2048
    send(page, "Hello")
    error = wait_for(lambda: by_id(page, "error").is_displayed() and by_id(page, "error"))
    assert "maximum context length is 2048 tokens" in error.text
    assert page.find_elements("css selector", "#messages .message") == []
    assert by_id(page, "input").get_attribute("value") == "Hello"  # to edit and resend
    set_setting(page, "max-tokens", "12")
    by_id(page, "send").click()
    wait_for(lambda: finished(page, 0))
    assert not by_id(page, "error").is_displayed()


def test_screenshot_for_the_readme(page, tmp_path):
    set_setting(page, "system-prompt", "You are a helpful assistant.")
    set_setting(page, "max-tokens", "24")
    send(page, "Hi! Can you show me some HTML?")
    wait_for(lambda: finished(page, 0))
    send(page, "Thanks. Again, shorter?")
    wait_for(lambda: finished(page, 1))
    path = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "serve-chat.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    assert page.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
