"""The training loop: exact resume, interruptions, guards, metrics, config and schedules."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from src import checkpoint as reader
from src.training import checkpoint as ck
from src.training.config import (
    TrainConfig,
    build_parser,
    load_config_file,
    make_config,
    resolve_config,
)
from src.training.loop import NonFiniteLoss
from src.training.optim import build_optimizers, lr_at
from src.training.presets import PRESETS, model_config
from src.training.time_budget import BUDGET_RESERVE, plan_steps
from src.training.trainer import train
from src.utils.cli import UserError
from tests.fixtures import RepeatedBatch, make_token_data, tiny_config

ROOT = Path(__file__).resolve().parents[1]
# One thread: tiny models gain nothing from two, and the shared cores stay free for others.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_token_data(tmp_path_factory.mktemp("data"))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


# ---------------------------------------------------------------------------------------------
# Exact resume


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_is_bit_identical(data_dir, tmp_path, dtype):
    # Dropout on and gradient accumulation on: RNG and data position must both be restored.
    common = dict(max_steps=6, eval_interval=3, dropout=0.1, tokens_per_step=2 * 4 * 64, dtype=dtype)
    straight = train(tiny_config(data_dir, tmp_path / "a", **common))["run_dir"]
    train(tiny_config(data_dir, tmp_path / "b", stop_at_step=3, **common))
    assert reader.latest_checkpoint(tmp_path / "b").name == "step_0000003"
    assert max(s for s, _ in train_losses(tmp_path / "b")) == 3
    train(tiny_config(data_dir, tmp_path / "b", resume=True, **common))
    a, b = train_losses(straight), train_losses(tmp_path / "b")
    assert [s for s, _ in a] == list(range(1, 7))
    assert a == b  # exact float equality, step by step
    val_a = [r["val_loss"] for r in read_metrics(straight) if "val_loss" in r]
    val_b = [r["val_loss"] for r in read_metrics(tmp_path / "b") if "val_loss" in r]
    assert val_a == val_b and len(val_a) == 2
    wa = load_file(str(reader.latest_checkpoint(straight) / "model.safetensors"))
    wb = load_file(str(reader.latest_checkpoint(tmp_path / "b") / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_without_checkpoint_starts_fresh(data_dir, tmp_path, capsys):
    train(tiny_config(data_dir, tmp_path / "r", resume=True, max_steps=2))
    assert "starting fresh" in capsys.readouterr().out
    assert reader.latest_checkpoint(tmp_path / "r").name == "step_0000002"
    # Training into a run that has checkpoints without --resume is refused.
    with pytest.raises(UserError, match="--resume"):
        train(tiny_config(data_dir, tmp_path / "r", max_steps=2))


def test_resume_with_other_tokenizer_is_refused(data_dir, tmp_path):
    train(tiny_config(data_dir, tmp_path / "r", max_steps=2))
    other = make_token_data(tmp_path / "other", vocab_size=290)
    with pytest.raises(UserError, match="tokenizer"):
        train(tiny_config(other, tmp_path / "r", max_steps=4, resume=True))


# ---------------------------------------------------------------------------------------------
# Guards and interruptions


def test_non_finite_loss_stops_and_keeps_last_checkpoint(data_dir, tmp_path):
    def inject(step, loss):
        return loss * float("nan") if step == 4 else loss  # step index 4 = the 5th step

    cfg = tiny_config(data_dir, tmp_path / "r", max_steps=10, checkpoint_interval=2, eval_interval=100)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 5.*step_0000004"):
        train(cfg, loss_hook=inject)
    latest = reader.latest_checkpoint(tmp_path / "r")
    assert latest.name == "step_0000004"
    model, _, info = reader.load_model(tmp_path / "r")
    assert info["step"] == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # The run resumes from it normally.
    assert train(tiny_config(data_dir, tmp_path / "r", max_steps=6, resume=True))["step"] == 6


def test_huge_lr_stops_with_clear_message(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path / "r", max_steps=30, lr=1e30, warmup_steps=0, grad_clip=0.0,
                      checkpoint_interval=1, eval_interval=1000)
    with pytest.raises(NonFiniteLoss, match="non-finite .* at step .*Last good checkpoint") as exc:
        train(cfg)
    assert "\n" not in str(exc.value)
    _, _, info = reader.load_model(tmp_path / "r")  # the last good checkpoint loads
    assert info["step"] >= 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_in_process_saves_and_returns(data_dir, tmp_path, sig):
    def send(step, loss):
        if step == 2:
            os.kill(os.getpid(), sig)  # arrives mid-run, like Ctrl-C
        return loss

    res = train(tiny_config(data_dir, tmp_path / "r", max_steps=50, eval_interval=100), loss_hook=send)
    assert res["step"] == 3 and "interrupted" in res["end_reason"] and sig.name in res["end_reason"]
    assert reader.latest_checkpoint(tmp_path / "r").name == "step_0000003"
    assert signal.getsignal(sig) is not None  # handlers restored
    assert train(tiny_config(data_dir, tmp_path / "r", max_steps=5, resume=True))["step"] == 5


class SignalAtForward:
    """Sends ``signals`` to this process as the model's ``at``-th forward pass starts (a
    micro-batch of training), like a Ctrl-C in the middle of an accumulated step."""

    def __init__(self, at: int, signals=(signal.SIGINT,)):
        self.at, self.signals, self.calls = at, signals, 0

    def __enter__(self):
        def hook(module, _inputs):
            if type(module).__name__ == "GPT" and torch.is_grad_enabled():  # training, not sampling
                self.calls += 1
                if self.calls == self.at:
                    for sig in self.signals:
                        os.kill(os.getpid(), sig)

        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


ACCUMULATED = dict(tokens_per_step=4 * 4 * 64, batch_size=4, dropout=0.1, eval_interval=100)  # 4 micro-batches


def test_ctrl_c_mid_step_stops_within_a_micro_batch_and_resumes_exactly(data_dir, tmp_path):
    straight = train(tiny_config(data_dir, tmp_path / "a", max_steps=6, **ACCUMULATED))["run_dir"]
    with SignalAtForward(at=10) as probe:  # step 3, its second micro-batch
        res = train(tiny_config(data_dir, tmp_path / "b", max_steps=6, **ACCUMULATED))
    assert probe.calls == 10  # no further micro-batch (and no evaluation) after the signal
    assert res["step"] == 2 and "step 3, in progress, was dropped" in res["end_reason"]
    assert reader.latest_checkpoint(tmp_path / "b").name == "step_0000002"
    # The dropped step left no trace: resuming gives exactly the uninterrupted run.
    train(tiny_config(data_dir, tmp_path / "b", max_steps=6, resume=True, **ACCUMULATED))
    assert train_losses(straight) == train_losses(tmp_path / "b")


def test_second_ctrl_c_stops_at_once_saying_what_was_saved(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path / "r", max_steps=6, checkpoint_interval=1, **ACCUMULATED)
    with SignalAtForward(at=10, signals=(signal.SIGINT, signal.SIGINT)) as probe, \
            pytest.raises(KeyboardInterrupt) as exc:
        train(cfg)
    assert probe.calls == 10
    assert str(exc.value) == (f"second SIGINT: stopped at once; last checkpoint "
                              f"{tmp_path / 'r' / 'checkpoints' / 'step_0000002'} (step 2); "
                              "step 3 (in progress) not saved")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_a_run_that_trained_no_step_leaves_no_run_folder(data_dir, tmp_path):
    with SignalAtForward(at=2):  # Ctrl-C during the first step
        res = train(tiny_config(data_dir, tmp_path / "r", max_steps=6, **ACCUMULATED))
    assert res["step"] == 0 and not (tmp_path / "r").exists()

    def nan_at_once(step, loss):
        return loss * float("nan")

    with pytest.raises(NonFiniteLoss):
        train(tiny_config(data_dir, tmp_path / "r", max_steps=6), loss_hook=nan_at_once)
    assert not (tmp_path / "r").exists()
    # A user's own files in a given --run-dir are left alone.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(NonFiniteLoss):
        train(tiny_config(data_dir, tmp_path / "mine", max_steps=6), loss_hook=nan_at_once)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_impossible_context_length_is_refused_with_the_numbers(data_dir, tmp_path):
    with pytest.raises(UserError, match=r"--context-length 1000000 x --batch-size 4 cannot fit: one "
                       r"training micro-batch needs at least [\d.]+ GiB \(logits [\d.]+, .*\) but this "
                       r"cpu has [\d.]+ GiB; lower --context-length or --batch-size"):
        train(tiny_config(data_dir, tmp_path / "r", context_length=1_000_000))
    assert not (tmp_path / "r").exists()


def test_progress_bar_moves_within_an_accumulated_step(tmp_path, capsys):
    from src.training.observe import RunLog

    with RunLog(tmp_path, main=True, resume_step=None, total=10, initial=0, progress=True,
                tensorboard=False, plot=False, title="t") as log:
        log.micro_batch(0, 0.25)
        assert log.bar.n == 0.25
        log.micro_batch(0, 0.75)
        log.step({"step": 1, "loss": 1.0}, "loss 1.0")
        assert log.bar.n == 1 and isinstance(log.bar.n, int)
        log.micro_batch(1, 0.5)
        assert log.bar.n == 1.5


@pytest.mark.slow
def test_sigterm_to_real_process_saves_checkpoint_and_exits_cleanly(data_dir, tmp_path):
    sig = signal.SIGTERM
    run = tmp_path / "r"
    proc = subprocess.Popen(
        [sys.executable, "train.py", "--preset", "tiny", "--data", str(data_dir), "--run-dir", str(run),
         "--max-steps", "100000", "--seed", "0", "--no-progress", "--no-tensorboard", "--no-plot",
         "--eval-interval", "100000", "--batch-size", "4", "--tokens-per-step", "256"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "interrupted" in out and "Traceback" not in err
    last_step = train_losses(run)[-1][0]
    assert reader.latest_checkpoint(run).name == reader.checkpoint_name(last_step)
    assert reader.read_state(reader.latest_checkpoint(run))["step"] == last_step


# ---------------------------------------------------------------------------------------------
# Observability


def test_metrics_plot_and_tensorboard(data_dir, tmp_path):
    pytest.importorskip("matplotlib")
    cfg = tiny_config(data_dir, tmp_path / "r", max_steps=4, eval_interval=2, plot=True, tensorboard=True)
    train(cfg)
    records = read_metrics(tmp_path / "r")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= set(r)
        assert math.isfinite(r["loss"]) and r["tokens"] == r["step"] * 256
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert 0 < r["val_bpb"] < 10
    assert (tmp_path / "r" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["max_steps"] == 4 and saved["preset"] == "tiny"
    assert (tmp_path / "r" / "tokenizer.json").read_bytes() == (data_dir / "tokenizer.json").read_bytes()
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return
    assert list((tmp_path / "r" / "tensorboard").glob("events.out.tfevents.*"))


def test_muon_trains(data_dir, tmp_path):
    res = train(tiny_config(data_dir, tmp_path / "m", optimizer="muon", max_steps=12, eval_interval=6,
                            lr=0.01, warmup_steps=2))
    losses = [loss for _, loss in train_losses(res["run_dir"])]
    assert losses[-1] < losses[0] - 0.5
    state = reader.read_state(reader.latest_checkpoint(res["run_dir"]))
    assert state["optimizers"] == ["Muon", "AdamW"]


def test_time_budget_plans_steps():
    # 0.1 s/step, evaluation costs a third of a step per training-step-sized chunk, every 10 steps.
    n = plan_steps(step=9, per_step=0.1, eval_tokens=1000, tokens_per_step=1000, eval_interval=10,
                   spent=2.0, budget_s=100.0, warmup_steps=5, max_steps=10**6)
    assert n == 9 + int((100 * (1 - BUDGET_RESERVE) - 2.0) / (0.1 + 0.1 / 3 / 10))
    assert plan_steps(step=9, per_step=0.1, eval_tokens=0, tokens_per_step=1000, eval_interval=10,
                      spent=2.0, budget_s=100.0, warmup_steps=5, max_steps=50) == 50
    # Out of time already: at least finish the warmup and one more step.
    assert plan_steps(step=9, per_step=5.0, eval_tokens=0, tokens_per_step=1000, eval_interval=10,
                      spent=99.0, budget_s=100.0, warmup_steps=20, max_steps=1000) == 21


def test_time_budget_replans_at_evaluations(data_dir, tmp_path, monkeypatch):
    # A fake clock: the first 6 steps take 10 s each (compilation, a busy machine), the rest 1 s.
    from src.training import loop

    clock = {"now": 1000.0, "steps": 0}
    real_set_lr = loop.set_lr

    def timed_set_lr(optimizers, lr):  # called once at the start of every step
        clock["now"] += 10.0 if clock["steps"] < 6 else 1.0
        clock["steps"] += 1
        real_set_lr(optimizers, lr)

    monkeypatch.setattr(loop, "set_lr", timed_set_lr)
    monkeypatch.setattr(loop, "time", SimpleNamespace(time=lambda: clock["now"]))
    res = train(tiny_config(data_dir, tmp_path / "r", max_steps=1000, time_budget=3.0, eval_interval=5))
    # Of 180 s, 180 * (1 - BUDGET_RESERVE) are planned for (172.8 s). Calibration (steps 2-6, 10 s
    # each, 60 s spent) plans 6 + (172.8 - 60) // 10 = 17 steps; the evaluation at step 10 sees
    # 1 s per step since then and re-plans 10 + (172.8 - 64) // 1 = 118, which later evaluations
    # confirm. Without re-planning the run would stop at 17.
    expected = 10 + int(180 * (1 - BUDGET_RESERVE) - 64)
    assert res["step"] == res["max_steps"] == expected > 17
    assert reader.read_state(reader.latest_checkpoint(tmp_path / "r"))["planned_steps"] == expected


def test_time_budget_in_the_loop(data_dir, tmp_path):
    res = train(tiny_config(data_dir, tmp_path / "t", max_steps=12, time_budget=1000.0, eval_interval=100))
    assert res["step"] == res["max_steps"] == 12
    assert reader.read_state(reader.latest_checkpoint(tmp_path / "t"))["planned_steps"] == 12


def test_loop_trains_on_any_batch_source_with_a_loss_mask(tmp_path):
    from src.model.gpt import GPT
    from src.training.loop import TrainLoop

    torch.manual_seed(0)
    model = GPT(model_config("tiny", vocab_size=300))
    ids = torch.randint(0, 300, (2, 65))
    x, y = ids[:, :-1], ids[:, 1:]
    mask = torch.zeros_like(y, dtype=torch.bool)
    mask[:, 32:] = True
    with torch.no_grad():
        masked = float(model(x, y.masked_fill(~mask, -1))[1])
        unmasked = float(model(x, y)[1])
    assert masked != pytest.approx(unmasked, abs=1e-3)  # the mask matters for this batch

    run = tmp_path / "r"
    run.mkdir()
    cfg = make_config(dict(preset="tiny", run_dir=str(run), max_steps=3, eval_interval=100,
                           warmup_steps=0, device="cpu", dtype="fp32", progress=False,
                           tensorboard=False, plot=False))

    def make_loop(model, batches, resume_state=None):
        optimizers = build_optimizers(model, cfg)
        if resume_state is not None:
            resume_state = ck.load_checkpoint(resume_state, model, optimizers)
        return TrainLoop(cfg, model=model, raw_model=model, optimizers=optimizers,
                         batches=batches, evaluate=lambda: {"val_loss": 1.5}, eval_tokens=0,
                         device=torch.device("cpu"), resume_state=resume_state)

    loop = make_loop(model, RepeatedBatch(x, y, mask))
    assert loop.run() == "finished" and loop.step == 3
    records = read_metrics(run)
    assert train_losses(run)[0] == (1, pytest.approx(masked, abs=1e-6))
    assert [r["step"] for r in records if "val_loss" in r] == [3]  # evaluated at the end
    latest = reader.latest_checkpoint(run)
    assert reader.read_state(latest)["loader"] == {"steps": 3}
    # Resuming restores the source's position and the loop's step.
    batches = RepeatedBatch(x, y, mask)
    resumed = make_loop(GPT(model_config("tiny", vocab_size=300)), batches, latest)
    assert (resumed.step, batches.steps) == (3, 3)


# ---------------------------------------------------------------------------------------------
# Config


def test_presets_and_overrides(tmp_path):
    for name in PRESETS:
        cfg = make_config({"preset": name})
        assert cfg.preset == name
    cfg, explicit = resolve_config(["--preset", "tiny", "--lr", "1e-3", "--no-plot", "--max-steps", "7"])
    assert cfg.lr == 1e-3 and cfg.plot is False and cfg.max_steps == 7 and cfg.batch_size == PRESETS["tiny"].train["batch_size"]
    assert explicit["lr"] == 1e-3
    # An explicit --max-steps turns the small preset's time budget off; without it, it stays.
    assert resolve_config(["--max-steps", "10"])[0].time_budget is None
    assert resolve_config([])[0].time_budget == TrainConfig().time_budget > 0
    # Config file (YAML and JSON), overridden by flags.
    y = tmp_path / "c.yaml"
    y.write_text("preset: tiny\nlr: 0.01\nschedule: wsd\nbatch-size: 3\n")
    cfg, _ = resolve_config(["--config", str(y), "--lr", "0.02"])
    assert (cfg.preset, cfg.lr, cfg.schedule, cfg.batch_size) == ("tiny", 0.02, "wsd", 3)
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"optimizer": "muon", "warmup_steps": 0}))
    assert load_config_file(j) == {"optimizer": "muon", "warmup_steps": 0}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "-1"], "lr"),
        (["--lr", "abc"], "lr must be float"),
        (["--batch-size", "0"], "batch_size"),
        (["--dropout", "1.5"], "dropout"),
        (["--device", "tpu"], "device"),
        (["--beta2", "1.0"], "beta"),
        (["--time-budget", "-3"], "time_budget"),
    ],
)
def test_invalid_values_are_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        resolve_config(argv)


def test_bad_config_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("nonsense_key: 3\n")
    with pytest.raises(UserError, match="unknown setting 'nonsense_key'"):
        resolve_config(["--config", str(bad)])
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(UserError, match="not valid"):
        resolve_config(["--config", str(bad)])
    with pytest.raises(UserError, match="does not exist"):
        resolve_config(["--config", str(tmp_path / "missing.json")])


def test_help_lists_every_field():
    text = build_parser().format_help()
    for f in TrainConfig.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in text


def test_cli_without_data_says_how_to_prepare(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(tmp_path / "none")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60, env=ENV)
    assert proc.returncode == 2
    assert "prepare_data.py" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# Optimiser and schedules


def test_schedules():
    cfg = make_config({"preset": "tiny", "lr": 1.0, "min_lr_ratio": 0.1, "warmup_steps": 10, "max_steps": 110})
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(109, cfg) == pytest.approx(0.1)
    mids = [lr_at(s, cfg) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(mids, mids[1:]))  # monotone decay
    wsd = make_config({"preset": "tiny", "lr": 1.0, "min_lr_ratio": 0.0, "warmup_steps": 10, "max_steps": 110,
                       "schedule": "wsd", "decay_fraction": 0.2})
    assert [lr_at(s, wsd) for s in (10, 50, 87)] == [1.0, 1.0, 1.0]
    decay = [lr_at(s, wsd) for s in range(88, 110)]  # the last 20% (22 steps) decay linearly
    assert decay[0] < 1.0 and decay[-1] == pytest.approx(0.0)
    assert all(a - b == pytest.approx(1 / 22) for a, b in zip(decay, decay[1:]))
    const = make_config({"preset": "tiny", "schedule": "constant", "lr": 0.5, "warmup_steps": 0})
    assert lr_at(1000, const) == 0.5


def test_weight_decay_on_matrices_only():
    from src.model.gpt import GPT
    from src.training.presets import model_config

    model = GPT(model_config("tiny", vocab_size=300))
    cfg = make_config({"preset": "tiny", "weight_decay": 0.1})
    (adamw,) = build_optimizers(model, cfg)
    decayed = {id(p) for g in adamw.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim == 2), name
    assert sum(p.numel() for g in adamw.param_groups for p in g["params"]) == model.num_params()
    muon, adam2 = build_optimizers(model, make_config({"preset": "tiny", "optimizer": "muon"}))
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    assert muon_ids and all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    assert id(model.tok_emb.weight) not in muon_ids
    total = sum(p.numel() for o in (muon, adam2) for g in o.param_groups for p in g["params"])
    assert total == model.num_params()


def test_entry_point_runs_tiny(data_dir, tmp_path):
    """train.py end to end as a user types it, then --resume continues to a longer schedule."""
    run = tmp_path / "cli"
    args = [sys.executable, "train.py", "--preset", "tiny", "--data", str(data_dir), "--run-dir", str(run),
            "--max-steps", "3", "--seed", "1", "--no-progress", "--no-tensorboard", "--no-plot"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert f"saved to {run}" in proc.stdout and "python chat.py --run" in proc.stdout
    assert "sample: 'The" in proc.stdout
    assert reader.latest_checkpoint(run).name == "step_0000003"


@pytest.mark.slow
def test_kill_9_never_corrupts_the_latest_checkpoint(data_dir, tmp_path):
    """SIGKILL a real training process at random moments (checkpointing every step, so some
    kills land mid-save); every time, the latest checkpoint loads and training resumes."""
    import random

    run = tmp_path / "r"
    rng = random.Random(0)
    args = [sys.executable, "train.py", "--preset", "tiny", "--data", str(data_dir), "--run-dir", str(run),
            "--max-steps", "40", "--seed", "0", "--no-progress", "--no-tensorboard", "--no-plot",
            "--checkpoint-interval", "1", "--keep-last", "2", "--eval-interval", "5", "--eval-tokens", "128",
            "--batch-size", "4", "--tokens-per-step", "256"]
    metrics = run / "metrics.jsonl"
    for attempt in range(3):
        cmd = args + (["--resume"] if attempt else [])
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
        seen = metrics.read_text().count("\n") if metrics.is_file() else 0
        deadline = time.time() + 60
        # Wait for training to be under way, then kill after a random extra delay.
        while time.time() < deadline and proc.poll() is None and (
            not metrics.is_file() or metrics.read_text().count("\n") < seen + 2
        ):
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        proc.wait()
        latest = reader.latest_checkpoint(run)
        assert latest is not None
        model, _, info = reader.load_model(latest)
        assert info["step"] == reader.read_state(latest)["step"] >= 1
        # The full training state loads too (optimiser, RNG), not just the weights.
        from src.model.gpt import GPT

        fresh = GPT(model.config)
        cfg = make_config(json.loads((run / "config.json").read_text()))
        ck.load_checkpoint(latest, fresh, build_optimizers(fresh, cfg), restore_rng=False)
    proc = subprocess.run(args + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert reader.read_state(reader.latest_checkpoint(run))["step"] == 40
    steps = [s for s, _ in train_losses(run)]
    assert steps == list(range(1, 41))  # metrics.jsonl tells one consistent story
    assert not list((run / "checkpoints").glob(".tmp-*"))
