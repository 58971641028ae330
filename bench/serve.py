"""Serving throughput and latency: continuous batching over HTTP vs one request at a time,
and vs Hugging Face transformers' batched ``generate`` on the same weights.

    python bench/serve.py                          # about 2 minutes on 2 shared CPU cores
    python bench/serve.py --requests 8 --new-tokens 32     # a quick look
    python bench/serve.py --attention --threads 1  # /v1/internals/attention latency

The model is the ``small`` preset with random weights (seeded; no trained run needed, the
cost per token is the same), served by serve.py's own server (engine + app + uvicorn) in a
separate process on 127.0.0.1. ``--requests`` streaming /v1/completions requests of
``--new-tokens`` tokens each (``ignore_eos``: all do the same work) are sent by 1, 4, 8 and
16 concurrent clients; 1 client is "the same requests one after another". Decoding is greedy,
as in vLLM's benchmark_serving: with random weights every distribution is nearly flat, and
top-p would then sort the whole vocabulary for every token, a cost a trained model's peaked
distributions do not have. Per level:

* aggregate throughput: generated tokens / wall time of the level;
* TTFT (time to first token): request sent -> first text chunk received, p50 and p95;
* per-token latency: the gaps between a stream's successive text chunks, p50 and p95.

Then transformers' ``LlamaForCausalLM.generate`` (src/model/hf_llama.py converts our
weights) decodes the same prompts in batches of the same sizes, in this process after the
server has stopped (no HTTP: the cost of the model and its loop only). JSON goes to
bench/results/serve.json. Figures on shared cores are noisy; compare within one run.

``--attention`` measures instead ``POST /v1/internals/attention`` on the same server: a text of
64 and of 256 tokens (with the leading <|endoftext|>; 256 is the preset's context and the
endpoint's limit), weights rounded to 4 decimals (the default), ``--requests`` times each
(default 16) after a warm-up, one client, the engine idle: the whole round trip (the forward
pass in the engine's thread, the lists, the JSON written and read back) and the body's size.
JSON goes to bench/results/serve_attention.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import platform
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

import torch

from src.model.gpt import GPT
from src.serve.server import default_threads
from src.tokenizer.bpe import BPETokenizer
from src.training.presets import model_config
from src.utils.atomic import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "small-random"
TOPICS = ["The history of the city", "A small bird sings", "My friend reads a letter",
          "The river in the morning", "An old man paints the house", "The teacher calls"]


def build(seed: int) -> tuple[GPT, BPETokenizer]:
    """The small preset with seeded random weights, and a tokenizer trained on the README
    (few merges: ids past the tokenizer's are never drawn, the model's vocabulary and so its
    cost per token stay the preset's 16,384)."""
    tokenizer = BPETokenizer.train([(ROOT / "README.md").read_text(encoding="utf-8")], 1024)
    torch.manual_seed(seed)
    return GPT(model_config("small")).eval(), tokenizer


def serve_in_subprocess(port: int, max_batch: int, seed: int, threads: int | None) -> None:
    import uvicorn

    from src.infer.engine import Engine
    from src.serve.app import create_app
    from src.serve.server import Server

    torch.set_num_threads(threads)
    model, tokenizer = build(seed)
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=256)
    engine.start()
    config = uvicorn.Config(create_app(engine, MODEL_NAME), host="127.0.0.1", port=port,
                            log_level="warning")
    Server(config, engine).run()


def prompt_text(i: int) -> str:
    return f"{TOPICS[i % len(TOPICS)]} number {i}"


def stream_one(port: int, i: int, new_tokens: int) -> dict:
    """One streaming completion; its TTFT, chunk gaps and token count."""
    body = {"model": MODEL_NAME, "prompt": prompt_text(i), "max_tokens": new_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"request {i}: HTTP {response.status} {response.read()[:200]}")
    times, tokens = [], 0
    for line in response:
        # Parsing every chunk's JSON would cost the client more CPU than the server spends on
        # it (the cores are shared): a chunk with text is recognised by its bytes, and only
        # the usage chunk is parsed.
        if not line.startswith(b"data: {"):
            continue
        if b'"usage": {' in line:
            tokens = json.loads(line[6:])["usage"]["completion_tokens"]
        elif b'"text": ""' not in line:
            times.append(time.perf_counter())
    conn.close()
    return {"ttft": times[0] - start, "gaps": [b - a for a, b in zip(times, times[1:])],
            "tokens": tokens}


def run_level(port: int, clients: int, requests: int, new_tokens: int) -> dict:
    """``requests`` requests shared by ``clients`` concurrent clients."""
    results: list[dict] = []
    lock = threading.Lock()
    order = iter(range(requests))

    def client() -> None:
        while True:
            with lock:
                i = next(order, None)
            if i is None:
                return
            result = stream_one(port, i, new_tokens)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": requests, "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "ttft_p50_ms": pct(ttfts, 50) * 1e3,
            "ttft_p95_ms": pct(ttfts, 95) * 1e3, "token_p50_ms": pct(gaps, 50) * 1e3,
            "token_p95_ms": pct(gaps, 95) * 1e3}


def pct(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def hf_level(hf, tokenizer, batch: int, requests: int, new_tokens: int) -> dict:
    """The same prompts through transformers' generate, ``batch`` at a time (left-padded)."""
    prompts = [[tokenizer.eot_id, *tokenizer.encode(prompt_text(i))] for i in range(requests)]
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, requests, batch):
            group = prompts[first:first + batch]
            width = max(len(p) for p in group)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
            hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                        eos_token_id=None)
    wall = time.perf_counter() - start
    return {"batch": batch, "requests": requests, "seconds": wall,
            "tokens_per_s": requests * new_tokens / wall}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(port: int, process, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.is_alive():
            raise RuntimeError("the server process died")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the server did not start")


def text_of_tokens(tokenizer: BPETokenizer, n: int) -> str:
    """A text of the README that encodes to exactly ``n`` - 1 tokens (``n`` with the
    <|endoftext|> that starts the prompt)."""
    ids = tokenizer.encode((ROOT / "README.md").read_text(encoding="utf-8")[:20_000])
    for end in range(n - 1, len(ids)):  # a cut may re-encode differently: try further cuts
        text = tokenizer.decode(ids[:end])
        if len(tokenizer.encode(text)) == n - 1:
            return text
    raise RuntimeError(f"no README prefix of {n - 1} tokens")


def inspect_once(port: int, body: str, n: int) -> tuple[float, int]:
    """One /v1/internals/attention round trip: (seconds, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    start = time.perf_counter()
    conn.request("POST", "/v1/internals/attention", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    raw = response.read()
    maps = json.loads(raw)
    elapsed = time.perf_counter() - start
    conn.close()
    if response.status != 200 or len(maps["tokens"]) != n:
        raise RuntimeError(f"{n} tokens: HTTP {response.status} {raw[:200]}")
    return elapsed, len(raw)


def attention_bench(port: int, lengths: list[int], repeats: int) -> list[dict]:
    """Round-trip times of /v1/internals/attention for texts of ``lengths`` tokens, and the
    longest pause it puts in a stream generated at the same time."""
    _, tokenizer = build(0)
    rows = []
    for n in lengths:
        body = json.dumps({"model": MODEL_NAME, "text": text_of_tokens(tokenizer, n)})
        inspect_once(port, body, n)  # warm-up
        timed = [inspect_once(port, body, n) for _ in range(repeats)]
        times, size = [t for t, _ in timed], timed[-1][1]
        # A stream of 96 tokens while 3 inspections run one after another.
        with ThreadPoolExecutor(1) as pool:
            streaming = pool.submit(stream_one, port, 0, 96)
            time.sleep(0.5)
            for _ in range(3):
                inspect_once(port, body, n)
            stream = streaming.result()
        rows.append({"tokens": n, "stream_gap_p50_ms": 1000 * statistics.median(stream["gaps"]),
                     "stream_gap_max_ms": 1000 * max(stream["gaps"]),
                     "best_ms": 1000 * min(times),
                     "p50_ms": 1000 * statistics.median(times),
                     "p95_ms": 1000 * pct(times, 95), "body_mb": size / 1e6})
        print(f"  {n:4d} tokens: best {rows[-1]['best_ms']:.0f} ms, median "
              f"{rows[-1]['p50_ms']:.0f} ms, p95 {rows[-1]['p95_ms']:.0f} ms, "
              f"{rows[-1]['body_mb']:.2f} MB; a stream's gaps meanwhile: median "
              f"{rows[-1]['stream_gap_p50_ms']:.0f} ms, longest "
              f"{rows[-1]['stream_gap_max_ms']:.0f} ms", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16, help="per level (default 16)")
    parser.add_argument("--new-tokens", type=int, default=64, help="per request (default 64)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="torch threads of the server and of transformers (default: "
                             "serve.py's, every core but one)")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    parser.add_argument("--attention", action="store_true",
                        help="measure /v1/internals/attention instead (see above)")
    args = parser.parse_args()
    seed = 0
    port = free_port()
    server = multiprocessing.get_context("spawn").Process(
        target=serve_in_subprocess, args=(port, max(args.clients), seed, args.threads),
        daemon=True)
    server.start()
    if args.attention:
        try:
            wait_until_up(port, server)
            rows = attention_bench(port, [64, 256], args.requests)
        finally:
            server.terminate()
            server.join(30)
        out = ROOT / "bench" / "results" / "serve_attention.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, {
            "benchmark": "serve --attention", "model": "small preset, random weights",
            "seed": seed, "decimals": 4, "requests": args.requests, "torch": torch.__version__,
            "threads": args.threads, "machine": platform.platform(), "rows": rows})
        print(f"wrote {out}")
        return
    try:
        wait_until_up(port, server)
        stream_one(port, 0, 4)  # warm-up
        levels = []
        for clients in args.clients:
            level = run_level(port, clients, args.requests, args.new_tokens)
            levels.append(level)
            print(f"  {clients:2d} clients: {level['tokens_per_s']:7.1f} tok/s", flush=True)
    finally:
        server.terminate()
        server.join(30)

    hf_rows, hf_version = [], None
    if not args.no_hf:
        try:
            import transformers

            from src.model.hf_llama import to_hf
        except ImportError:
            print("transformers is not installed: the Hugging Face rows are skipped")
        else:
            hf_version = transformers.__version__
            torch.set_num_threads(args.threads)
            model, tokenizer = build(seed)
            hf = to_hf(model).eval()
            hf_level(hf, tokenizer, 1, 1, 4)  # warm-up
            for batch in args.clients:
                hf_rows.append(hf_level(hf, tokenizer, batch, args.requests, args.new_tokens))
                print(f"  transformers batch {batch:2d}: {hf_rows[-1]['tokens_per_s']:7.1f} tok/s",
                      flush=True)

    one = levels[0]
    print(f"\nsmall preset, random weights; {args.requests} requests x {args.new_tokens} tokens "
          f"per level; torch {torch.__version__}, {args.threads} threads\n")
    print("| clients | tok/s  | vs 1 client | TTFT p50 / p95 ms | per-token p50 / p95 ms | "
          "transformers generate, same batch: tok/s |")
    print("|--------:|-------:|------------:|------------------:|-----------------------:|"
          "----------------------------------------:|")
    for level in levels:
        level["speedup_vs_one_client"] = level["tokens_per_s"] / one["tokens_per_s"]
        peer = next((r for r in hf_rows if r["batch"] == level["clients"]), None)
        print(f"| {level['clients']:7d} | {level['tokens_per_s']:6.1f} | "
              f"{level['speedup_vs_one_client']:10.2f}x | "
              f"{level['ttft_p50_ms']:7.1f} / {level['ttft_p95_ms']:7.1f} | "
              f"{level['token_p50_ms']:10.1f} / {level['token_p95_ms']:9.1f} | "
              f"{peer['tokens_per_s'] if peer else float('nan'):40.1f} |")
    eight = next((x for x in levels if x["clients"] == 8), None)
    if eight:
        print(f"\n8 clients: throughput {eight['speedup_vs_one_client']:.2f}x one client's "
              f"(goal >= 4x); p95 per-token latency "
              f"{eight['token_p95_ms'] / one['token_p95_ms']:.2f}x one client's (goal <= 2x)")
    out = ROOT / "bench" / "results" / "serve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, {
        "benchmark": "serve", "model": "small preset, random weights", "seed": seed,
        "requests_per_level": args.requests, "new_tokens": args.new_tokens,
        "torch": torch.__version__, "transformers": hf_version,
        "threads": args.threads, "machine": platform.platform(),
        "levels": levels, "transformers_generate": hf_rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
