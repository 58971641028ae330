"""Model speed: forward + backward of our GPT vs transformers' LlamaForCausalLM of the same shape.

    python bench/model.py                            # CPU rows (~3-5 minutes on 2 cores)
    python bench/model.py --presets small --dtypes fp32 --steps 8
    python bench/model.py --device cuda --presets gpt-60m,gpt-125m --dtypes bf16 --compile

A row is (preset, dtype, batch x sequence). For each row both implementations run the same
work (bench/steps.py): forward on random token ids, mean cross-entropy against random targets
(for Llama, computed on its logits exactly as our model does), backward. No optimiser: this
measures the model, not the training loop (bench/train.py does that). Llama uses its SDPA
attention.

  * tokens/s   batch * seq / seconds of the best of ``--steps`` timed steps after a warm-up
               (best, not mean: the 2 cores are shared with other work, and interruptions only
               make a step slower). Both models live in one process and their steps alternate,
               so a burst of load from elsewhere hits both alike.
  * peak MiB   measured in a fresh subprocess per model, so that it is its own: on CPU the
               growth of peak resident memory (VmHWM, reset through /proc/self/clear_refs)
               over the resident memory before one step, i.e. activations + gradients +
               temporaries; on CUDA the growth of max_memory_allocated. On a GPU it also reports model FLOPs utilisation
(MFU) from GPT.flops_per_token's formula at the benchmarked sequence length.

bf16 means autocast (weights stay fp32), as in training. JSON goes to bench/results/model.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

import torch

from bench.steps import IMPLS, make_step
from src.model.gpt import GPT
from src.training.presets import model_config
from src.utils.atomic import write_json_atomic

# (batch, seq) per device, dtype and preset. On a CPU without native bf16 instructions (no
# AVX512-BF16 / AMX, e.g. this AVX2 machine) bf16 matmuls are emulated and measured ~60x
# slower than fp32, so the CPU bf16 rows are short and leave gpt-60m out (minutes per step).
SHAPES = {
    ("cpu", "fp32"): {"tiny": (8, 64), "small": (4, 256), "gpt-60m": (1, 256)},
    ("cpu", "bf16"): {"tiny": (4, 64), "small": (1, 32)},
    ("cuda", "fp32"): {"tiny": (64, 64), "small": (32, 256), "gpt-60m": (16, 1024),
                       "gpt-125m": (16, 1024)},
    ("cuda", "bf16"): {"tiny": (64, 64), "small": (32, 256), "gpt-60m": (16, 1024),
                       "gpt-125m": (16, 1024)},
}
PEAK_TFLOPS = {"NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0}  # dense bf16


def rss_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB (Linux only)."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def warm_step(preset: str, impl: str, dtype: str, batch: int, seq: int, device: str,
              compile_: bool):
    """One forward+backward pass of ``impl`` (bench/steps.py), warmed up (and compiled)."""
    step, _ = make_step(model_config(preset), impl, batch=batch, seq=seq, device=device,
                        autocast_dtype=torch.bfloat16 if dtype == "bf16" else None,
                        compile_=compile_)
    for _ in range(3 if compile_ else 1):
        step()
    return step


def time_row(args: argparse.Namespace, preset: str, dtype: str, batch: int, seq: int) -> dict:
    """Best tokens/s of each implementation, their steps interleaved in this process so that
    a burst of load from elsewhere hits both alike."""
    steps = {impl: warm_step(preset, impl, dtype, batch, seq, args.device, args.compile)
             for impl in IMPLS}
    best = dict.fromkeys(IMPLS, float("inf"))
    for i in range(args.steps):
        for impl in (IMPLS if i % 2 == 0 else IMPLS[::-1]):
            best[impl] = min(best[impl], steps[impl]())
    return {impl: batch * seq / best[impl] for impl in IMPLS}


def worker(preset: str, impl: str, dtype: str, batch: int, seq: int, device: str,
           compile_: bool) -> dict:
    """Peak memory of one forward+backward pass of one implementation (own process)."""
    step = warm_step(preset, impl, dtype, batch, seq, device, compile_)
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    step()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss_kib("VmHWM") * 1024
    return {"peak_mib": (peak - base) / 2**20}


def run_worker(args: argparse.Namespace, preset: str, impl: str, dtype: str, batch: int,
               seq: int) -> dict:
    """Run :func:`worker` in a fresh Python process and return its result."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(
        [preset, impl, dtype, batch, seq, args.device, args.compile])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {preset}/{impl}/{dtype} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def flops_per_token_at(preset: str, seq: int) -> float:
    """GPT.flops_per_token's formula with the attention term at the benchmarked length."""
    with torch.device("meta"):
        model = GPT(model_config(preset, context_length=seq))
    return model.flops_per_token()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,small,gpt-60m")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per implementation")
    parser.add_argument("--out", default="bench/results/model.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return 0

    peak_tflops = None
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if name.startswith(k)), None)
    rows = []
    header = (f"{'preset':9} {'dtype':5} {'batch x seq':>11} | {'ours tok/s':>10} "
              f"{'llama tok/s':>11} {'ratio':>6} | {'ours MiB':>8} {'llama MiB':>9}")
    print(header + ("  MFU ours / llama" if peak_tflops else ""))
    print("-" * len(header))
    for dtype in args.dtypes.split(","):
        for preset in args.presets.split(","):
            if preset not in SHAPES[(args.device, dtype)]:
                print(f"{preset:9} {dtype:5} skipped on {args.device} (see SHAPES)")
                continue
            batch, seq = SHAPES[(args.device, dtype)][preset]
            speed = time_row(args, preset, dtype, batch, seq)
            ours, hf = ({"tokens_per_s": speed[impl],
                         **run_worker(args, preset, impl, dtype, batch, seq)} for impl in IMPLS)
            row = {"preset": preset, "dtype": dtype, "batch": batch, "seq": seq,
                   "ours": ours, "hf_llama": hf,
                   "speed_ratio": ours["tokens_per_s"] / hf["tokens_per_s"]}
            line = (f"{preset:9} {dtype:5} {f'{batch} x {seq}':>11} | "
                    f"{ours['tokens_per_s']:10.0f} {hf['tokens_per_s']:11.0f} "
                    f"{row['speed_ratio']:6.2f} | {ours['peak_mib']:8.0f} {hf['peak_mib']:9.0f}")
            if peak_tflops:
                fpt = flops_per_token_at(preset, seq)
                row["mfu"] = {k: fpt * v["tokens_per_s"] / (peak_tflops * 1e12)
                              for k, v in (("ours", ours), ("hf_llama", hf))}
                line += f"  {row['mfu']['ours']:.1%} / {row['mfu']['hf_llama']:.1%}"
            print(line, flush=True)
            rows.append(row)
    result = {
        "benchmark": "model forward+backward", "device": args.device, "compile": args.compile,
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "steps": args.steps,
        "peak_tflops": peak_tflops, "rows": rows,
    }
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
