"""Serve a trained model over HTTP: an OpenAI-compatible API and a web chat page.

    python serve.py                                   # the newest run, http://127.0.0.1:8000/
    python serve.py --run runs/small --port 8080
    python serve.py --host 0.0.0.0 --api-key SECRET   # reachable from other machines

Then open the printed address in a browser, or point any OpenAI client at the API base:
``OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="SECRET or anything")``. Requests
from many clients are decoded together (continuous batching, up to --max-batch at once).
Ctrl-C or SIGTERM stops the server; replies in flight end with a final chunk.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the repo root

from src.serve.loading import DTYPES
from src.serve.server import API_KEY_ENV, ServeOptions, serve
from src.utils.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Serve a trained model: OpenAI-compatible API and a web chat page.",
        epilog="Example: python serve.py --run runs/small --port 8000")
    parser.add_argument("--run", help="a run or checkpoint folder (default: the newest run)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="(default 8000; 0 = any free)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default auto)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                        help="weights and KV cache (default fp32)")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="sequences decoded together (default 8)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting for a free slot before 503 (default 64)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads on CPU (default: every core but one)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on /v1 (or set {API_KEY_ENV})")
    args = parser.parse_args(argv)
    return serve(ServeOptions(**vars(args)))


if __name__ == "__main__":
    run_cli(main)
