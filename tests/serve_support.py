"""Helpers for the serve tests: a model whose replies are known, and a real server in a thread.

``scripted_model`` builds a real GPT whose weights are set by hand so that, greedily (and at
any usual temperature), it answers every chat with the same text: ``SCRIPT_REPLY`` and then
``LOOP`` repeated until ``max_tokens``. How: every block's output projections are zero, so
the residual stream is just the current token's embedding; chain token k embeds as the unit
vector e_k, and the output head maps e_k to the next token of the chain with a large logit.
The reply contains HTML that must not run, and an emoji that the tokenizer splits into four
byte tokens (so streaming must not cut it).
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import torch
import uvicorn

from src.model.gpt import GPT
from src.serve.server import Server
from src.tokenizer.bpe import BPETokenizer
from src.tokenizer.special_tokens import ASSISTANT
from src.training.presets import model_config

SCRIPT_REPLY = "<script>document.title='pwned'</SCRIPT> \U0001f642"
LOOP = " la"


def scripted_tokenizer() -> BPETokenizer:
    """A tokenizer that knows the reply's words (trained on them) but not the emoji."""
    words = SCRIPT_REPLY.replace("\U0001f642", "") + LOOP * 3
    return BPETokenizer.train([words] * 20 + ["Hello there, how are you?"] * 5, 300)


def scripted_text(tokens: int) -> str:
    """What the scripted model replies in ``tokens`` tokens (a character cut by the end of
    the reply shows as U+FFFD, as the tokenizer decodes it)."""
    tok = scripted_tokenizer()
    return tok.decode(tok.encode(SCRIPT_REPLY + LOOP * tokens)[:tokens])


def scripted_model(tokenizer: BPETokenizer, context_length: int = 2048) -> GPT:
    """The GPT described in the module docstring (tiny preset shape, untied head)."""
    config = model_config("tiny", vocab_size=tokenizer.vocab_size,
                                   context_length=context_length, tie_embeddings=False)
    model = GPT(config)
    chain = [tokenizer.special_tokens[ASSISTANT], *tokenizer.encode(SCRIPT_REPLY + LOOP)]
    successor: dict[int, int] = {}
    for token, nxt in zip(chain, chain[1:] + [chain[-1]]):  # the last token repeats forever
        if successor.setdefault(token, nxt) != nxt:
            raise ValueError(f"token {token} has two successors in the scripted reply")
    if len(successor) > config.d_model:
        raise ValueError("the scripted reply has more distinct tokens than d_model")
    with torch.no_grad():
        for block in model.blocks:
            block.attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        model.tok_emb.weight.zero_()
        model.lm_head.weight.zero_()
        for k, (token, nxt) in enumerate(successor.items()):
            model.tok_emb.weight[token, k] = 1.0
            model.lm_head.weight[nxt, k] = 10.0
    return model.eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(app, engine):
    """Serve ``app`` with serve.py's uvicorn server on 127.0.0.1 in a thread; yields the
    server (``.base_url`` is its address)."""
    engine.start()
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                            timeout_graceful_shutdown=2)
    server = Server(config, engine)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    server.base_url = f"http://127.0.0.1:{config.port}"
    try:
        yield server
    finally:
        engine.shutdown()
        server.should_exit = True
        thread.join(10)
