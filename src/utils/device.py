"""Where and in what precision a model runs, and the generator its sampling draws from.

The one home of these choices for every command (train.py, chat.py, evaluate.py,
src/infer/generate.py) and the benchmarks, so ``--device`` and ``--dtype`` mean the same
thing everywhere.
"""

from __future__ import annotations

import functools
import os
import platform
import time

import torch

from src.utils.cli import UserError


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def pick_device(name: str) -> torch.device:
    """``--device NAME`` -> a torch.device. ``auto``: CUDA, else MPS if available, else CPU.

    A name that is no device (``banana``) or a device this machine lacks (``cuda`` without a
    GPU, ``mps`` off a Mac) is a one-line UserError naming the flag.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "mps" and not _mps_available():
        raise UserError(f"--device {name}: MPS is not available on this machine (use --device cpu)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: not supported (use auto, cpu, cuda, cuda:N or mps)")
    return device


# CPU feature flags that mean native bf16 matrix multiplies (Linux names, /proc/cpuinfo).
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# bf16 must beat fp32 by this factor in the probe to be chosen: native bf16 runs ~2-4x fp32.
BF16_MIN_SPEEDUP = 1.3


def cpuinfo_field(name: str) -> str | None:
    """The value of the first ``name`` line of /proc/cpuinfo (``flags``, ``model name``,
    ``siblings``, ...); None where it or the file is missing (macOS, Windows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``avx2``, ``avx512_bf16``, ...); empty where unknown."""
    return frozenset((cpuinfo_field("flags") or "").split())


def bf16_matmul_speedup(n: int = 512, repeats: int = 3) -> float:
    """Measured here and now: seconds of an n x n x n fp32 matmul / seconds of the same in bf16
    (the best of ``repeats`` each, after one warm-up). Above 1: bf16 is faster."""

    def best(dtype: torch.dtype) -> float:
        generator = torch.Generator().manual_seed(0)  # never the global RNG: runs stay reproducible
        a = torch.randn(n, n, generator=generator).to(dtype)
        b = torch.randn(n, n, generator=generator).to(dtype)
        a @ b
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX-512 BF16 / AMX): its flags must say so
    and a short probe (:func:`bf16_matmul_speedup`, ~0.1 s) must find bf16 at least
    BF16_MIN_SPEEDUP x faster than fp32. Without them (e.g. an AVX2-only CPU) oneDNN emulates
    bf16, measured here at ~100x slower than fp32. Where no flags can be read, oneDNN's own
    check stands in for them. Decided once per process."""
    flags = cpu_flags()
    if flags:
        if not flags & BF16_FLAGS:
            return False  # no probe needed: emulated bf16 can only lose
    else:
        try:
            if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
                return False
        except (AttributeError, RuntimeError):
            return False
    return bf16_matmul_speedup() >= BF16_MIN_SPEEDUP


@functools.cache  # once per process and dtype: the machine does not change
def matmul_flops(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of a size x size x size matrix multiply in ``dtype`` on this CPU, measured for
    about ``seconds``: the machine's own peak that training speed is compared with."""
    # Its own generator: drawing from the global one would shift a seeded run's dropout masks
    # (and only in the first run of a process, because of the cache).
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    torch.mm(a, b)  # warm-up: thread pool, caches
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        torch.mm(a, b)
        n += 1
    return 2.0 * size**3 * n / elapsed


def cpu_description() -> str:
    """What the precision choice on this CPU rests on, for logs and benchmark tables, e.g.
    ``AMD EPYC, 2 threads, avx2 fma, no avx512_bf16/amx_bf16``."""
    name = cpuinfo_field("model name") or platform.processor() or platform.machine()
    flags = cpu_flags()
    shown = " ".join(sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
    missing = sorted(BF16_FLAGS - flags)
    flag_text = (shown or "flags unknown") + (f", no {'/'.join(missing)}" if flags and missing else "")
    return f"{name}, {torch.get_num_threads()} threads, {flag_text}"


def cpu_threads() -> int:
    """Threads for CPU math: one per physical core this process may run on (hyper-threads share
    a core's vector units, so a second thread per core only contends). ``OMP_NUM_THREADS``,
    when set, is the user's choice and wins."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    siblings, cores = cpuinfo_field("siblings"), cpuinfo_field("cpu cores")
    # "siblings": logical CPUs per package; "cpu cores": physical ones.
    smt = siblings and cores and siblings.isdigit() and cores.isdigit() and int(cores) > 0
    per_core = max(1, int(siblings) // int(cores)) if smt else 1
    return max(1, usable // per_core)


def pick_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """``--dtype NAME`` -> the autocast dtype (None = plain fp32). ``auto``: bf16 on GPUs that
    support it and on CPUs with native bf16 matmuls, else fp32 (fp16 on older GPUs)."""
    if name == "fp32":
        return None
    if name == "fp16":
        return torch.float16
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None  # auto on MPS: fp32


def make_generator(seed: int | None, device: str | torch.device) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (same seed, same draws), or from the
    operating system's entropy when ``seed`` is None."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
