"""Fault injection: damage each artifact of a run and of its data in each way, then do what a
user does next (resume, chat/evaluate/generate's load, train on the data) and check what they
see (one line naming the file and what to do) and that no earlier good state is lost.

The table of cases and outcomes in the README's "Reliability" section is generated from
:data:`CASES` (``python -m tests.test_faults``); ``test_readme_table_is_current`` keeps it true.

One tiny run is trained per module (checkpoints at steps 3 and 6, step 6 the best and the
latest) and copied per case; the damage is always done to step 6 (or to the data / run files). Tests run as root in CI,
where chmod 000 does not stop reading: there the "unreadable" cases drop the DAC-override
capabilities of the test's thread while the action runs, so the kernel really refuses.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from src import checkpoint as reader
from src.training.loop import CheckpointNotSaved
from src.training.trainer import train
from src.utils.cli import UserError
from src.utils.integrity import SEAL_KEY
from tests.fixtures import make_tiny_run, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
STEP6 = "run/checkpoints/step_0000006"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# ---- damages: each turns an existing file into a damaged one ---------------------------------


def _truncate(p: Path) -> None:
    os.truncate(p, p.stat().st_size // 2)


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def _garbage(p: Path) -> None:  # same size, so only a content check can tell
    p.write_bytes(b"#" * (p.stat().st_size - 1) + b"\n")


def _directory(p: Path) -> None:
    p.unlink()
    p.mkdir()
    (p / "x").write_text("x")


DAMAGES = {
    "truncated": _truncate,
    "zero-length": lambda p: p.write_bytes(b""),
    "one flipped byte": _flip,
    "garbage, same size": _garbage,
    "missing": lambda p: p.unlink(),
    "a directory": _directory,
    "unreadable (chmod 000)": lambda p: p.chmod(0),
}

# ---- artifacts, the action a user takes next, and the outcome expected ----------------------

ARTIFACTS = {  # name in the table -> path in a case's folder
    "model.safetensors": f"{STEP6}/model.safetensors",
    "optimizer.safetensors": f"{STEP6}/optimizer.safetensors",
    "rng_rank0.safetensors": f"{STEP6}/rng_rank0.safetensors",
    "state.json": f"{STEP6}/state.json",
    "train.bin": "data/train.bin",
    "val.bin": "data/val.bin",
    "tokenizer.json (data)": "data/tokenizer.json",
    "meta.json": "data/meta.json",
    "tokenizer.json (run copy)": "run/tokenizer.json",
    "metrics.jsonl": "run/metrics.jsonl",
}
CKPT_FILES = ("model.safetensors", "optimizer.safetensors", "rng_rank0.safetensors", "state.json")
DATA_FILES = ("train.bin", "val.bin", "tokenizer.json (data)", "meta.json")

# Outcomes, as the README's table words them.
FALLBACK = "falls back"
REFUSED = "refused"
UNUSED = "loads (not needed)"
UNDETECTED = "loads (not detected)"
RESUMES = "resumes"
ACTIONS = {"resume": "`train.py --resume`", "load": "`chat.py` / `evaluate.py` / `generate.py`",
           "verify": "the same with `--verify`", "train": "`train.py`"}


def expected(artifact: str, action: str, damage: str) -> str:
    if artifact in CKPT_FILES:
        if action == "resume":
            return FALLBACK
        if artifact not in ("model.safetensors", "state.json"):
            return UNUSED
        if action == "load" and artifact == "model.safetensors" and damage == "one flipped byte":
            return UNDETECTED  # a flipped bit in tensor data: only its SHA-256 shows it
        return FALLBACK
    if artifact == "metrics.jsonl":
        return REFUSED if damage in ("a directory", "unreadable (chmod 000)") else RESUMES
    return REFUSED


CASES = [(artifact, action) for artifact in CKPT_FILES for action in ("resume", "load", "verify")]
CASES += [(a, "train") for a in DATA_FILES] + [("tokenizer.json (run copy)", "load"),
                                               ("metrics.jsonl", "resume")]


def outcome_table() -> str:
    """The README's table: one row per (artifact, action), one column per damage."""
    head = "| artifact | next action | " + " | ".join(DAMAGES) + " |"
    lines = [head, "|" + "---|" * (len(DAMAGES) + 2)]
    for artifact, action in CASES:
        cells = [expected(artifact, action, d) for d in DAMAGES]
        file, _, where = artifact.partition(" ")
        label = f"`{file}` {where}".rstrip()
        lines.append(f"| {label} | {ACTIONS[action]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- the shared run ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    make_tiny_run(root, steps=6, sample_tokens=0)
    ckpts = root / "run" / "checkpoints"
    assert reader.best_checkpoint(root / "run") == ckpts / "step_0000006"
    assert reader.latest_checkpoint(root / "run") == ckpts / "step_0000006"
    return root


def _case(base: Path, tmp_path: Path) -> Path:
    shutil.copytree(base, tmp_path / "case")
    return tmp_path / "case"


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _resume(case: Path, **overrides):
    cfg = tiny_config(case / "data", case / "run", resume=True, sample_tokens=0, **overrides)
    return train(cfg)


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


@contextlib.contextmanager
def _permissions_enforced():
    """Make chmod 000 deny reading in this thread, also for root: as root, the DAC-override
    capabilities are dropped from the effective set while the block runs (and restored)."""
    if not IS_ROOT:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        pytest.skip("running as root and cannot read this thread's capabilities, so chmod 000 "
                    "does not stop reading here")
    saved = data[0].effective
    data[0].effective &= ~((1 << 1) | (1 << 2))  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.capset(ctypes.byref(header), data) != 0:
        pytest.skip("running as root without the right to drop capabilities, so chmod 000 does "
                    "not stop reading here")
    try:
        yield
    finally:
        data[0].effective = saved
        libc.capset(ctypes.byref(header), data)


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("artifact,action", CASES)
def test_fault(base, tmp_path, capsys, artifact, action, damage):
    case = _case(base, tmp_path)
    run = case / "run"
    step3 = run / "checkpoints" / "step_0000003"
    good_step3 = _digests(step3)
    good_run = _digests(run)
    DAMAGES[damage](case / ARTIFACTS[artifact])
    capsys.readouterr()
    outcome = expected(artifact, action, damage)
    name = artifact.split(" ")[0]

    error, result = None, None
    enforced = _permissions_enforced() if damage.startswith("unreadable") else contextlib.nullcontext()
    with enforced:
        try:
            if action in ("load", "verify"):
                result = reader.load_model(run, verify=action == "verify")[2]
            else:
                result = _resume(case)
        except UserError as exc:
            error = exc
    err = capsys.readouterr().err

    if outcome == REFUSED:
        assert error is not None, f"expected a refusal, got {result}"
        message = str(error)
        assert "\n" not in message and name in message, message
        fix = {"train": "prepare_data.py --out", "load": "copy the tokenizer.json",
               "resume": "move it out of the way"}[action]
        assert fix in message, message
        if artifact != "metrics.jsonl":  # nothing written: the run is as it was
            damaged = ARTIFACTS[artifact].removeprefix("run/")
            after = _digests(run)
            assert {k: v for k, v in after.items() if not k.startswith(damaged)} == {
                k: v for k, v in good_run.items() if k != damaged}
        return
    assert error is None, error
    if action == "resume":
        assert result["step"] == 6
        if outcome == FALLBACK:
            (line,) = _warnings(err)
            assert "step_0000006" in line and name in line and "using step_0000003" in line, line
            # Resumed from step 3 and redid steps 4-6 exactly: the same weights as before.
            redone = load_file(str(run / "checkpoints/step_0000006/model.safetensors"))
            original = load_file(str(base / STEP6 / "model.safetensors"))
            assert all(torch.equal(redone[k], original[k]) for k in original)
        else:  # metrics.jsonl
            assert all("metrics.jsonl" in w for w in _warnings(err)) and len(_warnings(err)) <= 1
        assert reader.checkpoint_problem(run / "checkpoints/step_0000006", hashes=True) is None
    elif outcome == FALLBACK:
        (line,) = _warnings(err)
        assert "step_0000006" in line and name in line and "using step_0000003" in line, line
        assert result["step"] == 3
    else:
        assert result["step"] == 6 and not _warnings(err)
    assert _digests(step3) == good_step3  # the earlier good state is untouched


def test_no_intact_checkpoint_is_one_error(base, tmp_path):
    case = _case(base, tmp_path)
    for step in ("step_0000003", "step_0000006"):
        _truncate(case / "run/checkpoints" / step / "model.safetensors")
    for action in (lambda: _resume(case), lambda: reader.load_model(case / "run")):
        with pytest.raises(UserError, match=r"no intact checkpoint .*step_0000006: model\.safetensors "
                                            r"is .* \(and 1 other, damaged too\); restore"):
            action()
    # A damaged checkpoint named explicitly is refused, pointing at the run instead.
    with pytest.raises(UserError, match="is damaged or incomplete: model.safetensors .*give the run"):
        reader.load_model(case / "run/checkpoints/step_0000006")


def test_cli_with_no_intact_checkpoint_exits_2_with_one_line(base, tmp_path):
    """As a user sees it (the in-process cases above show the warnings): every checkpoint
    damaged, `train.py --resume` prints one error line and exits 2."""
    import subprocess

    case = _case(base, tmp_path)
    for step in ("step_0000003", "step_0000006"):
        _truncate(case / "run/checkpoints" / step / "model.safetensors")
    resume = subprocess.run([sys.executable, "train.py", "--data", str(case / "data"), "--run-dir",
                             str(case / "run"), "--resume", "--no-progress"], capture_output=True,
                            text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=120)
    assert resume.returncode == 2
    assert resume.stderr.count("\n") == 1 and resume.stderr.startswith("error: no intact checkpoint")
    assert "step_0000006: model.safetensors is " in resume.stderr


# ---- a full disk, a power cut --------------------------------------------------------------------


def _full_disk(fail_from_step: int, times: int | None):
    """A save_file that fails with ENOSPC, after writing part of the file, for checkpoints of
    step >= ``fail_from_step`` (``times`` saves at most; None: always)."""
    from safetensors.torch import save_file as real

    failures = []

    def save_file(tensors, filename, metadata=None):
        step = int(re.search(r"step_(\d+)", str(filename)).group(1))
        if step >= fail_from_step and (times is None or len(failures) < times):
            failures.append(step)
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real(tensors, filename, metadata=metadata)

    return save_file


def test_full_disk_once_warns_and_retries(base, tmp_path, capsys, monkeypatch):
    """ENOSPC at step 9's save: one warning, training goes on, step 12 is saved, and the run
    is exactly what an uninterrupted one would be; step 6 stays intact throughout."""
    reference = _case(base, tmp_path / "ref")
    _resume(reference, max_steps=12)
    case = _case(base, tmp_path)
    monkeypatch.setattr("src.checkpoint.weights.save_file", _full_disk(9, times=1))
    capsys.readouterr()
    assert _resume(case, max_steps=12)["step"] == 12
    (line,) = _warnings(capsys.readouterr().err)
    assert "could not save checkpoint step_0000009 (No space left on device)" in line
    assert "step_0000006 is intact" in line and "retries at the next checkpoint" in line
    ckpts = case / "run/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "latest", "step_0000003",
                                                       "step_0000006", "step_0000012"]
    ours = load_file(str(ckpts / "step_0000012/model.safetensors"))
    theirs = load_file(str(reference / "run/checkpoints/step_0000012/model.safetensors"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_full_disk_at_the_end_stops_with_the_last_good_checkpoint(base, tmp_path, capsys, monkeypatch):
    case = _case(base, tmp_path)
    good = _digests(case / "run/checkpoints")
    monkeypatch.setattr("src.checkpoint.weights.save_file", _full_disk(9, times=None))
    with pytest.raises(CheckpointNotSaved) as info:
        _resume(case, max_steps=9)
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message
    assert "step_0000006 is intact" in message and "--resume" in message
    # Nothing half-written; the checkpoints, pointers included, are byte for byte as before.
    assert _digests(case / "run/checkpoints") == good
    assert not list((case / "run/checkpoints").glob(".*"))
    monkeypatch.undo()
    assert _resume(case, max_steps=9)["step"] == 9  # space freed: --resume continues


class PowerCut(BaseException):
    """Not an Exception: nothing in the code under test catches it (as with a real power cut)."""


def test_power_cut_during_each_write_of_a_save(base, tmp_path, monkeypatch):
    """Cut the power during each write of step 9's save in turn (each file, the folder rename,
    each pointer): the disk image at that moment, a half-written temporary file included,
    resumes to exactly the weights of an uninterrupted run."""
    reference = _case(base, tmp_path / "ref")
    writes: list[str] = []
    real_replace = os.replace

    def recording(src, dst, *args, **kwargs):
        if "checkpoints" in Path(dst).parts:
            writes.append(Path(dst).name)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", recording)
    _resume(reference, max_steps=9)
    monkeypatch.undo()
    expected_weights = load_file(str(reference / "run/checkpoints/step_0000009/model.safetensors"))
    assert writes[:4] == ["rng_rank0.safetensors", "model.safetensors", "optimizer.safetensors",
                          "state.json"] and writes[4:6] == ["step_0000009", "latest"]

    for k, what in enumerate(writes, 1):
        case = _case(base, tmp_path / f"cut{k}")
        image = tmp_path / f"image{k}"
        count = [0]

        def cutting(src, dst, *args, _k=k, _case=case, _image=image, count=count, **kwargs):
            if "checkpoints" in Path(dst).parts:
                count[0] += 1
                if count[0] == _k:
                    if Path(src).is_file():
                        os.truncate(src, Path(src).stat().st_size // 2)  # mid-write
                    shutil.copytree(_case, _image)  # what the disk holds when the power goes
                    raise PowerCut
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", cutting)
        with pytest.raises(PowerCut):
            _resume(case, max_steps=9)
        monkeypatch.undo()
        assert _resume(image, max_steps=9)["step"] == 9, what
        got = load_file(str(image / "run/checkpoints/step_0000009/model.safetensors"))
        assert all(torch.equal(got[n], expected_weights[n]) for n in expected_weights), what
        assert reader.checkpoint_problem(image / "run/checkpoints/step_0000006", hashes=True) is None


# ---- older checkpoints, permissions, data hashing ---------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "garbage, same size", "missing", "a directory"])
def test_damaged_run_config_on_resume(base, tmp_path, capsys, damage):
    """`train.py --resume` reads the run's config.json: when it is missing or not valid JSON,
    the settings saved in the newest checkpoint are used (one warning); a directory is refused."""
    from src.training.trainer import resolve_for_resume

    case = _case(base, tmp_path)
    DAMAGES[damage](case / "run/config.json")
    capsys.readouterr()
    cfg = tiny_config(case / "data", case / "run", resume=True, preset="small")
    if damage == "a directory":
        with pytest.raises(UserError, match="config.json is a directory.*move it out of the way"):
            resolve_for_resume(cfg, {})
        return
    resolved = resolve_for_resume(cfg, {})
    assert resolved.preset == "tiny" and resolved.max_steps == 6  # the run's, not the defaults
    (line,) = _warnings(capsys.readouterr().err)
    assert "config.json is" in line and "using the settings saved in checkpoint step_0000006" in line


def test_checkpoints_without_hashes_still_load_and_resume(base, tmp_path, capsys):
    """A checkpoint written before sizes and hashes were recorded: format checks only."""
    import json

    case = _case(base, tmp_path)
    for ckpt in (case / "run/checkpoints").glob("step_*"):
        state = json.loads((ckpt / "state.json").read_text())
        del state["files"], state[SEAL_KEY]
        (ckpt / "state.json").write_text(json.dumps(state))
    assert reader.load_model(case / "run", verify=True)[2]["step"] == 6
    # A truncated weights file is still caught (its safetensors header no longer fits).
    _truncate(case / STEP6 / "model.safetensors")
    capsys.readouterr()
    assert reader.load_model(case / "run")[2]["step"] == 3
    assert "tensor data" in capsys.readouterr().err
    assert _resume(case)["step"] == 6


def test_run_files_share_one_permission_policy(base):
    """Every file of a run, checkpoints included, gets what the umask gives ordinary files
    (a run copied to another user loads)."""
    umask = os.umask(0)
    os.umask(umask)
    modes = {str(p.relative_to(base)): oct(p.stat().st_mode & 0o777)
             for p in (base / "run").rglob("*") if p.is_file()}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_meta_records_data_files_and_a_tokenizer_swap_is_refused(base, tmp_path):
    import json

    case = _case(base, tmp_path)
    meta = json.loads((case / "data/meta.json").read_text())
    assert set(meta["files"]) == {"tokenizer.json", "train.bin", "val.bin"}
    # Another valid tokenizer (a different one) in place of the data's: refused before a step.
    from src.tokenizer.bpe import BPETokenizer

    tok = BPETokenizer.load(case / "data/tokenizer.json")
    BPETokenizer(tok.merges[:-1]).save(case / "data/tokenizer.json")
    with pytest.raises(UserError, match="tokenizer.json is not the tokenizer the token files were "
                                        "made with .*; re-run `python src/data/prepare_data.py --out"):
        _resume(case)


def test_prepare_data_records_what_training_checks(tmp_path):
    """prepare_data.py's meta.json records each file it vouches for and seals itself; training's
    check accepts that data as written and refuses it once a token file is cut short."""
    import json

    from src.data import prepare_data
    from src.training.batches import read_meta, verify_data
    from src.utils.integrity import file_record

    corpus = tmp_path / "mine.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document number {i} of a few."}) + "\n"
                              for i in range(12)), encoding="utf-8")
    out = tmp_path / "data"
    prepare_data.main(["--text", str(corpus), "--out", str(out), "--vocab-size", "280",
                       "--workers", "1", "--text-val-every", "3"])
    meta = read_meta(out)  # its own checksum holds
    assert meta["files"] == {name: file_record(out / name)
                             for name in ("tokenizer.json", "train.bin", "val.bin")}
    verify_data(out, meta)
    _truncate(out / "val.bin")
    with pytest.raises(UserError, match=r"val\.bin is .* bytes, .* expected \(truncated\?\); "
                                        r"re-run `python src/data/prepare_data.py --out"):
        verify_data(out, meta)


def test_readme_table_is_current():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert outcome_table() in readme, "regenerate the README's fault table: python -m tests.test_faults"
    assert f"**{len(CASES) * len(DAMAGES)} cases**: {len(CASES)}" in readme


if __name__ == "__main__":
    print(outcome_table())
