"""export.py on bad input: one line on stderr, exit 2, and nothing written (no --out, no
temporary folder beside it)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from src.utils.integrity import seal

pytest.importorskip("transformers")

from src.checkpoint import latest_checkpoint  # noqa: E402
from src.utils.cli import run_cli  # noqa: E402
from tests.fixtures import make_tiny_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def export_cli():
    spec = importlib.util.spec_from_file_location("export_cli", ROOT / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("errors"), steps=2)


@pytest.fixture(scope="module")
def hf_dir(run_dir) -> Path:
    from src.export import export_run

    out = run_dir.parent / "hf"
    export_run(run_dir, out)
    return out


def fails(argv: list[str], capsys, match: str, out: Path) -> None:
    """The command exits 2 with one ``error:`` line containing ``match`` and writes nothing."""
    before = sorted(out.parent.iterdir()) if out.parent.exists() else []
    main = export_cli().main
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and match in err, err
    assert not out.exists() or not any(out.iterdir())
    after = sorted(out.parent.iterdir()) if out.parent.exists() else []
    assert after == before  # no temporary folder left beside --out


def copy_run(run_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    return run, latest_checkpoint(run)


def test_run_without_checkpoint(tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    fails(["--run", str(tmp_path / "empty_run"), "--out", str(tmp_path / "o")], capsys,
          "no complete checkpoint", tmp_path / "o")


def test_no_runs_at_all(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ here: the default --run finds nothing
    fails(["--out", str(tmp_path / "o")], capsys, "no trained model found", tmp_path / "o")


def test_missing_run_and_unknown_step(run_dir, tmp_path, capsys):
    fails(["--run", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capsys,
          "no such folder", tmp_path / "o")
    fails(["--run", str(run_dir), "--out", str(tmp_path / "o"), "--checkpoint", "999"], capsys,
          "no complete checkpoint of step 999", tmp_path / "o")
    fails(["--run", str(run_dir), "--out", str(tmp_path / "o"), "--checkpoint", "newest"],
          capsys, "expected best, latest, a step number", tmp_path / "o")


def test_truncated_weights(run_dir, tmp_path, capsys):
    run, ckpt = copy_run(run_dir, tmp_path)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    fails(["--run", str(run), "--out", str(tmp_path / "o")], capsys,
          "model.safetensors is 1,000 bytes", tmp_path / "o")


def test_corrupted_state(run_dir, tmp_path, capsys):
    run, ckpt = copy_run(run_dir, tmp_path)
    (ckpt / "state.json").write_text("{not json")
    fails(["--run", str(run), "--out", str(tmp_path / "o")], capsys, "state.json", tmp_path / "o")


def test_unrepresentable_model_config(run_dir, tmp_path, capsys):
    run, ckpt = copy_run(run_dir, tmp_path)
    state = json.loads((ckpt / "state.json").read_text())
    state["model_config"]["parallel_blocks"] = True  # a field this code does not know
    state.pop("content_sha256")  # re-sealed: the state is intact, only its model is unknown
    (ckpt / "state.json").write_text(json.dumps(seal(state)))
    fails(["--run", str(run), "--out", str(tmp_path / "o")], capsys, "unusable model config",
          tmp_path / "o")


@pytest.mark.parametrize("options,flags,match", [
    ({"qk_norm": True}, [], "cannot export this model as Llama: model setting(s) ['qk_norm']"),
    ({"mlp_act": "relu2"}, ["--format", "gguf"], "cannot write GGUF: mlp_act 'relu2'"),
])
def test_architecture_options_without_a_counterpart_are_refused(tmp_path, capsys, options,
                                                                flags, match):
    run = make_tiny_run(tmp_path, steps=1, **options)
    fails(["--run", str(run), "--out", str(tmp_path / "o"), *flags], capsys, match, tmp_path / "o")


@pytest.mark.parametrize("flags,match", [
    (["--format", "onnx"], "--format 'onnx'"),
    (["--dtype", "int4"], "--dtype 'int4'"),
    (["--dtype", "q8_0"], "GGUF type"),  # q8_0 with the HF format
])
def test_unknown_format_or_dtype(run_dir, tmp_path, capsys, flags, match):
    fails(["--run", str(run_dir), "--out", str(tmp_path / "o"), *flags], capsys, match,
          tmp_path / "o")


def test_non_empty_out_needs_force(run_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    main = export_cli().main
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: main(["--run", str(run_dir), "--out", str(out)]))
    assert exc.value.code == 2 and "--force" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_out_may_not_replace_the_run(run_dir, tmp_path, capsys):
    run, _ = copy_run(run_dir, tmp_path)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    main = export_cli().main
    for out in (run, tmp_path):
        with pytest.raises(SystemExit) as exc:
            run_cli(lambda out=out: main(["--run", str(run), "--out", str(out), "--force"]))
        assert exc.value.code == 2 and "would replace" in capsys.readouterr().err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def hf_copy(hf_dir: Path, tmp_path: Path, **config_changes) -> Path:
    folder = tmp_path / "hf"
    shutil.copytree(hf_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_from_hf_other_architecture(hf_dir, tmp_path, capsys):
    folder = hf_copy(hf_dir, tmp_path, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    fails(["--from-hf", str(folder), "--out", str(tmp_path / "r")], capsys,
          "GPT2LMHeadModel is not Llama", tmp_path / "r")


@pytest.mark.parametrize("change,match", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                          "original_max_position_embeddings": 32}}, "rope_type"),
    ({"attention_bias": True}, "biases"),
    ({"head_dim": 16}, "head_dim"),  # 16 x 4 heads != hidden size 48
    ({"num_key_value_heads": 3}, "n_kv_head"),  # 4 heads cannot share 3 key/value heads
])
def test_from_hf_unsupported_shape(hf_dir, tmp_path, capsys, change, match):
    folder = hf_copy(hf_dir, tmp_path, **change)
    fails(["--from-hf", str(folder), "--out", str(tmp_path / "r")], capsys, match,
          tmp_path / "r")


def reverse_merges(data):
    data["model"]["merges"] = data["model"]["merges"][::-1]  # a merge of tokens not made yet


def unigram(data):
    data["model"]["type"] = "Unigram"


def lowercase(data):
    data["normalizer"] = {"type": "Lowercase"}


@pytest.mark.parametrize("damage,match", [
    (reverse_merges, "does not make a new token"),
    (unigram, "is not BPE"),
    (lowercase, "normalizer"),
])
def test_from_hf_tokenizer_we_cannot_express(hf_dir, tmp_path, capsys, damage, match):
    folder = hf_copy(hf_dir, tmp_path)
    data = json.loads((folder / "tokenizer.json").read_text())
    damage(data)
    (folder / "tokenizer.json").write_text(json.dumps(data))
    fails(["--from-hf", str(folder), "--out", str(tmp_path / "r")], capsys, match,
          tmp_path / "r")


def test_from_hf_missing_weights(hf_dir, tmp_path, capsys):
    folder = hf_copy(hf_dir, tmp_path)
    (folder / "model.safetensors").unlink()
    fails(["--from-hf", str(folder), "--out", str(tmp_path / "r")], capsys,
          "no model.safetensors", tmp_path / "r")


def test_cli_exports_and_prints_a_load_line(run_dir, tmp_path, capsys):
    main = export_cli().main
    step = json.loads((latest_checkpoint(run_dir) / "state.json").read_text())["step"]
    assert main(["--run", str(run_dir), "--out", str(tmp_path / "o"), "--format", "both",
                 "--dtype", "float16", "--checkpoint", str(step)]) == 0
    assert json.loads((tmp_path / "o" / "gpt_model_run.json").read_text())["step"] == step
    out = capsys.readouterr().out
    assert "model-f16.gguf" in out and "model.safetensors" in out
    assert out.strip().splitlines()[-1].startswith("load it: ")
    assert (tmp_path / "o" / "model-f16.gguf").is_file()
