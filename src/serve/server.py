"""Run the server: load a run, start the engine, serve HTTP until Ctrl-C or SIGTERM.

Stopping: the first Ctrl-C / SIGTERM stops the engine, which ends every request in flight
with a last chunk (``finish_reason`` "stop") and ``data: [DONE]``; uvicorn then closes the
connections (waiting at most ``GRACEFUL_SECONDS``) and the process exits.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn

from src.infer.engine import Engine
from src.serve.app import create_app
from src.serve.loading import load_served_model
from src.utils.cli import UserError

API_KEY_ENV = "GPT_API_KEY"
GRACEFUL_SECONDS = 5


@dataclass
class ServeOptions:
    """What ``python serve.py`` was asked for (see its --help)."""

    run: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str = "fp32"
    max_batch: int = 8
    max_queue: int = 64
    api_key: str | None = None
    threads: int | None = None


def default_threads() -> int:
    """Torch threads for a CPU server: every core but one, which is left to the HTTP side
    (on 2 shared cores, two torch threads spin-waiting starve the event loop: measured 2-3x
    lower throughput at 8 streams in bench/serve.py)."""
    return max(1, (os.cpu_count() or 1) - 1)


def is_loopback(host: str) -> bool:
    """True for localhost / 127.x / ::1: only this machine can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Server(uvicorn.Server):
    """uvicorn, plus: print the addresses once listening, stop the engine on the first
    Ctrl-C / SIGTERM so that the streams in flight end (instead of being waited for)."""

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            port = self.servers[0].sockets[0].getsockname()[1]
            host = self.config.host
            shown = f"[{host}]" if ":" in host else host
            print(f"Chat page: http://{shown}:{port}/\nAPI base:  http://{shown}:{port}/v1 "
                  "(Ctrl-C stops)", flush=True)

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            # uvicorn re-raises the stopping signal once it has shut down, so the process
            # would die of it (exit -15, or a KeyboardInterrupt). Ours stopped cleanly: exit 0.
            self._captured_signals.clear()

    def handle_exit(self, sig, frame) -> None:
        # In a signal handler: the engine's shutdown takes its lock, so not here.
        threading.Thread(target=self.engine.shutdown, daemon=True).start()
        super().handle_exit(sig, frame)


def serve(options: ServeOptions) -> int:
    """Serve ``options.run`` until stopped; UserError for bad options or a missing run."""
    if not 0 <= options.port <= 65535:
        raise UserError(f"--port {options.port}: must be between 0 and 65535")
    if options.max_batch < 1:
        raise UserError(f"--max-batch {options.max_batch}: must be at least 1")
    if options.max_queue < 0:
        raise UserError(f"--max-queue {options.max_queue}: must be 0 or more")
    if options.threads is not None and options.threads < 1:
        raise UserError(f"--threads {options.threads}: must be at least 1")
    api_key = options.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(options.host) and api_key is None:
        print(f"warning: serving on {options.host} without an API key: anyone who can reach "
              f"this machine can use the model (set --api-key or {API_KEY_ENV})",
              file=sys.stderr, flush=True)
    model, tokenizer, info = load_served_model(options.run, options.device, options.dtype)
    if next(model.parameters()).device.type == "cpu":
        torch.set_num_threads(options.threads or default_threads())
    name = Path(info["run_dir"]).name
    engine = Engine(model, tokenizer, max_batch=options.max_batch, max_queue=options.max_queue)
    app = create_app(engine, name, api_key=api_key)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning",
                            timeout_graceful_shutdown=GRACEFUL_SECONDS)
    print(f"Serving {info['checkpoint']} as model '{name}' (step {info['step']}, "
          f"{next(model.parameters()).device}, {torch.get_num_threads()} threads, batch "
          f"{options.max_batch})", flush=True)
    engine.start()
    try:
        Server(config, engine).run()
    finally:
        engine.shutdown()
    print("Stopped.", flush=True)
    return 0
