"""The HTTP API of serve.py: a real uvicorn server on 127.0.0.1, the official ``openai``
client, raw HTTP for every error case, concurrent clients, disconnects, shutdown.

Two servers: ``trained`` serves a tiny run trained by the test (loaded the way serve.py
loads it); ``scripted`` serves a hand-weighted model whose reply is known (see
tests/serve_support.py) and requires an API key.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from src.infer.engine import Engine
from src.serve.app import create_app
from src.serve.loading import load_served_model
from src.serve.server import ServeOptions, serve
from src.tokenizer.chat_template import Turn, encode_chat
from src.utils.cli import UserError
from tests.fixtures import make_tiny_run
from tests.serve_support import (
    LOOP,
    running_server,
    scripted_model,
    scripted_text,
    scripted_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "test-key"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def trained(run_dir):
    model, tokenizer, info = load_served_model(str(run_dir), device="cpu")
    engine = Engine(model, tokenizer, max_batch=8, max_queue=4)
    with running_server(create_app(engine, "tiny", max_body_bytes=100_000), engine) as server:
        server.tokenizer = tokenizer
        yield server


@pytest.fixture(scope="module")
def scripted():
    tokenizer = scripted_tokenizer()
    engine = Engine(scripted_model(tokenizer), tokenizer, max_batch=4, max_queue=2)
    with running_server(create_app(engine, "scripted", api_key=KEY), engine) as server:
        server.engine = engine
        yield server


def client(server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0)


def post(server, path: str, body, *, key: str | None = KEY, raw: bytes | None = None):
    """(status, parsed JSON) of a POST with urllib."""
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(server.base_url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(server, path: str, key: str | None = KEY):
    request = urllib.request.Request(server.base_url + path,
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def stream_raw(server, body: dict) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", int(server.base_url.rsplit(":", 1)[1]),
                                      timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    return conn.getresponse()


# --- the openai client ----------------------------------------------------------------------


def test_models_and_health(trained):
    models = client(trained).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert get(trained, "/health", key=None) == (
        200, {"status": "ok", "model": "tiny", "active": 0, "waiting": 0})
    assert get(trained, "/v1/models/tiny")[1]["max_model_len"] == 64


def test_chat_completion_with_the_openai_client(trained):
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    reply = client(trained).chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, seed=3, temperature=0.7)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.model == "tiny" and abs(reply.created - time.time()) < 60
    [choice] = reply.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    tok = trained.tokenizer
    prompt = [tok.eot_id, *encode_chat(tok, [Turn("system", "Be kind."), Turn("user", "Hi")],
                                       add_generation_prompt=True, end=False)[0]]
    assert reply.usage.prompt_tokens == len(prompt)
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == len(prompt) + reply.usage.completion_tokens
    again = client(trained).chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, seed=3, temperature=0.7)
    assert again.choices[0].message.content == choice.message.content  # same seed, same text


def test_streamed_chat_is_openai_chunks_with_role_usage_and_whole_characters(scripted):
    stream = client(scripted).chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "Hi"}], max_tokens=20,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    pieces = [c.choices[0].delta.content for c in chunks[1:] if c.choices
              and c.choices[0].delta.content]
    assert "".join(pieces) == scripted_text(20)
    assert "\U0001f642" in pieces  # the emoji's four byte tokens arrive as one character
    assert not any("\ufffd" in p for p in pieces)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_strings_cut_the_text_and_never_stream_a_part_of_them(scripted):
    chat = client(scripted).chat.completions
    messages = [{"role": "user", "content": "Hi"}]
    reply = chat.create(model="scripted", messages=messages, max_tokens=40,
                        stop=["zzz", "title='pw"])
    assert reply.choices[0].message.content == "<script>document."
    assert reply.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].delta.content or "" for c in chat.create(
        model="scripted", messages=messages, max_tokens=40, stop="'</", stream=True)]
    assert "".join(pieces) == "<script>document.title='pwned"  # no part of "'</" leaked


def test_completions_with_n_choices_streamed_and_not(trained):
    completions = client(trained).completions
    reply = completions.create(model="tiny", prompt="The cat", max_tokens=6, n=2, seed=5)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].text != reply.choices[1].text  # seeds 5 and 6
    texts = {0: "", 1: ""}
    for chunk in completions.create(model="tiny", prompt="The cat", max_tokens=6, n=2,
                                    seed=5, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert [texts[0], texts[1]] == [c.text for c in reply.choices]


def test_frequency_and_presence_penalties_are_applied(scripted):
    """The scripted reply ends in " la" repeated, at a logit of 10 * sqrt(48) = 69.3 (the
    others 0). OpenAI's penalties lower it by 2 * count + 2 after the first: the 35th " la"
    would score 69.3 - 68 - 2 < 0, so exactly 34 come out."""
    chat = client(scripted).chat.completions
    messages = [{"role": "user", "content": "Hi"}]
    plain = chat.create(model="scripted", messages=messages, max_tokens=60, temperature=0)
    tired = chat.create(model="scripted", messages=messages, max_tokens=60, temperature=0,
                        frequency_penalty=2.0, presence_penalty=2.0)
    assert plain.choices[0].message.content == scripted_text(60)
    assert plain.choices[0].message.content.count(LOOP) == 42
    assert tired.choices[0].message.content.count(LOOP) == 34


# --- errors ---------------------------------------------------------------------------------

BAD_CHAT = [  # (body, param) -> 400
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]},
     "messages[1].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"n": 9}, "n"),
    ({"seed": "x"}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": "lots"}, "frequency_penalty"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"max_tokens": 60, "messages": [{"role": "user", "content": "hello " * 10}]},
     "max_tokens"),
]


def assert_error(status_body, status: int, param=None, code=None) -> dict:
    got_status, body = status_body
    assert got_status == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def test_bad_requests_get_400_and_openai_errors_and_the_server_keeps_serving(trained):
    good = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for change, param in BAD_CHAT:
        assert_error(post(trained, "/v1/chat/completions", {**good, **change}), 400, param)
    assert_error(post(trained, "/v1/chat/completions", None, raw=b'{"messages": ['), 400,
                 code="invalid_json")
    assert_error(post(trained, "/v1/chat/completions", [1, 2]), 400)
    assert_error(post(trained, "/v1/completions", {"prompt": [1, 2, 3]}), 400, "prompt")
    assert_error(post(trained, "/v1/completions", {"prompt": "x", "echo": True}), 400, "echo")
    status, body = post(trained, "/v1/chat/completions", good)
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"


def test_a_prompt_longer_than_the_context_says_the_numbers(trained):
    long = {"messages": [{"role": "user", "content": "the cat " * 80}]}
    error = assert_error(post(trained, "/v1/chat/completions", long), 400, "messages",
                         "context_length_exceeded")
    assert "maximum context length is 64 tokens" in error["message"]
    error = assert_error(post(trained, "/v1/completions", {"prompt": "a", "max_tokens": 70}),
                         400, "max_tokens", "context_length_exceeded")
    assert "72 tokens (2 in the prompt, 70 in the completion)" in error["message"]


def test_unknown_model_path_and_too_large_body(trained):
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": "Hi"}]}
    assert_error(post(trained, "/v1/chat/completions", body), 404, "model", "model_not_found")
    with pytest.raises(openai.NotFoundError):
        client(trained).chat.completions.create(model="gpt-4", messages=body["messages"])
    assert_error(get(trained, "/v1/nothing"), 404)
    assert_error(get(trained, "/v1/chat/completions"), 404)  # GET on a POST route
    assert_error(get(trained, "/v1/models/gpt-4"), 404, "model", "model_not_found")
    huge = {"messages": [{"role": "user", "content": "x" * 200_000}]}
    assert_error(post(trained, "/v1/chat/completions", huge), 413, code="request_too_large")
    assert get(trained, "/health", key=None)[0] == 200


def test_api_key_is_required_when_set(scripted):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert_error(post(scripted, "/v1/chat/completions", body, key=None), 401,
                 code="missing_api_key")
    assert_error(post(scripted, "/v1/chat/completions", body, key="wrong"), 401,
                 code="invalid_api_key")
    assert_error(get(scripted, "/v1/models", key=None), 401)
    with pytest.raises(openai.AuthenticationError):
        client(scripted, key="wrong").models.list()
    assert get(scripted, "/health", key=None)[0] == 200  # readiness needs no key
    assert post(scripted, "/v1/chat/completions", body)[0] == 200


def test_full_queue_is_503_and_bad_requests_never_disturb_running_ones(scripted):
    """4 long replies fill the slots, 2 more wait; the 7th request is refused (503). While
    they run, bad requests of every kind are refused; every reply still comes out whole."""
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 800}
    with ThreadPoolExecutor(6) as pool:
        replies = [pool.submit(post, scripted, "/v1/chat/completions", body) for _ in range(6)]
        deadline = time.monotonic() + 20
        while get(scripted, "/health", key=None)[1]["waiting"] < 2:
            assert time.monotonic() < deadline, "the requests never queued up"
            time.sleep(0.005)
        error = assert_error(post(scripted, "/v1/chat/completions", body), 503,
                             code="server_overloaded")
        assert error["type"] == "server_error"
        for change, _ in BAD_CHAT[:8]:
            assert post(scripted, "/v1/chat/completions", {**body, **change})[0] == 400
        assert post(scripted, "/v1/chat/completions", None, raw=b"{")[0] == 400
        results = [r.result(timeout=60) for r in replies]
    for status, reply in results:
        assert status == 200
        assert reply["choices"][0]["message"]["content"] == scripted_text(800)
        assert reply["choices"][0]["finish_reason"] == "length"


def test_concurrent_streaming_clients_each_get_their_reply(scripted):
    def chat(max_tokens: int) -> str:
        stream = client(scripted).chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "Hi"}],
            max_tokens=max_tokens, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream)

    lengths = [5, 40, 17, 60, 9, 33]
    with ThreadPoolExecutor(len(lengths)) as pool:
        texts = list(pool.map(chat, lengths))
    assert texts == [scripted_text(n) for n in lengths]


def test_a_client_that_disconnects_frees_its_slot(scripted):
    response = stream_raw(scripted, {"messages": [{"role": "user", "content": "Hi"}],
                                     "max_tokens": 1900, "stream": True})
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # streaming has begun
    assert get(scripted, "/health", key=None)[1]["active"] == 1
    response.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 5
    while get(scripted, "/health", key=None)[1]["active"]:
        assert time.monotonic() < deadline, "the disconnected request kept its slot"
        time.sleep(0.01)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    assert post(scripted, "/v1/chat/completions", body)[1]["choices"][0]["message"][
        "content"] == scripted_text(3)


def test_stopping_the_server_ends_streams_with_a_final_chunk():
    """Ctrl-C / SIGTERM (the server's handle_exit): a stream in flight ends with a last
    chunk and [DONE], and the server thread exits."""
    tokenizer = scripted_tokenizer()
    engine = Engine(scripted_model(tokenizer), tokenizer, max_batch=2)
    with running_server(create_app(engine, "scripted", api_key=KEY), engine) as server:
        response = stream_raw(server, {"messages": [{"role": "user", "content": "Hi"}],
                                       "max_tokens": 2000, "stream": True})
        response.readline()
        threading.Timer(0.05, server.handle_exit, (signal.SIGINT, None)).start()
        lines = [line for line in response.read().decode().splitlines() if line]
        assert lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2][len("data: "):])
        assert last["choices"][0]["finish_reason"] == "stop"
        assert len(lines) < 1990  # it did not run to the end
    assert engine.stopping


def test_serve_py_prints_the_addresses_warns_without_a_key_and_stops_on_sigterm(run_dir):
    env = {**os.environ, "GPT_API_KEY": ""}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "serve.py"), "--run", str(run_dir), "--host", "0.0.0.0",
         "--port", "0", "--device", "cpu"], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines = []
        while not (lines and lines[-1].startswith("API base:")):
            line = proc.stdout.readline()
            assert line, f"serve.py exited: {proc.stderr.read()}"
            lines.append(line)
        port = int(lines[-2].split(":")[-1].strip(" /\n"))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert json.loads(r.read())["status"] == "ok"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert "Stopped." in proc.stdout.read()
        assert "without an API key" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("options, message", [
    (ServeOptions(port=70000), "--port 70000"),
    (ServeOptions(max_batch=0), "--max-batch 0"),
    (ServeOptions(threads=0), "--threads 0"),
    (ServeOptions(run="/nonexistent/run", device="cpu"), "/nonexistent/run"),
])
def test_bad_serve_options_are_one_line_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        serve(options)
