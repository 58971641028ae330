"""Training speed: our training step vs a plain fp32 eager loop around transformers' Llama.

    python bench/train.py                          # tiny, small, gpt-60m (~3-5 minutes on 2 cores)
    python bench/train.py --presets small --steps 3 --compile

For each preset, the same model shape (vocabulary 16,384) is trained a few steps by:
  * ours          src/model/gpt.GPT + fused AdamW in the precision train.py picks here (bf16
                  autocast where the CPU has native bf16 matmuls, else fp32)
  * ours+compile  the same under torch.compile (with --compile; compile time not counted)
  * ours bf16     bf16 autocast forced (with --bf16; on a CPU without native bf16 it is emulated
                  and very slow, which is why train.py then picks fp32)
  * hf llama fp32 transformers' LlamaForCausalLM of the same shape, fp32, eager, torch AdamW,
                  cross-entropy on its logits: the plain loop a newcomer would write
Every step is forward + backward + gradient clipping + optimiser step on random token ids
(content does not change the cost of dense compute). Each row runs in its own subprocess so
that its peak memory (max RSS) is its own. tokens/s = batch * context * steps / seconds after
``--warmup`` untimed steps. The machine's 2 cores are shared with other work: absolute numbers
are noisy; ratios within one run are what counts. JSON goes to bench/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

import torch
import torch.nn.functional as F

from src.model.gpt import GPT, GPTConfig
from src.utils.atomic import write_json_atomic

# Per preset: micro-batch and context used here (gpt-60m at a small batch to fit a CPU run).
SHAPES = {"tiny": (16, 64), "small": (16, 256), "gpt-60m": (2, 512), "gpt-125m": (1, 512)}
IMPLS = ("ours", "ours+compile", "ours bf16", "hf llama fp32")


def worker(preset: str, impl: str, steps: int, warmup: int) -> dict:
    """Time ``steps`` training steps of one implementation (runs in its own process)."""
    torch.manual_seed(0)
    batch, context = SHAPES[preset]
    cfg = GPTConfig.from_preset(preset, vocab_size=16384, context_length=context)
    data = torch.randint(0, cfg.vocab_size, (steps + warmup, batch, context + 1))
    use_bf16 = False
    if impl.startswith("hf"):
        from transformers import LlamaForCausalLM

        from src.model.hf_llama import to_hf_config

        model = LlamaForCausalLM(to_hf_config(cfg))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

        def loss_fn(x, y):
            logits = model(input_ids=x).logits
            return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
    else:
        model = GPT(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
        from src.training.trainer import pick_dtype

        fwd = torch.compile(model) if impl == "ours+compile" else model
        dtype = torch.bfloat16 if impl == "ours bf16" else pick_dtype("auto", torch.device("cpu"))
        use_bf16 = dtype == torch.bfloat16

        def loss_fn(x, y):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                return fwd(x, y)[1]

    model.train()
    t_start = None
    for i in range(steps + warmup):
        if i == warmup:
            t_start = time.perf_counter()
        x, y = data[i, :, :-1], data[i, :, 1:]
        loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t_start
    tokens = steps * batch * context
    return {
        "preset": preset, "impl": impl, "dtype": "bf16" if use_bf16 else "fp32", "batch": batch, "context": context,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "steps": steps, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "final_loss": round(float(loss), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="tiny,small,gpt-60m")
    p.add_argument("--steps", type=int, default=4, help="timed steps per row (gpt-60m: half)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    p.add_argument("--bf16", action="store_true", help="also time ours with bf16 autocast forced")
    p.add_argument("--worker", nargs=2, metavar=("PRESET", "IMPL"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train.json"))
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.steps, args.warmup)))
        return

    rows = []
    started = time.time()
    for preset in args.presets.split(","):
        steps = max(1, args.steps // 2) if preset.startswith("gpt-") else args.steps
        for impl in IMPLS:
            if (impl == "ours+compile" and not args.compile) or (impl == "ours bf16" and not args.bf16):
                continue
            cmd = [sys.executable, __file__, "--worker", preset, impl, "--steps", str(steps),
                   "--warmup", str(args.warmup)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{preset} {impl}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  {preset:8s} {impl:14s} {rows[-1]['tokens_per_s']:>9,.0f} tok/s", file=sys.stderr)

    print(f"\nTraining throughput, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'preset':8s} {'impl':15s} {'dtype':5s} {'params':>7s} {'batch x ctx':>11s} {'tokens/s':>10s} "
          f"{'vs hf':>6s} {'peak MB':>8s}")
    for r in rows:
        hf = next((h for h in rows if h["preset"] == r["preset"] and h["impl"].startswith("hf")), None)
        ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf else "-"
        print(f"{r['preset']:8s} {r['impl']:15s} {r['dtype']:5s} {r['params_m']:>6.1f}M {r['batch']:>4d} x {r['context']:<4d} "
              f"{r['tokens_per_s']:>10,.0f} {ratio:>6s} {r['peak_rss_mb']:>8,.0f}")
    print(f"({time.time() - started:.0f} s; shared cores: ratios within this run are what counts)")
    write_json_atomic(args.out, {"rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
