"""The checkpoint format: the one place that writes and reads training checkpoints.

A run folder looks like::

    runs/<name>/
        config.json          resolved training config          (written by the trainer)
        tokenizer.json       copy of the data's tokenizer, so the run is self-contained
        data_meta.json       copy of the data's meta.json (tokenizer hash, byte counts, ...)
        metrics.jsonl        one JSON line per optimiser step / evaluation
        checkpoints/
            latest           text file: name of the newest complete checkpoint
            best             text file: name of the checkpoint with the lowest val loss
            step_0000500/
                model.safetensors        weights (a tied matrix stored once, see "aliases")
                optimizer.safetensors    optimiser tensors, named "<param name>/<state key>"
                rng_rank0.safetensors    torch CPU/CUDA RNG of rank 0; Python and NumPy RNG
                                         states in its metadata (one file per rank)
                state.json               everything else: step, model config, optimiser
                                         hyper-parameters, schedule, data position, ...

Nothing is pickled: tensors are safetensors, the rest is JSON. A checkpoint is written into
``checkpoints/.tmp-step_XXXXXXX``, every file fsync'ed, then the folder is renamed into place
and only then does ``latest`` (written atomically) point at it. A crash at any moment leaves
either the previous checkpoint or the new one as ``latest``, never a partial one; stale
temporary folders are swept at the next save. Old checkpoints are deleted only after the new
one is safe; the last ``keep_last`` and the best are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from src.model.gpt import GPT, GPTConfig
from src.tokenizer.bpe import BPETokenizer
from src.utils.atomic import atomic_path, fsync_dir, write_json_atomic, write_text_atomic
from src.utils.cli import UserError

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
TRAIN_HINT = "train one with `python train.py` (see `python train.py --help`)"


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


# ----------------------------------------------------------------------------------------------
# Tensors <-> safetensors files


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors (contiguous CPU copies) to ``path`` atomically and fsync'ed."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata)


def _split_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store each shared tensor once (safetensors refuses aliases, e.g. tied embeddings).

    Returns the unique tensors and ``{alias name: stored name}``.
    """
    unique: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t
    return unique, aliases


def _read_model_tensors(ckpt: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = ckpt / "model.safetensors"
    try:
        state = load_file(str(path), device=str(device))
        with safe_open(str(path), framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except Exception as exc:  # safetensors raises several types on a corrupt file
        raise UserError(f"cannot read {path}: {exc}") from None
    for alias, name in aliases.items():
        state[alias] = state[name]
    return state


def _to_json(obj: Any) -> Any:
    """Optimiser hyper-parameters -> JSON (tuples become lists, tensors become numbers)."""
    if isinstance(obj, torch.Tensor):
        return obj.item()
    if isinstance(obj, (list, tuple)):
        return [_to_json(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------------------------
# RNG states (every generator a training step touches)


def _rng_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"rng_rank{rank}.safetensors"


def save_rng(path: Path) -> None:
    """Python, NumPy, torch CPU and (when present) CUDA RNG states of this process."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": json.dumps([version, list(internal), gauss]),
        "numpy": json.dumps([np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                             float(np_state[4])]),
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    _save_tensors(path, tensors, meta)


def load_rng(path: Path) -> None:
    """Restore the RNG states written by :func:`save_rng`."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    version, internal, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


# ----------------------------------------------------------------------------------------------
# Saving


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def read_pointer(ckpt_root: Path, name: str) -> Path | None:
    """The complete checkpoint that ``checkpoints/<name>`` (latest or best) points at, if any."""
    try:
        target = (ckpt_root / name).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    path = ckpt_root / target
    return path if target.startswith("step_") and is_complete(path) else None


def is_complete(ckpt: Path) -> bool:
    return (ckpt / "state.json").is_file() and (ckpt / "model.safetensors").is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and is_complete(p))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (the ``latest`` pointer, else the highest step)."""
    root = Path(run_dir) / CHECKPOINTS
    found = read_pointer(root, "latest")
    if found is not None:
        return found
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def best_checkpoint(run_dir: str | Path) -> Path | None:
    return read_pointer(Path(run_dir) / CHECKPOINTS, "best")


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    state: dict[str, Any],
    *,
    keep_last: int = 3,
    is_best: bool = False,
) -> Path:
    """Write checkpoint ``step`` of ``model`` (unwrapped: not DDP/compiled; FSDP2 is fine) and
    its optimisers, plus the JSON-able ``state`` (data position, schedule, config, ...).

    Collective under torch.distributed: every rank must call it. Rank 0 writes the weights and
    optimiser (gathered to full tensors), every rank its own RNG file. Returns the folder.
    """
    rank, world = _rank_world()
    root = Path(run_dir) / CHECKPOINTS
    name = checkpoint_name(step)
    tmp, final = root / f".tmp-{name}", root / name
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, list(optimizers), options=opts)

    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a crash (only one writer per run)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    save_rng(_rng_file(tmp, rank))
    _barrier()
    if rank == 0:
        weights, aliases = _split_shared(model_sd)
        _save_tensors(tmp / "model.safetensors", weights,
                      {"format": "pt", "aliases": json.dumps(aliases)})
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_scalars: dict[str, dict[str, Any]] = {}
        for pname, pstate in optim_sd["state"].items():
            for key, value in pstate.items():
                if isinstance(value, torch.Tensor):
                    opt_tensors[f"{pname}/{key}"] = value
                else:
                    opt_scalars.setdefault(pname, {})[key] = _to_json(value)
        _save_tensors(tmp / "optimizer.safetensors", opt_tensors, {"format": "pt"})
        full_state = {
            **state,
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": world,
            "optimizer": {"param_groups": _to_json(optim_sd["param_groups"]), "scalars": opt_scalars},
        }
        write_json_atomic(tmp / "state.json", full_state)
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. stopped right after a resume)
            old = root / f".tmp-old-{name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
        write_text_atomic(root / "latest", name + "\n")
        if is_best:
            write_text_atomic(root / "best", name + "\n")
        _prune(root, keep_last)
    _barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    """Delete step checkpoints beyond the newest ``keep_last``, never the latest or the best."""
    keep = {p.name for p in sorted(root.glob("step_*"))[-keep_last:]}
    for pointer in ("latest", "best"):
        target = read_pointer(root, pointer)
        if target is not None:
            keep.add(target.name)
    for p in root.glob("step_*"):
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Loading


def read_state(ckpt: str | Path) -> dict[str, Any]:
    """The JSON part of a checkpoint, checked for a known format version."""
    path = Path(ckpt) / "state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read checkpoint {path}: {exc}") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format {state.get('format_version')!r} is not "
                        f"supported (this code reads format {FORMAT_VERSION})")
    return state


def load_checkpoint(
    ckpt: str | Path,
    model: torch.nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    *,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore weights, optimiser state and (by default) this rank's RNG from ``ckpt`` into an
    unwrapped ``model`` and the optimisers built for it. Returns the checkpoint's JSON state.

    Collective under torch.distributed (FSDP2 shards the full tensors as it loads).
    """
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    model_sd = _read_model_tensors(ckpt)
    try:
        opt_tensors = load_file(str(ckpt / "optimizer.safetensors"))
    except Exception as exc:
        raise UserError(f"cannot read {ckpt / 'optimizer.safetensors'}: {exc}") from None
    per_param: dict[str, dict[str, Any]] = {}
    for key, value in opt_tensors.items():
        pname, _, skey = key.rpartition("/")
        per_param.setdefault(pname, {})[skey] = value
    for pname, scalars in state["optimizer"]["scalars"].items():
        per_param.setdefault(pname, {}).update(scalars)
    optim_sd = {"state": per_param, "param_groups": state["optimizer"]["param_groups"]}
    opts = StateDictOptions(full_state_dict=True, strict=True)
    try:
        set_state_dict(model, list(optimizers), model_state_dict=model_sd,
                       optim_state_dict=optim_sd, options=opts)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise UserError(f"checkpoint {ckpt} does not match this model/optimiser "
                        f"(different preset, shape or --optimizer?): {str(exc).splitlines()[0]}") from None
    if restore_rng:
        rank, world = _rank_world()
        rng = _rng_file(ckpt, rank)
        if rng.is_file():
            load_rng(rng)
        elif rank == 0 or world == state.get("world_size"):
            raise UserError(f"checkpoint {ckpt} has no {rng.name}")
    return state


def _newest_run(runs: Path) -> Path | None:
    candidates = []
    for run in runs.iterdir() if runs.is_dir() else ():
        if not run.is_dir():
            continue
        ckpt = best_checkpoint(run) or latest_checkpoint(run)
        if ckpt is not None:
            candidates.append((ckpt.stat().st_mtime, run))
    return max(candidates)[1] if candidates else None


def resolve_checkpoint(path: str | Path | None = None) -> Path:
    """A run dir (its best checkpoint, else its latest), a checkpoint dir, or None (the newest
    run under ./runs) -> the checkpoint folder to load. UserError when there is none."""
    if path is None:
        runs = Path("runs")
        run = _newest_run(runs)
        if run is None:
            raise UserError(f"no trained model found under {runs.resolve()}; {TRAIN_HINT}")
        path = run
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; give a run folder (runs/<name>) or {TRAIN_HINT}")
    if path.is_file():
        path = path.parent
    if (path / "state.json").is_file() or path.name.startswith("step_"):
        if not is_complete(path):
            raise UserError(f"checkpoint {path} is incomplete (no state.json or model.safetensors)")
        return path
    if path.name == CHECKPOINTS:
        path = path.parent
    ckpt = best_checkpoint(path) or latest_checkpoint(path)
    if ckpt is None:
        raise UserError(f"no complete checkpoint in {path}; {TRAIN_HINT}")
    return ckpt


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu"):
    """Load a trained model for inference: ``(GPT in eval mode, BPETokenizer, info)``.

    ``path``: a run folder (its best checkpoint if any, else the latest), a checkpoint folder,
    or None for the newest run under ``runs/``. ``info`` holds ``run_dir``, ``checkpoint``,
    ``step``, ``val_loss``, ``best_val_loss``, ``model_config``, ``train_config``,
    ``tokenizer_hash`` and ``data_meta`` (the data's meta.json, or None).
    Weights are read with safetensors only; raises UserError if nothing usable is found.
    """
    ckpt = resolve_checkpoint(path)
    run_dir = ckpt.parent.parent
    state = read_state(ckpt)
    model = GPT(GPTConfig.from_dict(state["model_config"]))
    weights = _read_model_tensors(ckpt)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{ckpt / 'model.safetensors'} does not match its model config: "
                        f"{str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise UserError(f"{run_dir} has no tokenizer.json (the run folder is incomplete)")
    tokenizer = BPETokenizer.load(tok_path)
    if tokenizer.hash != state.get("tokenizer_hash"):
        raise UserError(f"{tok_path} (hash {tokenizer.hash[:12]}) is not the tokenizer this "
                        f"checkpoint was trained with ({str(state.get('tokenizer_hash'))[:12]})")
    meta_path = run_dir / "data_meta.json"
    info = {
        "run_dir": run_dir,
        "checkpoint": ckpt,
        "step": state["step"],
        "val_loss": state.get("val_loss"),
        "best_val_loss": state.get("best_val_loss"),
        "model_config": state["model_config"],
        "train_config": state.get("train_config"),
        "tokenizer_hash": state.get("tokenizer_hash"),
        "data_meta": json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else None,
    }
    return model, tokenizer, info
