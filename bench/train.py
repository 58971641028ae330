"""Training speed: our training step vs a plain fp32 eager loop around transformers' Llama.

    python bench/train.py                          # tiny, small, gpt-60m (~3-5 minutes on 2 cores)
    python bench/train.py --presets small --steps 3 --compile

For each preset, the same model shape (vocabulary 16,384) is trained a few steps by:
  * ours          src/model/gpt.GPT + train.py's default optimisers (Muon for hidden matrices,
                  fused AdamW for the rest) in the precision train.py picks here (bf16
                  autocast where the CPU has native bf16 matmuls, else fp32)
  * ours+compile  the same under torch.compile (with --compile; compile time not counted)
  * ours bf16     bf16 autocast forced (with --bf16; on a CPU without native bf16 it is emulated
                  and very slow, which is why train.py then picks fp32)
  * ours fp32     fp32 forced (with --fp32; and compiled with --compile): on a CPU with native
                  bf16, the path an AVX2-only CPU takes
  * hf llama fp32 transformers' LlamaForCausalLM of the same shape, fp32, eager, torch AdamW,
                  cross-entropy on its logits: the plain loop a newcomer would write
Each row also gives model FLOP/s (``GPT.flops_per_token`` x tokens/s) as a share of the
machine's own matmul peak in the row's precision, measured in the same run.
Every step is forward + backward + gradient clipping + optimiser step on random token ids
(content does not change the cost of dense compute), built by bench/steps.py. The implementations of a preset are
timed in one process, alternating steps, so load from other processes hits them alike;
tokens/s = batch * context / median step time, after ``--warmup`` untimed steps each. Peak
memory (max RSS) is measured apart: each implementation in its own process, two steps. The machine's 2 cores are shared with other work: absolute numbers
are noisy; ratios within one run are what counts. JSON goes to bench/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

import torch

from bench.steps import make_step
from src.training.plan import flops_per_token
from src.training.presets import model_config
from src.utils.atomic import write_json_atomic
from src.utils.device import cpu_description, matmul_flops

# Per preset: micro-batch and context used here (gpt-60m at a small batch to fit a CPU run).
SHAPES = {"tiny": (16, 64), "small": (16, 256), "gpt-60m": (2, 512), "gpt-125m": (1, 512)}
IMPLS = ("ours", "ours+compile", "ours bf16", "ours fp32", "ours fp32+compile", "hf llama fp32")


def build(preset: str, impl: str):
    """One training step of ``impl`` (bench/steps.py) at this preset's shape, and its facts."""
    batch, context = SHAPES[preset]
    cfg = model_config(preset, vocab_size=16384, context_length=context)
    dtype = None
    if impl.startswith("ours"):
        from src.utils.device import pick_dtype

        dtype = (torch.bfloat16 if impl == "ours bf16" else None if impl.startswith("ours fp32")
                 else pick_dtype("auto", torch.device("cpu")))
    step, model = make_step(cfg, "hf llama" if impl.startswith("hf") else "ours", batch=batch,
                            seq=context, autocast_dtype=dtype, compile_=impl.endswith("+compile"),
                            optimizer=True)
    facts = {"preset": preset, "impl": impl, "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
             "batch": batch, "context": context,
             "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
             "flops_per_token": flops_per_token(cfg)}
    return step, facts


def interleaved(preset: str, impls: list[str], steps: int, warmup: int) -> list[dict]:
    """Time all implementations in one process, alternating steps, so that load from other
    processes on the shared cores hits them alike; tokens/s from the median step time."""
    built = {impl: build(preset, impl) for impl in impls}
    for step, _ in built.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(steps):
        for impl, (step, _) in built.items():
            times[impl].append(step())
    rows = []
    for impl, (_, facts) in built.items():
        median = statistics.median(times[impl])
        rows.append({**facts, "steps": steps, "step_seconds": [round(t, 3) for t in times[impl]],
                     "tokens_per_s": round(facts["batch"] * facts["context"] / median, 1)})
    return rows


def peak_memory(preset: str, impl: str) -> float:
    """Peak RSS (MB) of a fresh process doing two training steps of ``impl``."""
    step, _ = build(preset, impl)
    step()
    step()
    # VmHWM, not ru_maxrss: the latter would include the parent's RSS inherited at fork.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # non-Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="tiny,small,gpt-60m")
    p.add_argument("--steps", type=int, default=4, help="timed steps per row (gpt-60m: half)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    p.add_argument("--bf16", action="store_true", help="also time ours with bf16 autocast forced")
    p.add_argument("--fp32", action="store_true", help="also time ours in fp32 forced")
    p.add_argument("--worker", nargs=2, metavar=("PRESET", "IMPL"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train.json"))
    args = p.parse_args()
    if args.worker:
        print(json.dumps({"peak_rss_mb": peak_memory(args.worker[0], args.worker[1])}))
        return

    rows = []
    started = time.time()
    for preset in args.presets.split(","):
        impls = [i for i in IMPLS if not ((i.endswith("+compile") and not args.compile)
                                          or (i == "ours bf16" and not args.bf16)
                                          or (i.startswith("ours fp32") and not args.fp32))]
        steps = max(2, args.steps // 2) if preset.startswith("gpt-") else args.steps
        preset_rows = interleaved(preset, impls, steps, args.warmup)
        for row in preset_rows:
            cmd = [sys.executable, __file__, "--worker", preset, row["impl"]]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            row["peak_rss_mb"] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"] if proc.returncode == 0 else None
            print(f"  {preset:8s} {row['impl']:18s} {row['tokens_per_s']:>9,.0f} tok/s", file=sys.stderr)
        rows.extend(preset_rows)

    # The machine's own peak in each precision used, measured in this run: the best of a
    # 1024^3 and a 2048^3 matrix multiply (bf16 only timed where a row uses it).
    peaks = {name: max(matmul_flops(dtype, size=n, seconds=1.0) for n in (1024, 2048))
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
             if any(r["dtype"] == name for r in rows)}
    for r in rows:
        r["gflops"] = round(r["flops_per_token"] * r["tokens_per_s"] / 1e9, 1)
        r["peak_gflops"] = round(peaks[r["dtype"]] / 1e9, 1)
        r["pct_of_peak"] = round(100 * r["gflops"] / r["peak_gflops"], 1)

    print(f"\nTraining throughput: {cpu_description()}; torch {torch.__version__}")
    print("matmul peak measured in this run: " + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in peaks.items()))
    print(f"{'preset':8s} {'impl':18s} {'dtype':5s} {'params':>7s} {'batch x ctx':>11s} {'tokens/s':>10s} "
          f"{'vs hf':>6s} {'GFLOP/s':>8s} {'% peak':>7s} {'peak MB':>8s}")
    for r in rows:
        hf = next((h for h in rows if h["preset"] == r["preset"] and h["impl"].startswith("hf")), None)
        ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf else "-"
        print(f"{r['preset']:8s} {r['impl']:18s} {r['dtype']:5s} {r['params_m']:>6.1f}M {r['batch']:>4d} x {r['context']:<4d} "
              f"{r['tokens_per_s']:>10,.0f} {ratio:>6s} {r['gflops']:>8,.1f} {r['pct_of_peak']:>6.1f}% "
              f"{r['peak_rss_mb'] or 0:>8,.0f}")
    print(f"({time.time() - started:.0f} s; shared cores: ratios within this run are what counts)")
    write_json_atomic(args.out, {"rows": rows, "torch": torch.__version__, "cpu": cpu_description(),
                                 "threads": torch.get_num_threads(),
                                 "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()}})


if __name__ == "__main__":
    main()
