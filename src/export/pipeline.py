"""What ``export.py`` does: pick a run's checkpoint, write the requested formats into a
temporary folder beside ``--out`` and rename it into place (so ``--out`` is never half
written), or convert a Hugging Face Llama folder back into a run (``--from-hf``).
Every mistake in the input is a one-line UserError (exit 2) raised before the rename."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from src.checkpoint import (
    CHECKPOINTS,
    best_checkpoint,
    load_model,
    resolve_checkpoint,
    run_dir_of,
)
from src.export.gguf_file import write_gguf
from src.export.hf import read_hf_folder, write_hf_folder, write_run
from src.export.model_card import model_card
from src.utils.atomic import atomic_folder, write_text_atomic
from src.utils.cli import UserError

FORMATS = ("hf", "gguf", "both")
# --dtype: floating types (for both formats) and q8_0 (GGUF only) -> (torch dtype, GGUF type)
DTYPES: dict[str, tuple[torch.dtype | None, str]] = {
    "float32": (torch.float32, "f32"),
    "bfloat16": (torch.bfloat16, "bf16"),
    "float16": (torch.float16, "f16"),
    "q8_0": (None, "q8_0"),
}


@dataclass
class ExportResult:
    """What was written: the folder, its files with sizes, notes, and how to load it."""

    out: Path
    files: list[tuple[str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    snippet: str = ""
    seconds: float = 0.0

    def describe(self) -> str:
        lines = [f"wrote {self.out}/ in {self.seconds:.1f} s:"]
        lines += [f"  {name:<28} {size / 1e6:10.2f} MB" for name, size in self.files]
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"load it: {self.snippet}")
        return "\n".join(lines)


def require(package: str, purpose: str) -> None:
    """A UserError naming the missing package, instead of an ImportError's traceback."""
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise UserError(f"{purpose} needs the {package} package: pip install {package}")


def check_out(out: Path, force: bool, source: Path) -> None:
    """``--out`` may be missing or an empty folder; a non-empty folder needs ``force``, and
    it may never be (or contain) the ``source`` being read: replacing it would destroy it."""
    if out.resolve() == source.resolve() or out.resolve() in source.resolve().parents:
        raise UserError(f"--out {out} would replace {source}, which is being exported; "
                        "choose another folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} is not empty; add --force to replace it")


def pick_checkpoint(run: Path | None, which: str) -> tuple[Path, str | None]:
    """The checkpoint folder of ``run`` (None: the newest run under runs/; or a checkpoint
    folder itself) that ``which`` names, by src/checkpoint's one rule (best, latest or a step;
    a damaged best/latest is skipped for the newest intact one, with a warning); and a note
    when "best" was asked of a run that has none marked yet (no evaluation)."""
    if run is not None and not run.is_dir():
        raise UserError(f"--run {run}: no such folder")
    ckpt = resolve_checkpoint(run, which)
    note = None
    if which == "best" and ckpt.parent.name == CHECKPOINTS and best_checkpoint(run_dir_of(ckpt)) is None:
        note = "the run has no best checkpoint (no evaluation yet): exported the latest"
    return ckpt, note


def export_run(run: Path | None, out: Path, fmt: str = "hf", dtype: str = "float32",
               checkpoint: str = "best", force: bool = False) -> ExportResult:
    """Export a run's checkpoint as a Hugging Face folder, a GGUF file in ``out``, or both."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    torch_dtype, gguf_type = DTYPES[dtype]
    if torch_dtype is None and fmt != "gguf":
        raise UserError(f"--dtype {dtype} is a GGUF type; use it with --format gguf")
    if fmt != "gguf":
        require("transformers", "--format hf")
    if fmt != "hf":
        require("gguf", "--format gguf")
    start = time.perf_counter()
    ckpt, note = pick_checkpoint(run, checkpoint)
    check_out(out, force, run_dir_of(ckpt))
    model, tok, info = load_model(ckpt)
    provenance = {
        "run": Path(info["run_dir"]).name,
        "checkpoint": Path(info["checkpoint"]).name,
        "step": info["step"],
        "val_loss": info["val_loss"],
        "best_val_loss": info["best_val_loss"],
        "tokenizer_hash": tok.hash,
        "train_config": info["train_config"],
        "data_meta": info["data_meta"],
    }
    result = ExportResult(out, notes=[note] if note else [])
    gguf_name = f"model-{gguf_type}.gguf" if fmt in ("gguf", "both") else None
    with atomic_folder(out) as tmp:
        names: list[str] = []
        if fmt in ("hf", "both"):
            names += write_hf_folder(model, tok, tmp, torch_dtype, provenance)
        if gguf_name:
            try:
                fell_back = write_gguf(model, tok, tmp / gguf_name, gguf_type,
                                       Path(info["run_dir"]).name)
            except ValueError as exc:  # the tokenizer or shape has no GGUF form
                raise UserError(f"cannot write GGUF: {exc}") from None
            names.append(gguf_name)
            if fell_back:
                result.notes.append(f"{len(fell_back)} matrices have rows not a multiple of 32 "
                                    f"long and are stored as f16, not q8_0: {', '.join(fell_back)}")
        if fmt in ("hf", "both"):
            write_text_atomic(tmp / "README.md", model_card(model, info, names + ["README.md"],
                                                              gguf_name))
            names.append("README.md")
        result.files = [(n, (tmp / n).stat().st_size) for n in names]
    result.seconds = time.perf_counter() - start
    q = repr(str(out))
    if fmt == "gguf":
        result.snippet = (f"from transformers import AutoModelForCausalLM; model = "
                          f"AutoModelForCausalLM.from_pretrained({q}, gguf_file={gguf_name!r})")
    else:
        result.snippet = (f"from transformers import AutoModelForCausalLM, AutoTokenizer; "
                          f"model = AutoModelForCausalLM.from_pretrained({q}); "
                          f"tok = AutoTokenizer.from_pretrained({q})")
    return result


def import_hf(folder: Path, out: Path, force: bool = False) -> ExportResult:
    """Convert a Hugging Face Llama folder (ours, or another whose shape the model holds and
    whose tokenizer is byte-level BPE) into a run folder ``out`` that chat.py, evaluate.py and
    load_model accept."""
    if not folder.is_dir():
        raise UserError(f"--from-hf {folder}: no such folder")
    require("transformers", "--from-hf")
    check_out(out, force, folder)
    start = time.perf_counter()
    model, tok, provenance, notes = read_hf_folder(folder)
    result = ExportResult(out, notes=notes)
    with atomic_folder(out) as tmp:
        write_run(tmp, model, tok, provenance, str(folder))
        paths = [p for p in tmp.rglob("*") if p.is_file()]
        result.files = [(str(p.relative_to(tmp)), p.stat().st_size) for p in sorted(paths)]
    result.seconds = time.perf_counter() - start
    if not provenance:
        result.notes.append("no gpt_model_run.json: step 0, no training data recorded")
    result.snippet = (f"python chat.py --run {out}   or, in Python: from src.checkpoint import "
                      f"load_model; model, tokenizer, info = load_model({str(out)!r})")
    return result
