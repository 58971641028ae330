"""``POST /v1/internals/attention`` (issue 21): raw HTTP to a real server serving a tiny
trained run, its answers checked against ``attention_maps`` called here on the same model,
every error case answered with OpenAI's error JSON, and the server serving on afterwards
(also while it is generating a chat reply at the same time).
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from src.infer.engine import Engine
from src.infer.internals import attention_maps
from src.serve.app import MAX_PENDING_INSPECTIONS, create_app
from src.serve.loading import load_served_model
from tests.fixtures import make_tiny_run
from tests.serve_support import running_server
from tests.test_serve_api import KEY, assert_error, client, post

pytestmark = pytest.mark.usefixtures("one_thread")
PATH = "/v1/internals/attention"
TEXT = "The cat sat on the mat. \U0001f642"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir: Path = make_tiny_run(tmp_path_factory.mktemp("attention"))
    model, tokenizer, _ = load_served_model(str(run_dir), device="cpu")
    engine = Engine(model, tokenizer, max_batch=4)
    with running_server(create_app(engine, "tiny", api_key=KEY), engine) as server:
        server.model, server.tokenizer, server.engine = model, tokenizer, engine
        yield server


def inspect(server, body: dict, key: str | None = KEY):
    return post(server, PATH, body, key=key)


def check_maps(maps: dict, layers: int, heads: int, decimals: int) -> None:
    """Shapes, causal rows summing to 1 within rounding, sorted next-token probabilities."""
    n = len(maps["tokens"])
    attention = maps["attention"]
    assert len(attention) == layers and all(len(layer) == heads for layer in attention)
    for layer in attention:
        for head in layer:
            assert len(head) == n
            for q, row in enumerate(head):
                assert len(row) == n
                assert all(w == 0 for w in row[q + 1:])  # never the future
                assert all(w >= 0 for w in row)
                assert math.isclose(sum(row), 1, abs_tol=n * 0.5 * 10 ** -decimals + 1e-9)
    probs = [t["prob"] for t in maps["next_tokens"]]
    assert len(probs) == 20 and sum(probs) <= 1 + 1e-9
    assert probs == sorted(probs, reverse=True)
    assert all(math.isclose(t["prob"], math.exp(t["logprob"])) for t in maps["next_tokens"])


def test_text_maps_equal_attention_maps_on_the_same_model(trained):
    status, body = inspect(trained, {"model": "tiny", "text": TEXT})
    assert status == 200, body
    assert body["object"] == "attention_maps" and body["model"] == "tiny"
    config = trained.model.config
    check_maps(body, config.n_layer, config.n_head, 4)
    direct = attention_maps(trained.model, trained.tokenizer, text=TEXT, decimals=4).to_dict()
    assert body["tokens"] == direct["tokens"]
    assert body["attention"] == direct["attention"]
    assert [t["id"] for t in body["next_tokens"]] == [t["id"] for t in direct["next_tokens"]]
    for got, want in zip(body["next_tokens"], direct["next_tokens"]):
        assert math.isclose(got["logprob"], want["logprob"], abs_tol=1e-6)
    # Byte-level pieces as they are: the emoji is split into byte tokens, shown as escapes.
    assert body["tokens"][0] == {**body["tokens"][0], "text": "<|endoftext|>", "special": True}
    assert bytes(b for t in body["tokens"][1:] for b in t["bytes"]).decode() == TEXT


def test_messages_and_decimals(trained):
    messages = [{"role": "user", "content": "Hi there"}]
    status, body = inspect(trained, {"messages": messages, "decimals": 2})
    assert status == 200, body
    config = trained.model.config
    check_maps(body, config.n_layer, config.n_head, 2)
    direct = attention_maps(trained.model, trained.tokenizer, messages=messages, decimals=2)
    assert body["tokens"] == direct.tokens and body["attention"] == direct.attention
    assert all(round(w, 2) == w for w in body["attention"][0][0][-1])


def test_inspecting_while_the_engine_generates(trained):
    """The maps run between two engine steps: a chat reply generated at the same time is
    unharmed and the maps equal those computed alone."""
    alone = inspect(trained, {"text": TEXT})[1]
    reply = {}

    def chat() -> None:
        reply["r"] = client(trained, KEY).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=40,
            temperature=0, seed=1)

    thread = threading.Thread(target=chat)
    thread.start()
    together = [inspect(trained, {"text": TEXT}) for _ in range(3)]
    thread.join(30)
    assert all(status == 200 and body["attention"] == alone["attention"]
               for status, body in together)
    again = client(trained, KEY).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=40,
        temperature=0, seed=1)
    assert reply["r"].choices[0].message.content == again.choices[0].message.content


@pytest.mark.parametrize("body, param, code, words", [
    ({"text": ""}, "text", "invalid_value", "empty"),
    ({}, "text", "invalid_value", "exactly one"),
    ({"text": "a", "messages": [{"role": "user", "content": "a"}]}, "text", "invalid_value",
     "exactly one"),
    ({"text": 5}, "text", "invalid_type", "string"),
    ({"messages": "Hi"}, "messages", "invalid_type", "messages"),
    ({"messages": [{"role": "robot", "content": "a"}]}, "messages[0].role", "invalid_value",
     "robot"),
    ({"text": "a", "max_tokens": 257}, "max_tokens", "invalid_value", "256"),
    ({"text": "a", "max_tokens": "8"}, "max_tokens", "invalid_type", "integer"),
    ({"text": "a", "decimals": 0}, "decimals", "invalid_value", "between"),
    ({"text": "a", "decimals": True}, "decimals", "invalid_type", "integer"),
    ({"text": "the cat " * 10, "max_tokens": 5}, "text", "invalid_value", "at most 5"),
    # The tiny run's context is 64 tokens: a longer text is refused with both numbers.
    ({"text": "the cat sat " * 40}, "text", "invalid_value", "at most 64"),
])
def test_bad_requests_are_400_and_the_server_serves_on(trained, body, param, code, words):
    error = assert_error(inspect(trained, body), 400, param, code)
    assert words in error["message"]
    assert inspect(trained, {"text": "Hi"})[0] == 200


def test_other_errors(trained):
    assert_error(post(trained, PATH, None, raw=b"[1, 2"), 400, code="invalid_json")
    assert_error(inspect(trained, ["text"]), 400, code="invalid_type")
    assert_error(inspect(trained, {"text": "a", "model": "gpt-4"}), 404, "model",
                 "model_not_found")
    assert_error(inspect(trained, {"text": "a"}, key=None), 401, code="missing_api_key")
    assert_error(inspect(trained, {"text": "a"}, key="wrong"), 401, code="invalid_api_key")
    assert inspect(trained, {"text": "Hi"})[0] == 200


def test_a_flood_of_inspections_is_refused_not_queued(trained):
    engine = trained.engine
    release = threading.Event()
    blocked = engine.call(lambda: release.wait(30))  # the engine thread is busy until released
    try:
        with ThreadPoolExecutor(MAX_PENDING_INSPECTIONS) as pool:
            waiting = [pool.submit(inspect, trained, {"text": "Hi"})
                       for _ in range(MAX_PENDING_INSPECTIONS)]
            deadline = time.monotonic() + 10
            while len(engine._calls) < MAX_PENDING_INSPECTIONS:  # all queued for the engine
                assert time.monotonic() < deadline
                time.sleep(0.01)
            error = assert_error(inspect(trained, {"text": "Hi"}), 503,
                                 code="server_overloaded")
            assert str(MAX_PENDING_INSPECTIONS) in error["message"]
            release.set()
            assert [f.result(30)[0] for f in waiting] == [200] * MAX_PENDING_INSPECTIONS
    finally:
        release.set()
        blocked.result(30)
    assert inspect(trained, {"text": "Hi"})[0] == 200
