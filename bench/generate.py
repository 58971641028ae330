"""Generation speed: our KV-cached loop vs recomputing the window, and vs Hugging Face.

    python bench/generate.py                      # ~2-4 minutes on 2 CPU cores
    python bench/generate.py --new-tokens 64      # a quick look

The model is the "small" preset with random weights (no trained run needed), its context
raised to 512 so that prompt + 256 new tokens fit. The peer is transformers'
LlamaForCausalLM.generate on the same weights (src/model/hf_llama.py converts them), in the
same run. Everyone decodes greedily and exactly ``--new-tokens`` tokens (no stop token), so
all do the same work; one extra row samples with top-p to show what sampling costs.

Reported per (implementation, batch): time to first token (prefill + one draw), and
throughput = batch * new tokens / total time. Each cell is the best of ``--repeats`` runs
after a warm-up (least disturbed by other processes on shared cores; absolute figures are
noisy, ratios within one run are what counts). JSON goes to bench/results/generate.json.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

import torch

from src.infer.sampling import SamplingSettings, stream_ids
from src.model.gpt import GPT
from src.training.presets import model_config
from src.utils.atomic import write_json_atomic


def time_ours(model, prompt, new_tokens, batch, use_cache, settings=None, seed=0):
    """(seconds to the first token, total seconds, tokens of row 0)."""
    settings = settings or SamplingSettings(max_new_tokens=new_tokens, greedy=True)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    first, out = None, []
    for tokens in stream_ids(
        model, prompt, settings, num_samples=batch, use_cache=use_cache, generator=gen
    ):
        if first is None:
            first = time.perf_counter() - start
        out.append(int(tokens[0]))
    return first, time.perf_counter() - start, out


def time_hf(hf, prompt, new_tokens, batch):
    """(seconds to the first token, total seconds, tokens of row 0) for HF generate."""
    ids = torch.tensor([prompt] * batch)
    kwargs = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        start = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        first = time.perf_counter() - start
        start = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        total = time.perf_counter() - start
    return first, total, out[0, len(prompt) :].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="for the fast cells (cache, HF)")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice); 1 is steadier on cores shared with others",
    )
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ctx = max(256, args.prompt_tokens + args.new_tokens)
    cfg = model_config("small", context_length=ctx)
    model = GPT(cfg).eval()
    prompt = torch.randint(
        0, cfg.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    print(
        f"small preset, random weights: {model.num_params() / 1e6:.1f}M parameters, context {ctx}, "
        f"vocab {cfg.vocab_size}; prompt {args.prompt_tokens} tokens, {args.new_tokens} new; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    hf, hf_weights = None, None
    if not args.no_hf:
        try:
            import transformers
        except ImportError:
            print("transformers is not installed: the Hugging Face rows are skipped")
        else:
            from src.model.hf_llama import to_hf, to_hf_config

            hf_version = transformers.__version__
            try:
                hf, hf_weights = to_hf(model).eval(), "ours (converted)"
            except Exception as exc:  # the converter lags behind a model change: same shape
                print(f"note: converting our weights failed ({exc!r}); using a random Llama")
                hf_model = transformers.LlamaForCausalLM(to_hf_config(cfg))
                hf, hf_weights = hf_model.eval(), "random (same shape)"

    rows = []
    n = args.new_tokens
    sampling = SamplingSettings(max_new_tokens=n, temperature=0.8, top_p=0.95)
    for batch in args.batches:
        time_ours(model, prompt, 8, batch, True)  # warm-up
        cells = [
            ("ours, KV cache", lambda b=batch: time_ours(model, prompt, n, b, True), args.repeats),
            (
                "ours, KV cache, top-p sampling",
                lambda b=batch: time_ours(model, prompt, n, b, True, sampling),
                args.repeats,
            ),
            ("ours, no cache", lambda b=batch: time_ours(model, prompt, n, b, False), 1),
        ]
        if hf is not None:
            time_hf(hf, prompt, 8, batch)  # warm-up
            cells.append(
                (
                    f"transformers {hf_version} generate",
                    lambda b=batch: time_hf(hf, prompt, n, b),
                    args.repeats,
                )
            )
        # Repeats are interleaved (A B C, A B C, ...) so a burst of load from other
        # processes hits every implementation alike; each cell keeps its best run.
        runs: dict[str, list] = {name: [] for name, _, _ in cells}
        for r in range(args.repeats):
            for name, fn, repeats in cells:
                if r < repeats:
                    runs[name].append(fn())
        greedy_ref = None
        for name, _, _ in cells:
            first = min(x[0] for x in runs[name])
            total = min(x[1] for x in runs[name])
            tokens = runs[name][0][2]
            if name == "ours, KV cache":
                greedy_ref = tokens
            comparable = "sampling" not in name and not (
                name.startswith("transformers") and hf_weights != "ours (converted)"
            )
            same = tokens == greedy_ref if comparable else None
            rows.append(
                dict(
                    impl=name,
                    batch=batch,
                    new_tokens=n,
                    ttft_ms=first * 1e3,
                    seconds=total,
                    tokens_per_s=batch * n / total,
                    same_tokens_as_ours=same,
                )
            )
            print(
                f"  batch {batch}: {name:<40s} ttft {first * 1e3:7.1f} ms   {batch * n / total:8.1f} tok/s",
                flush=True,
            )

    print()
    print(
        f"| {'implementation':<40s} | batch | TTFT ms | tokens/s | vs no-cache | greedy tokens = ours |"
    )
    print(f"|{'-' * 42}|-------|---------|----------|-------------|---------------------|")
    for r in rows:
        base = next(x for x in rows if x["batch"] == r["batch"] and x["impl"] == "ours, no cache")
        r["speedup_vs_no_cache"] = r["tokens_per_s"] / base["tokens_per_s"]
        same = (
            "-"
            if r["same_tokens_as_ours"] is None
            else ("yes" if r["same_tokens_as_ours"] else "no")
        )
        print(
            f"| {r['impl']:<40s} | {r['batch']:5d} | {r['ttft_ms']:7.1f} | {r['tokens_per_s']:8.1f} | "
            f"{r['speedup_vs_no_cache']:10.1f}x | {same:<19s} |"
        )
    for batch in args.batches:
        ours = next(x for x in rows if x["batch"] == batch and x["impl"] == "ours, KV cache")
        peer = next(
            (x for x in rows if x["batch"] == batch and x["impl"].startswith("transformers")), None
        )
        line = f"batch {batch}: cache vs no cache {ours['speedup_vs_no_cache']:.1f}x (target >= 5x)"
        if peer:
            line += f"; ours vs transformers {ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x (target >= 1x at batch 1)"
        print(line)

    out = Path(__file__).resolve().parent / "results" / "generate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        out,
        {
            "benchmark": "generate",
            "model": cfg.to_dict(),
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": n,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.platform(),
            "hf_weights": hf_weights,
            "rows": rows,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
