"""Data-aware training: the run plan (train.py --plan, the start line and its warnings, epochs in
the summary), early stopping with the best checkpoint marked, and choosing a checkpoint."""

from __future__ import annotations

import json
import math
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from src import checkpoint as reader
from src.model.gpt import GPT
from src.training import checkpoint as ck
from src.training.batches import BatchLoader, open_tokens, windows_per_epoch
from src.training.config import make_config
from src.training.loop import TrainLoop
from src.training.optim import build_optimizers
from src.training.plan import count_params, flops_per_token, make_plan
from src.training.presets import PRESETS, model_config
from src.training.trainer import train
from src.utils.cli import UserError
from tests.fixtures import RepeatedBatch, make_token_data, tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_token_data(tmp_path_factory.mktemp("data"))


# ---------------------------------------------------------------------------------------------
# The plan


@pytest.mark.parametrize("name", list(PRESETS))
def test_analytic_counts_equal_the_model(name):
    for overrides in ({}, {"tie_embeddings": False, "n_kv_head": 1, "vocab_size": 500}):
        cfg = model_config(name, context_length=64, **overrides)
        model = GPT(cfg)
        assert count_params(cfg) == model.num_params()
        assert flops_per_token(cfg) == model.flops_per_token()


def test_plan_arithmetic_and_warning():
    cfg = make_config(dict(preset="tiny", max_steps=1000, batch_size=4, tokens_per_step=600,
                           max_epochs=5, device="cpu"))
    mcfg = model_config("tiny", vocab_size=300)
    plan = make_plan(cfg, mcfg, train_tokens=64 * 101 + 10, device=torch.device("cpu"))
    # 600 tokens/step rounds to 2 micro-batches of 4 x 64 = 512; 100 windows per epoch.
    assert (plan.grad_accum, plan.tokens_per_step, plan.steps) == (2, 512, 1000)
    assert plan.tokens == 512_000 and plan.epochs == pytest.approx(1000 * 8 / 100)
    assert plan.estimated_seconds > 0 and plan.estimate_basis.startswith("FLOP-based")
    (warning,) = plan.warnings
    # The numbers and the fix: 5 epochs of 100 windows of 64 = 32,000 tokens = 62 steps.
    assert "80.0 passes" in warning and "max_epochs 5" in warning and "--max-steps 62" in warning
    assert plan.lines()[1] == f"warning: {warning}"
    ok = make_plan(make_config(dict(preset="tiny", max_steps=50, max_epochs=5)), mcfg, 64 * 101 + 10,
                   torch.device("cpu"))
    assert ok.warnings == []
    # The time budget plans the steps (estimated, then re-planned from the measured speed).
    budget = make_plan(make_config(dict(preset="small", time_budget=1.0)), model_config("small"),
                       10**6, torch.device("cpu"))
    assert budget.steps_from == "time_budget" and 1 <= budget.steps < PRESETS["small"].train.get(
        "max_steps", 100_000)
    assert budget.estimated_seconds == 60
    with pytest.raises(UserError, match="too few for context length 64"):
        make_plan(cfg, mcfg, train_tokens=100, device=torch.device("cpu"))


def test_plan_cli_prints_one_json_line_and_writes_nothing(data_dir, tmp_path, monkeypatch, capsys):
    from train import main as train_main

    before = {p: p.stat().st_mtime_ns for p in data_dir.iterdir()}
    monkeypatch.chdir(tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("--plan must not build or compile a model")

    monkeypatch.setattr(GPT, "__init__", forbidden)
    monkeypatch.setattr(torch, "compile", forbidden)
    assert train_main(["--preset", "tiny", "--data", str(data_dir), "--max-steps", "300",
                       "--max-epochs", "2", "--device", "cpu", "--plan"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    plan = json.loads(lines[0])
    train_tokens = len(open_tokens(data_dir, "train"))
    windows = windows_per_epoch(train_tokens, 64)
    monkeypatch.undo()
    assert plan["params"] == GPT(model_config("tiny", vocab_size=300)).num_params()
    assert plan["train_tokens"] == train_tokens and plan["steps"] == 300
    assert plan["tokens_per_step"] == 512 and plan["tokens"] == 300 * 512
    assert plan["epochs"] == pytest.approx(300 * 8 / windows, abs=1e-3)
    assert plan["epochs"] > 2 and "--max-steps" in plan["warnings"][0]
    assert plan["estimated_seconds"] > 0 and "FLOP-based" in plan["estimate_basis"]
    assert list(tmp_path.iterdir()) == []  # no runs/ folder, nothing written
    assert {p: p.stat().st_mtime_ns for p in data_dir.iterdir()} == before


def test_training_prints_the_plan_and_reports_epochs(data_dir, tmp_path, capsys):
    summary = train(tiny_config(data_dir, tmp_path / "run", max_steps=4, max_epochs=0.01))
    out = capsys.readouterr().out
    windows = windows_per_epoch(len(open_tokens(data_dir, "train")), 64)
    epochs = 4 * 4 / windows  # 4 steps of 4 windows
    assert summary["epochs"] == pytest.approx(epochs)
    assert f"= {epochs:.2f} epochs of the" in out and "estimated" in out
    assert "warning: 4 steps x 256 tokens" in out and "max_epochs 0.01" in out
    assert f"{epochs:.2f} epochs of the training data seen" in out


# ---------------------------------------------------------------------------------------------
# Early stopping


def fixed_batches() -> RepeatedBatch:
    """The same micro-batch every step: the loop's bookkeeping is what is under test."""
    ids = torch.randint(0, 300, (2, 65), generator=torch.Generator().manual_seed(0))
    return RepeatedBatch(ids[:, :-1], ids[:, 1:])


def test_early_stop_after_patience_keeps_the_best(tmp_path):
    torch.manual_seed(0)
    cfg = make_config(dict(preset="tiny", run_dir=str(tmp_path), max_steps=40, eval_interval=2,
                           early_stop_patience=3, keep_last=1, warmup_steps=0, device="cpu",
                           dtype="fp32", progress=False, tensorboard=False, plot=False))
    val_losses = iter([5.0, 4.0, 3.0, 3.5, 3.2, 3.0, 2.9, 9.9])  # best 3.0 at step 6, then 3 worse

    def make_loop(resume=None):
        model = GPT(model_config("tiny", vocab_size=300))
        optimizers = build_optimizers(model, cfg)
        state = ck.load_checkpoint(resume, model, optimizers) if resume else None
        return TrainLoop(cfg, model=model, raw_model=model, optimizers=optimizers,
                         batches=fixed_batches(), evaluate=lambda: {"val_loss": next(val_losses)},
                         eval_tokens=0, device=torch.device("cpu"), resume_state=state)

    loop = make_loop()
    reason = loop.run()
    assert loop.step == 12 and loop.stopped_early  # evaluations at 8, 10, 12 brought nothing better
    assert reason.startswith("early stop at step 12: no better val loss in 3 evaluations")
    assert "best val loss 3.0000 at step 6" in reason
    best = reader.best_checkpoint(tmp_path)
    assert best.name == "step_0000006" and reader.read_state(best)["val_loss"] == 3.0
    assert reader.latest_checkpoint(tmp_path).name == "step_0000012"
    # Resuming an early-stopped run does not train on.
    again = make_loop(reader.latest_checkpoint(tmp_path))
    assert again.run().startswith("already stopped early at step 12") and again.step == 12


def test_early_stop_on_a_tiny_run_that_overfits(tmp_path, capsys):
    # Three training documents: a tiny model memorises them and its validation loss turns up.
    data = make_token_data(tmp_path / "data", train_docs=3, val_docs=40)
    summary = train(tiny_config(data, tmp_path / "run", max_steps=400, eval_interval=10,
                                lr=1e-2, warmup_steps=5, early_stop_patience=2, eval_tokens=1024,
                                sample_tokens=0))
    assert summary["end_reason"].startswith("early stop at step") and summary["step"] < 400
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r]
    best_step, best_val = min(evals, key=lambda e: e[1])
    assert [v for _, v in evals[-2:]] > [best_val, best_val] and evals[-3][0] == best_step
    assert reader.best_checkpoint(tmp_path / "run").name == reader.checkpoint_name(best_step)
    # Loading the run gives the best checkpoint, not the (worse) last one.
    _, _, info = reader.load_model(tmp_path / "run")
    assert info["step"] == best_step and summary["best_val_loss"] == pytest.approx(best_val)
    assert "continue:" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Choosing a checkpoint: best (default), latest, a step, or a folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("choice")
    run = Path(train(tiny_config(data_dir, tmp / "run", max_steps=6, eval_interval=2,
                                 sample_tokens=0))["run_dir"])
    # Mark step 2 as the best, whatever the losses were, so best and latest differ.
    (run / "checkpoints" / "best").write_text("step_0000002\n")
    return run


def test_resolve_checkpoint_choices(run_dir):
    assert reader.resolve_checkpoint(run_dir).name == "step_0000002"  # best by default
    assert reader.resolve_checkpoint(run_dir, "best").name == "step_0000002"
    assert reader.resolve_checkpoint(run_dir, "latest").name == "step_0000006"
    assert reader.resolve_checkpoint(run_dir, "4").name == "step_0000004"
    with pytest.raises(UserError, match=r"no complete checkpoint of step 5 .*steps there: 2, 4, 6"):
        reader.resolve_checkpoint(run_dir, "5")
    with pytest.raises(UserError, match="expected best, latest, a step number"):
        reader.resolve_checkpoint(run_dir, "newest")
    folder = run_dir / "checkpoints" / "step_0000004"
    assert reader.checkpoint_from_args(None, str(folder)) == folder
    assert reader.checkpoint_from_args(str(run_dir), "latest").name == "step_0000006"
    with pytest.raises(UserError, match="names a checkpoint folder on its own"):
        reader.checkpoint_from_args(str(run_dir), str(folder))


def test_chat_generate_and_evaluate_load_the_chosen_checkpoint(run_dir, tmp_path, capsys):
    from src.infer.generate import load_model_from_args

    _, _, info = load_model_from_args(Namespace(run=str(run_dir), checkpoint=None, device="cpu"))
    assert info["checkpoint"].name == "step_0000002"  # chat.py and generate.py: best by default
    _, _, info = load_model_from_args(Namespace(run=str(run_dir), checkpoint="6", device="cpu"))
    assert info["step"] == 6
    from tests.test_evaluate import cli, make_release_dir

    data = make_release_dir(tmp_path / "release")
    for choice, step in ((None, 2), ("latest", 6)):  # evaluate.py: best by default
        out = tmp_path / f"eval-{choice}.json"
        argv = ["--run", str(run_dir), "--data-dir", str(data), "--device", "cpu", "--json",
                str(out), "--no-progress", "--tasks", "dailydialog"]
        code, _, err = cli(argv + (["--checkpoint", choice] if choice else []), capsys)
        assert code == 0, err
        assert json.loads(out.read_text())["checkpoint"].endswith(reader.checkpoint_name(step))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_batches_are_pinned_for_cuda(data_dir):
    loader = BatchLoader(open_tokens(data_dir, "train"), 64, 2, pin_memory=True)
    x, y = loader.next_batch()[0]
    assert x.is_pinned() and y.is_pinned()
    assert not math.isnan(float(x.float().mean()))
