"""src/utils/device.py: one rule for --device and --dtype, seeded generators."""

import os

import pytest
import torch

from src.utils import device
from src.utils.cli import UserError
from src.utils.device import make_generator, pick_device, pick_dtype


def test_pick_device_auto_and_cpu():
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert pick_device("auto") == torch.device(expected)
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["banana", "cuda:x", "meta"])
def test_pick_device_rejects_what_is_no_device(name):
    with pytest.raises(UserError, match=f"--device {name}"):
        pick_device(name)


@pytest.mark.parametrize(
    "name, available",
    [("cuda", torch.cuda.is_available()), ("cuda:1", torch.cuda.device_count() > 1),
     ("mps", torch.backends.mps.is_available())],
)
def test_pick_device_rejects_an_absent_device(name, available):
    if available:
        pytest.skip(f"this machine has {name}")
    with pytest.raises(UserError, match=f"--device {name}: .* not available"):
        pick_device(name)


def test_pick_dtype():
    cpu = torch.device("cpu")
    assert pick_dtype("fp32", cpu) is None
    assert pick_dtype("bf16", cpu) is torch.bfloat16
    assert pick_dtype("fp16", cpu) is torch.float16
    assert pick_dtype("auto", cpu) in (None, torch.bfloat16)


def test_make_generator_same_seed_same_draws():
    a, b = make_generator(3, "cpu"), make_generator(3, "cpu")
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    c, d = make_generator(None, "cpu"), make_generator(None, "cpu")
    assert not torch.equal(torch.rand(5, generator=c), torch.rand(5, generator=d))


# ---- run-time precision and thread choices on a CPU (mocked both ways) ------------------------


@pytest.fixture
def fresh_detection():
    """The detection caches its answer per process: start and end each test without it."""
    cached = (device.cpu_flags, device.cpu_has_fast_bf16)
    for function in cached:
        function.cache_clear()
    yield
    for function in cached:  # tests may have replaced the module's names: clear the originals
        function.cache_clear()


def test_avx2_cpu_gets_fp32_without_a_probe(monkeypatch, fresh_detection):
    """No native-bf16 flag: fp32, and the (slow, emulated) bf16 probe is never run."""
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    monkeypatch.setattr(device, "bf16_matmul_speedup", lambda: pytest.fail("probed an AVX2 CPU"))
    assert device.cpu_has_fast_bf16() is False
    assert device.pick_dtype("auto", torch.device("cpu")) is None
    assert device.pick_dtype("bf16", torch.device("cpu")) is torch.bfloat16  # asked for: obeyed


@pytest.mark.parametrize("flag", sorted(device.BF16_FLAGS))
def test_bf16_cpu_gets_bf16_when_the_probe_agrees(monkeypatch, fresh_detection, flag):
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2", flag}))
    monkeypatch.setattr(device, "bf16_matmul_speedup", lambda: 3.7)
    assert device.pick_dtype("auto", torch.device("cpu")) is torch.bfloat16
    assert device.pick_dtype("fp32", torch.device("cpu")) is None


def test_bf16_flag_but_slow_probe_gets_fp32(monkeypatch, fresh_detection):
    """A flag is not enough (a hypervisor may report one the CPU cannot deliver): the probe decides."""
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setattr(device, "bf16_matmul_speedup", lambda: 0.9)
    assert device.cpu_has_fast_bf16() is False
    assert device.pick_dtype("auto", torch.device("cpu")) is None


def test_without_cpuinfo_onednn_and_the_probe_decide(monkeypatch, fresh_detection):
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset())
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    monkeypatch.setattr(device, "bf16_matmul_speedup", lambda: pytest.fail("probed needlessly"))
    assert device.cpu_has_fast_bf16() is False
    device.cpu_has_fast_bf16.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(device, "bf16_matmul_speedup", lambda: 2.0)
    assert device.cpu_has_fast_bf16() is True


def test_probe_measures_real_matmuls():
    speedup = device.bf16_matmul_speedup(n=64, repeats=2)
    assert speedup > 0 and speedup != 1.0


def test_cpu_flags_are_read_from_cpuinfo(fresh_detection):
    flags = device.cpu_flags()
    if os.path.exists("/proc/cpuinfo"):
        assert "fpu" in flags or "fp" in flags or flags  # x86 lists fpu; Arm lists fp
    assert device.cpu_description().count(",") >= 1


def test_cpu_threads_one_per_physical_core(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    cpuinfo = {"siblings": "8", "cpu cores": "4"}
    monkeypatch.setattr(device, "cpuinfo_field", cpuinfo.get)
    assert device.cpu_threads() == 4  # 8 logical CPUs, 2 hyper-threads per core
    cpuinfo.update({"siblings": "2", "cpu cores": "2"})
    assert device.cpu_threads() == 8  # no SMT: every usable CPU
    cpuinfo.clear()
    assert device.cpu_threads() == 8  # nothing known about SMT: every usable CPU
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert device.cpu_threads() == 3  # the user's choice wins
