"""The checkpoint format: load_model, atomic layout, retention, optimiser/RNG round trips."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from src import checkpoint as reader
from src.training import checkpoint as ck
from src.training.config import make_config
from src.training.optim import build_optimizers
from src.utils.cli import UserError
from tests.fixtures import make_tiny_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("ckpt"), steps=6)


def test_load_model_from_run_dir(tiny_run):
    from src.model.gpt import GPT
    from src.tokenizer.bpe import BPETokenizer

    model, tok, info = reader.load_model(tiny_run)
    assert isinstance(model, GPT) and isinstance(tok, BPETokenizer)
    assert not model.training
    assert info["run_dir"] == tiny_run and info["step"] == 6
    assert info["checkpoint"] == reader.best_checkpoint(tiny_run)
    assert info["tokenizer_hash"] == tok.hash == info["data_meta"]["tokenizer_hash"]
    assert info["model_config"]["vocab_size"] == tok.vocab_size
    assert info["train_config"]["preset"] == "tiny"
    assert info["val_loss"] == pytest.approx(info["best_val_loss"])
    # Tied embeddings survive the round trip as one shared matrix.
    assert model.lm_head.weight is model.tok_emb.weight
    # The weights are the saved ones, and the model computes a sensible loss on real tokens.
    from safetensors.torch import load_file

    saved = load_file(str(info["checkpoint"] / "model.safetensors"))
    for name, tensor in saved.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    ids = torch.tensor([tok.encode("The cat sees the ball. She reads a long letter.")])
    _, loss = model(ids[:, :-1], ids[:, 1:])
    assert loss.item() < np.log(tok.vocab_size)  # trained a little: better than uniform


def test_load_model_resolution(tiny_run, tmp_path, monkeypatch):
    step3 = tiny_run / "checkpoints" / "step_0000003"
    _, _, info = reader.load_model(step3)
    assert info["step"] == 3
    _, _, info = reader.load_model(step3 / "model.safetensors")
    assert info["step"] == 3
    # None: the newest run under ./runs
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "a")
    monkeypatch.chdir(tmp_path)
    _, _, info = reader.load_model()
    assert info["run_dir"].resolve() == (runs / "a").resolve()


def test_load_model_errors(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="python train.py"):
        reader.load_model()
    with pytest.raises(UserError, match="does not exist"):
        reader.load_model(tmp_path / "nope")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(UserError, match="no complete checkpoint"):
        reader.load_model(empty)
    # An incomplete checkpoint folder is refused, not half-loaded.
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    (broken / "checkpoints" / "step_0000006" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="incomplete"):
        reader.load_model(broken / "checkpoints" / "step_0000006")
    # The run falls back from the (now broken) best/latest to a complete checkpoint.
    _, _, info = reader.load_model(broken)
    assert info["step"] == 3
    # A tokenizer that is not the checkpoint's is refused.
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    from src.tokenizer.bpe import BPETokenizer

    tok = BPETokenizer.load(other / "tokenizer.json")
    BPETokenizer(tok.merges[:-1]).save(other / "tokenizer.json")
    with pytest.raises(UserError, match="not the tokenizer"):
        reader.load_model(other)


def test_latest_pointer_and_stale_temp_dirs(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    root = run / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_0000006"
    # A crash mid-save leaves a temp folder; it is never picked up as a checkpoint.
    (root / ".tmp-step_0000009").mkdir()
    (root / ".tmp-step_0000009" / "state.json").write_text("{}")
    assert reader.latest_checkpoint(run).name == "step_0000006"
    # A lost/garbled pointer falls back to the highest complete step.
    (root / "latest").write_text("garbage")
    assert reader.latest_checkpoint(run).name == "step_0000006"


def _trained_model_and_opt(optimizer: str):
    from src.model.gpt import GPT
    from src.training.presets import model_config

    torch.manual_seed(0)
    model = GPT(model_config("tiny", vocab_size=300))
    cfg = make_config({"preset": "tiny", "optimizer": optimizer})
    opts = build_optimizers(model, cfg)
    x = torch.randint(0, 300, (2, 16))
    for _ in range(2):
        _, loss = model(x, x)
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad()
    return model, opts, cfg


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_save_load_round_trip_and_retention(tmp_path, optimizer):
    from src.model.gpt import GPT
    from src.training.presets import model_config

    model, opts, cfg = _trained_model_and_opt(optimizer)
    state = {"model_config": model.config.to_dict(), "tokenizer_hash": "x", "loader": {"sample_index": 5}}
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(tmp_path, step, model, opts, state, keep_last=2, is_best=(step == 1))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # keep_last=2 plus the best (step 1); pointers; no temp folders left.
    assert names == ["best", "latest", "step_0000001", "step_0000003", "step_0000004"]
    expected = (random.random(), np.random.rand(), torch.rand(3))

    fresh = GPT(model_config("tiny", vocab_size=300))
    fresh_opts = build_optimizers(fresh, cfg)
    random.seed(99)
    loaded = ck.load_checkpoint(tmp_path / "checkpoints" / "step_0000004", fresh, fresh_opts)
    assert loaded["step"] == 4 and loaded["loader"] == {"sample_index": 5}
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    for o, f in zip(opts, fresh_opts):
        so, sf = o.state_dict(), f.state_dict()
        assert so["param_groups"] == [
            {**g, **{k: tuple(v) for k, v in g.items() if isinstance(v, list) and k != "params"}}
            for g in sf["param_groups"]
        ]
        for i, st in so["state"].items():
            for k, v in st.items():
                assert torch.equal(v, sf["state"][i][k]), (i, k)
    # RNG restored: the same draws as right after saving.
    assert random.random() == expected[0]
    assert np.random.rand() == expected[1]
    assert torch.equal(torch.rand(3), expected[2])


def test_mismatched_model_is_a_user_error(tmp_path):
    from src.model.gpt import GPT
    from src.training.presets import model_config

    model, opts, cfg = _trained_model_and_opt("adamw")
    ck.save_checkpoint(tmp_path, 1, model, opts, {"model_config": model.config.to_dict()})
    other = GPT(model_config("tiny", vocab_size=300, d_model=64))
    with pytest.raises(UserError, match="does not match"):
        ck.load_checkpoint(tmp_path / "checkpoints" / "step_0000001", other, build_optimizers(other, cfg))


def test_no_pickle_in_checkpoint(tiny_run):
    """Every file of a checkpoint is safetensors, JSON or a plain-text pointer."""
    for path in (tiny_run / "checkpoints").rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:2]
            assert head != b"\x80\x04" and head != b"PK", path  # pickle / torch zip
            if path.suffix == ".json":
                json.loads(path.read_text())


def test_weights_only_checkpoint_loads_without_training(tiny_run, tmp_path):
    """What an export stage writes (src.checkpoint.save_model_checkpoint, no optimiser or RNG)
    loads with load_model, tied weights and all, and becomes the run's latest."""
    import shutil

    model, tok, info = reader.load_model(tiny_run)
    run = tmp_path / "exported"
    run.mkdir()
    shutil.copy(tiny_run / "tokenizer.json", run / "tokenizer.json")
    state = {"model_config": info["model_config"], "tokenizer_hash": tok.hash}
    ckpt = reader.save_model_checkpoint(run, 9, model.state_dict(), state)
    assert ckpt == run / "checkpoints" / "step_0000009"
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "state.json"]
    assert reader.latest_checkpoint(run) == ckpt and reader.best_checkpoint(run) is None
    assert not list((run / "checkpoints").glob(".tmp-*"))
    loaded, _, loaded_info = reader.load_model(run)
    assert loaded_info["step"] == 9 and loaded_info["checkpoint"] == ckpt
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
