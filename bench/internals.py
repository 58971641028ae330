"""What seeing inside the model costs: attention_maps latency, and generation untouched.

    python bench/internals.py --threads 1          # under a minute on 2 CPU cores

The model is the "small" preset with random weights (no trained run needed). The tokenizer
has no merges (one token per byte), so a text of n - 1 ASCII characters is exactly n tokens
with the leading <|endoftext|>.

1. ``attention_maps`` at 64 and 256 tokens (256 is the preset's context): the whole call,
   and its parts: the forward pass with ``record_attention`` (explicit attention) against
   the same pass on the fused kernel, and the JSON text of the result (what a server sends;
   its size also with the weights rounded to 4 decimals).
2. Generation (greedy, KV cache, batch 1) with this code and with ``src/model/gpt.py`` as it
   was before ``record_attention`` existed (read from git: the parent of the commit that
   added it), the same weights in both: tokens/s of whole generations, and the time of one
   KV-cached decode step (best of many: the steadiest figure on a loaded machine). With the
   feature off the fast path must run at the same speed and give the same tokens.

Each cell is the best of ``--repeats`` runs, interleaved, after a warm-up (least disturbed by
other processes on shared cores). JSON goes to bench/results/internals.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo root

import torch

from src.infer.internals import attention_maps, prompt_ids
from src.infer.sampling import SamplingSettings, stream_ids
from src.model.gpt import GPT, record_attention
from src.tokenizer.bpe import BPETokenizer
from src.training.presets import model_config
from src.utils.atomic import write_json_atomic

GPT_FILE = "src/model/gpt.py"


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def baseline_gpt_module(rev: str | None):
    """src/model/gpt.py at ``rev`` (default: just before record_attention was added), loaded
    as a module of its own; and the revision used."""
    if rev is None:
        added = git("log", "--format=%H", "-S", "def record_attention", "--", GPT_FILE)
        if not added:
            raise SystemExit(f"error: no commit adds record_attention to {GPT_FILE}; give --baseline")
        rev = added.splitlines()[-1] + "^"
    rev = git("rev-parse", "--short", rev)
    source = git("show", f"{rev}:{GPT_FILE}")
    spec = importlib.util.spec_from_loader("gpt_baseline", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    exec(compile(source, f"{GPT_FILE}@{rev}", "exec"), module.__dict__)
    if hasattr(module, "record_attention"):
        raise SystemExit(f"error: {GPT_FILE} at {rev} already has record_attention")
    return module, rev


def best(fn, repeats: int) -> float:
    """Fastest of ``repeats`` calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", default=None,
                        help="git revision of gpt.py to compare generation with "
                             "(default: the parent of the commit that added record_attention)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice); 1 is steadier on shared cores")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    cfg = model_config("small")
    model = GPT(cfg).eval()
    tok = BPETokenizer([])  # bytes only: n - 1 ASCII characters are n tokens
    print(f"small preset, random weights: {model.num_params() / 1e6:.1f}M parameters, "
          f"{cfg.n_layer} layers x {cfg.n_head} heads, context {cfg.context_length}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    maps_rows = []
    for n in args.lengths:
        text = ("the quick brown fox jumps over the lazy dog " * 8)[: n - 1]
        x = torch.tensor([prompt_ids(tok, text)])
        assert x.size(1) == n

        def recorded(x=x):
            with torch.inference_mode(), record_attention(model):
                model(x)

        def fused(x=x):
            with torch.inference_mode():
                model(x)

        def call(text=text, n=n):
            return attention_maps(model, tok, text, max_tokens=n)

        call()  # warm-up
        maps = call()
        body = json.dumps(maps.to_dict())
        rounded = json.dumps(attention_maps(model, tok, text, max_tokens=n, decimals=4).to_dict())
        cells = {"attention_maps": call, "forward, record_attention": recorded,
                 "forward, fused kernel": fused, "json.dumps of the result": lambda b=maps:
                 json.dumps(b.to_dict())}
        times = {name: [] for name in cells}
        for _ in range(args.repeats):  # interleaved: a burst of load hits every cell alike
            for name, fn in cells.items():
                times[name].append(best(fn, 1))
        row = {"tokens": n, "json_bytes": len(body), "json_bytes_4_decimals": len(rounded),
               **{name: min(t) * 1e3 for name, t in times.items()}}
        maps_rows.append(row)
        print(f"  {n} tokens: " + ", ".join(f"{k} {v:.1f} ms" for k, v in row.items()
                                            if not k.startswith(("tokens", "json_bytes")))
              + f", JSON {len(body) / 1e6:.2f} MB ({len(rounded) / 1e6:.2f} MB at 4 decimals)")

    baseline_module, rev = baseline_gpt_module(args.baseline)
    baseline = baseline_module.GPT(baseline_module.GPTConfig(**cfg.to_dict())).eval()
    baseline.load_state_dict(model.state_dict())
    current = GPT(cfg).eval()  # made the same way as the baseline: the same weights, copied
    current.load_state_dict(model.state_dict())
    settings = SamplingSettings(max_new_tokens=args.new_tokens, greedy=True)
    prompt = list(range(16))
    runs = {"this code (record_attention present, off)": current,
            f"gpt.py at {rev} (before record_attention)": baseline}
    tokens, gen_times, step_times = {}, {name: [] for name in runs}, {name: [] for name in runs}
    for name, m in runs.items():
        tokens[name] = [int(t) for t in stream_ids(m, prompt, settings)]  # warm-up

    def decode_step(m, cache, x) -> None:
        """One KV-cached decode step at position 64 (the cache rewound each time)."""
        cache.position = 64
        with torch.inference_mode():
            m(x, cache=cache)

    caches = {}
    for name, m in runs.items():
        caches[name] = m.new_kv_cache(1, 128)
        with torch.inference_mode():
            m(torch.tensor([list(range(64))]), cache=caches[name])
    one = torch.tensor([[7]])
    for r in range(args.repeats):
        # Interleaved, the order flipped every round: load from other processes and the
        # position in a round hit both alike.
        order = list(runs.items()) if r % 2 == 0 else list(runs.items())[::-1]
        for name, m in order:
            gen_times[name].append(best(lambda m=m: list(stream_ids(m, prompt, settings)), 1))
            step_times[name].append(best(lambda m=m, c=caches[name]: decode_step(m, c, one), 50))
    gen_rows = [{"code": name, "tokens_per_s": args.new_tokens / min(gen_times[name]),
                 "decode_step_ms": min(step_times[name]) * 1e3} for name in runs]
    same = len({tuple(t) for t in tokens.values()}) == 1

    print("\n| tokens | attention_maps | forward, record_attention | forward, fused kernel "
          "| json.dumps | JSON size | JSON size, 4 decimals |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in maps_rows:
        print(f"| {r['tokens']} | {r['attention_maps']:.1f} ms | "
              f"{r['forward, record_attention']:.1f} ms | {r['forward, fused kernel']:.1f} ms | "
              f"{r['json.dumps of the result']:.1f} ms | {r['json_bytes'] / 1e6:.2f} MB | "
              f"{r['json_bytes_4_decimals'] / 1e6:.2f} MB |")
    print(f"\ngeneration, greedy, batch 1, 16-token prompt, {args.new_tokens} new tokens:")
    print("| code | tokens/s | one decode step (best of all) |\n|---|---:|---:|")
    for r in gen_rows:
        print(f"| {r['code']} | {r['tokens_per_s']:.1f} | {r['decode_step_ms']:.2f} ms |")
    ratio = gen_rows[0]["tokens_per_s"] / gen_rows[1]["tokens_per_s"]
    step_ratio = gen_rows[0]["decode_step_ms"] / gen_rows[1]["decode_step_ms"]
    print(f"tokens/s ratio {ratio:.3f}, decode step time ratio {step_ratio:.3f}; "
          f"same greedy tokens: {'yes' if same else 'NO'}")

    out = ROOT / "bench" / "results" / "internals.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, {
        "benchmark": "internals", "model": cfg.to_dict(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.platform(),
        "attention_maps": maps_rows, "baseline_revision": rev, "generation": gen_rows,
        "generation_ratio": ratio, "decode_step_ratio": step_ratio, "same_greedy_tokens": same,
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
