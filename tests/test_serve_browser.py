"""The web chat page of serve.py in a real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium), against a real server with the scripted model of
tests/serve_support.py, whose reply is known and contains HTML that must not run."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from src.infer.engine import Engine
from src.infer.internals import attention_maps
from src.serve.app import create_app
from tests.serve_support import (
    SCRIPT_REPLY,
    running_server,
    scripted_model,
    scripted_text,
    scripted_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# The README's screenshots are (re)made with SERVE_SCREENSHOT=docs/serve-chat.png,
# SERVE_PROBABILITIES_SCREENSHOT=docs/serve-probabilities.png and
# SERVE_INSPECT_SCREENSHOT=docs/serve-inspect.png.
SCREENSHOT_ENV = "SERVE_SCREENSHOT"
PROBABILITIES_SCREENSHOT_ENV = "SERVE_PROBABILITIES_SCREENSHOT"
INSPECT_SCREENSHOT_ENV = "SERVE_INSPECT_SCREENSHOT"

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


# --- token probabilities ------------------------------------------------------------------


@pytest.fixture(scope="module")
def unsure_server():
    """The scripted model made less sure of itself: each chain token's logit is scaled by its
    own factor, so greedy decoding says the same reply with probabilities from about 30% to
    95% (the other ~300 tokens share the rest). Its queries are scaled up too (see below)."""
    tokenizer = scripted_tokenizer()
    model = scripted_model(tokenizer)
    with torch.no_grad():
        for token in range(model.lm_head.weight.size(0)):
            model.lm_head.weight[token] *= 0.075 + 0.055 * ((token * 37) % 11) / 10
        # Sharper attention, so the Inspect view's heads differ visibly; the replies do not
        # change (every attention output projection is zero).
        for block in model.blocks:
            block.attn.q_proj.weight *= 40
    engine = Engine(model, tokenizer, max_batch=2)
    with running_server(create_app(engine, "scripted"), engine) as running:
        running.model, running.tokenizer = model, tokenizer
        yield running


def label(token: str) -> str:
    """A token as the page labels it (chat.js tokenLabel)."""
    return token.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5")


def percent(logprob: float) -> str:
    """A probability as the page shows it (chat.js percent)."""
    p = 100 * math.exp(logprob)
    return "<0.1%" if p < 0.1 else f"{p:.1f}%"


def test_hovering_a_token_shows_its_alternatives_and_the_toggle_colours_the_reply(
        browser, unsure_server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    page = browser
    page.get(unsure_server.base_url + "/")
    wait_for(lambda: by_id(page, "model-name").text == "scripted")
    page.execute_script(RECORD_FETCH)
    set_setting(page, "temperature", "0")
    set_setting(page, "max-tokens", "20")
    by_id(page, "settings-toggle").click()
    send(page, "Hi")
    wait_for(lambda: finished(page, 0))
    [sent] = page.execute_script("return window.__sent")
    assert sent["logprobs"] is True and sent["top_logprobs"] == 5

    # The same request through the API: what each piece of the reply must show.
    body = {key: sent[key] for key in ("messages", "logprobs", "top_logprobs", "max_tokens")}
    request = urllib.request.Request(
        unsure_server.base_url + "/v1/chat/completions", headers={"Content-Type":
        "application/json"}, data=json.dumps({**body, "temperature": 0}).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        entries = json.loads(response.read())["choices"][0]["logprobs"]["content"]

    [reply] = replies(page)
    spans = reply.find_elements("css selector", ".token")
    texts = [s.get_attribute("textContent") for s in spans]
    assert "".join(texts) == scripted_text(20)
    assert len(spans) == 17 and texts.index("\U0001f642") == 14  # 4 byte tokens, one piece
    assert reply.find_elements("css selector", "script") == []  # still text, never HTML

    info = by_id(page, "token-info")
    assert not info.is_displayed()
    ActionChains(page).move_to_element(spans[1]).perform()
    wait_for(info.is_displayed)
    entry = entries[1]
    [title] = info.find_elements("css selector", ".token-title")
    assert title.text.split() == [label(entry["token"]), percent(entry["logprob"])]
    rows = info.find_elements("css selector", ".alt")
    assert [r.find_element("css selector", ".alt-token").text for r in rows] == [
        label(alt["token"]) for alt in entry["top_logprobs"]]
    assert [r.find_element("css selector", ".alt-p").text for r in rows] == [
        percent(alt["logprob"]) for alt in entry["top_logprobs"]]
    assert "chosen" in rows[0].get_attribute("class")  # greedy: the likeliest
    assert 0.25 < math.exp(entry["logprob"]) < 0.97  # the model is unsure, as built

    ActionChains(page).move_to_element(spans[14]).perform()  # the emoji: its four tokens
    wait_for(lambda: len(info.find_elements("css selector", ".token-title")) == 4)
    titles = [t.text for t in info.find_elements("css selector", ".token-title")]
    assert [t.split()[0] for t in titles] == [e["token"] for e in entries[14:18]]

    def colours() -> list[str]:
        return [s.value_of_css_property("background-color") for s in spans]

    assert set(colours()) == {"rgba(0, 0, 0, 0)"}
    by_id(page, "probabilities").click()
    assert by_id(page, "probabilities").get_attribute("aria-pressed") == "true"
    assert len(set(colours())) >= 4  # one colour per probability
    sure = max(range(14), key=lambda i: entries[i]["logprob"])  # pieces of one token each
    red, green, _ = (int(c) for c in colours()[sure][5:-1].split(",")[:3])
    assert green > red  # likely tokens are green

    send(page, "And again?")
    wait_for(lambda: finished(page, 1))
    ActionChains(page).move_to_element(
        replies(page)[1].find_elements("css selector", ".token")[3]).perform()
    wait_for(info.is_displayed)
    path = Path(os.environ.get(PROBABILITIES_SCREENSHOT_ENV) or tmp_path / "probabilities.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    assert page.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    by_id(page, "probabilities").click()
    assert set(colours()) == {"rgba(0, 0, 0, 0)"}


# --- the Inspect view ---------------------------------------------------------------------


def test_inspect_view_shows_tokens_attention_map_and_next_tokens(browser, unsure_server,
                                                                 tmp_path):
    page = browser
    page.get(unsure_server.base_url + "/")
    wait_for(lambda: by_id(page, "model-name").text == "scripted")
    page.execute_script(RECORD_FETCH)
    set_setting(page, "max-tokens", "3")
    by_id(page, "settings-toggle").click()
    send(page, "Hi")
    wait_for(lambda: finished(page, 0))
    by_id(page, "inspect-toggle").click()
    assert by_id(page, "inspect").is_displayed() and not by_id(page, "input").is_displayed()
    # "Use the chat": the conversation so far, as the chat sends it.
    by_id(page, "inspect-chat").click()
    wait_for(lambda: len(page.execute_script("return window.__sent")) == 2)
    chat, inspected = page.execute_script("return window.__sent")
    reply = replies(page)[0].get_attribute("textContent")
    assert inspected == {"model": "scripted", "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}]}
    wait_for(lambda: page.find_elements("css selector", "#inspect-tokens .itoken"))
    chat_maps = attention_maps(unsure_server.model, unsure_server.tokenizer,
                               messages=inspected["messages"])
    assert [c.get_attribute("textContent") for c in page.find_elements(
        "css selector", "#inspect-tokens .itoken")] == [label(t["text"]) for t in chat_maps.tokens]

    text = SCRIPT_REPLY + " la la la"
    # The expected maps first: the server's engine thread runs the same model object, and the
    # recording switch is not for two threads at once (the server serialises its own calls).
    maps = attention_maps(unsure_server.model, unsure_server.tokenizer, text=text, decimals=4)
    by_id(page, "inspect-text").send_keys(text)
    by_id(page, "inspect-run").click()

    # The tokens as the API gives them (the emoji as four \xNN byte tokens), as text.
    wait_for(lambda: len(page.find_elements("css selector", "#inspect-tokens .itoken"))
             == len(maps.tokens))
    chips = page.find_elements("css selector", "#inspect-tokens .itoken")
    assert [c.get_attribute("textContent") for c in chips] == [
        label(t["text"]) for t in maps.tokens]
    assert "\\xf0" in chips[[t["bytes"] for t in maps.tokens].index([0xF0])].text
    assert page.find_elements("css selector", "#inspect script") == []  # never HTML
    bars = page.find_elements("css selector", "#next-tokens .alt")
    assert [b.find_element("css selector", ".alt-token").text for b in bars] == [
        label(t["text"]) for t in maps.next_tokens]
    assert [b.find_element("css selector", ".alt-p").text for b in bars] == [
        percent(t["logprob"]) for t in maps.next_tokens]

    config = unsure_server.model.config
    layer, head = by_id(page, "inspect-layer"), by_id(page, "inspect-head")
    assert len(layer.find_elements("tag name", "option")) == config.n_layer
    assert len(head.find_elements("tag name", "option")) == config.n_head + 1  # and the mean
    canvas = by_id(page, "attention-map")
    assert (canvas.get_attribute("data-layer"), canvas.get_attribute("data-head")) == (
        "0", "mean")
    assert canvas.get_attribute("data-query") == str(len(maps.tokens) - 1)

    def pixels() -> str:
        return page.execute_script("return arguments[0].toDataURL()", canvas)

    def select(element, value: str) -> None:
        from selenium.webdriver.support.select import Select
        Select(element).select_by_value(value)

    mean_map = pixels()
    select(head, "1")
    head_map = pixels()
    assert canvas.get_attribute("data-head") == "1" and head_map != mean_map
    select(layer, "1")
    assert canvas.get_attribute("data-layer") == "1" and pixels() != head_map

    # Clicking a token makes it the query: the chips show the weights of its row.
    query = 5
    chips[query].click()
    assert canvas.get_attribute("data-query") == str(query)
    assert "query" in chips[query].get_attribute("class")
    row = maps.attention[1][1][query]
    assert chips[2].get_attribute("title") == f"key 2: weight {row[2]:.4f}"
    assert chips[query + 1].get_attribute("title").endswith("0 (future)")
    # Clicking a row of the map chooses that query too.
    from selenium.webdriver.common.action_chains import ActionChains
    size = canvas.size["height"]
    cell = size / len(maps.tokens)
    ActionChains(page).move_to_element_with_offset(
        canvas, 0, int(2.5 * cell - size / 2)).click().perform()
    assert canvas.get_attribute("data-query") == "2"

    # A refused text shows the server's error; the view keeps working afterwards.
    by_id(page, "inspect-text").clear()
    by_id(page, "inspect-text").send_keys("la " * 300)
    by_id(page, "inspect-run").click()
    wait_for(lambda: by_id(page, "error").is_displayed())
    assert "at most 256" in by_id(page, "error").text

    by_id(page, "inspect-text").clear()
    by_id(page, "inspect-text").send_keys(text)
    by_id(page, "inspect-run").click()
    wait_for(lambda: not by_id(page, "error").is_displayed())
    page.find_elements("css selector", "#inspect-tokens .itoken")[query].click()
    path = Path(os.environ.get(INSPECT_SCREENSHOT_ENV) or tmp_path / "inspect.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    assert page.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    by_id(page, "inspect-toggle").click()
    assert by_id(page, "input").is_displayed() and not by_id(page, "inspect").is_displayed()
