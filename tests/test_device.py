"""src/utils/device.py: one rule for --device and --dtype, seeded generators."""

import pytest
import torch

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
