"""src/training/optim.py: our Muon (Newton-Schulz in the machine's native precision)."""

import math

import pytest
import torch

from src.training.optim import Muon, native_matmul_dtype, orthogonalize


def test_orthogonalize_flattens_the_singular_values():
    """The update has g's singular vectors and singular values near 1 (not exactly: the quintic
    iteration trades exactness for speed), for wide and tall matrices alike."""
    gen = torch.Generator().manual_seed(0)
    for shape in ((32, 96), (96, 32)):
        g = torch.randn(*shape, generator=gen) * torch.logspace(-1, 1, shape[1])  # condition ~100
        o = orthogonalize(g)
        assert o.shape == g.shape and o.dtype == torch.float32
        s = torch.linalg.svdvals(o)
        assert s.min() > 0.5 and s.max() < 1.25, s
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        # Same subspaces: projecting o onto g's singular vectors keeps nearly all of it.
        assert (u.T @ o @ vh.T).diagonal().sum() > 0.9 * s.sum()


def test_muon_matches_torch_muon_in_bf16():
    """With ns_dtype=bf16 ours is torch.optim.Muon(adjust_lr_fn="match_rms_adamw") step for step."""
    gen = torch.Generator().manual_seed(1)
    ours = torch.nn.Parameter(torch.randn(24, 40, generator=gen))
    theirs = torch.nn.Parameter(ours.detach().clone())
    a = Muon([ours], lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16)
    b = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                         adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        grad = torch.randn(24, 40, generator=gen)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert a.state[ours]["momentum_buffer"].shape == (24, 40)


def test_muon_fp32_is_close_to_bf16_and_its_update_has_adamw_rms():
    gen = torch.Generator().manual_seed(2)
    start = torch.randn(64, 128, generator=gen)
    grad = torch.randn(64, 128, generator=gen)
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.nn.Parameter(start.clone())
        w.grad = grad.clone()
        Muon([w], lr=1e-3, ns_dtype=dtype).step()
        moved[dtype] = (w.detach() - start) / 1e-3
    rms = moved[torch.float32].pow(2).mean().sqrt().item()
    assert 0.1 < rms < 0.3  # 0.2 * sqrt(128) * (RMS of an orthogonal 64 x 128 ~ 1/sqrt(128))
    assert (moved[torch.float32] - moved[torch.bfloat16]).abs().max() < 0.02 * math.sqrt(128)


def test_muon_refuses_what_is_not_a_matrix():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.ones(5))], lr=0.1)


def test_muon_runs_in_the_native_precision(monkeypatch):
    from src.utils import device

    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    assert native_matmul_dtype(torch.device("cpu")) is torch.float32
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    assert native_matmul_dtype(torch.device("cpu")) is torch.bfloat16


def test_muon_iterates_in_bf16_only_when_the_run_trains_in_native_bf16(monkeypatch):
    from src.model.gpt import GPT
    from src.training.config import TrainConfig
    from src.training.optim import build_optimizers
    from src.training.presets import model_config
    from src.utils import device

    model = GPT(model_config("tiny", vocab_size=64))
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    assert build_optimizers(model, TrainConfig(dtype="auto"))[0].ns_dtype is torch.bfloat16
    assert build_optimizers(model, TrainConfig(dtype="fp32"))[0].ns_dtype is torch.float32
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    assert build_optimizers(model, TrainConfig(dtype="auto"))[0].ns_dtype is torch.float32
    assert build_optimizers(model, TrainConfig(dtype="bf16"))[0].ns_dtype is torch.float32
