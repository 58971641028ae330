"""Training checkpoints: the model (through src/checkpoint, which owns the run layout and the
weights format) plus everything a resumed run needs to continue bit-exactly.

On top of ``model.safetensors`` and ``state.json`` (see src/checkpoint/layout.py) a training
checkpoint holds::

    optimizer.safetensors    optimiser tensors, named "<param name>/<state key>"
    rng_rank0.safetensors    torch CPU/CUDA RNG of rank 0; Python and NumPy RNG
                             states in its metadata (one file per rank)

and its state.json also holds the optimiser hyper-parameters, schedule, data position, ...
Nothing is pickled. Writing goes through a temporary folder renamed into place (see
``src.checkpoint.publish_checkpoint``); stale temporary folders are swept at the next save,
and a failed save removes its own. state.json, written last, records the size and SHA-256 of
every other file (src/checkpoint/verify.py). Old checkpoints are deleted only after the new
one is safe; the last ``keep_last`` and the best are kept.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from src.checkpoint.layout import (
    checkpoint_name,
    publish_checkpoint,
    read_pointer,
    read_state,
    start_checkpoint,
    temporary_checkpoint_dir,
)
from src.checkpoint.weights import read_weights, save_tensors, write_state, write_weights
from src.utils.cli import UserError


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
    save_tensors(path, tensors, meta)


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
    optimiser (gathered to full tensors), every rank its own RNG file; state.json, recording
    the size and SHA-256 of each, comes last. Returns the folder.

    A failed write (a full disk: OSError ENOSPC, or any other OSError) raises that OSError on
    the rank that saw it, after every rank has left the collective part: the temporary folder
    is removed (freeing the space it took), and the previous checkpoints and the ``latest`` /
    ``best`` pointers are as they were.
    """
    rank, world = _rank_world()
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, list(optimizers), options=opts)

    tmp = temporary_checkpoint_dir(run_dir, step)
    final = tmp.parent / checkpoint_name(step)
    error: OSError | None = None
    try:
        if rank == 0:
            start_checkpoint(run_dir, step)
    except OSError as exc:
        error = exc
    _barrier()
    try:
        if error is None:
            save_rng(_rng_file(tmp, rank))
    except OSError as exc:
        error = exc
    _barrier()
    if rank == 0 and error is None:
        try:
            _write_rank0(tmp, step, model_sd, optim_sd, state, world)
            publish_checkpoint(tmp, is_best=is_best)
            _prune(tmp.parent, keep_last)
        except OSError as exc:
            error = exc
    if error is not None and rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    if error is not None:
        raise error
    return final


def _write_rank0(tmp: Path, step: int, model_sd: dict[str, torch.Tensor], optim_sd: dict[str, Any],
                 state: dict[str, Any], world: int) -> None:
    """Rank 0's files of checkpoint ``step`` in its temporary folder: weights, optimiser
    tensors, then state.json (hyper-parameters and optimiser scalars, and the file records)."""
    write_weights(tmp, model_sd)
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_scalars: dict[str, dict[str, Any]] = {}
    for pname, pstate in optim_sd["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                opt_tensors[f"{pname}/{key}"] = value
            else:
                opt_scalars.setdefault(pname, {})[key] = _to_json(value)
    save_tensors(tmp / "optimizer.safetensors", opt_tensors, {"format": "pt"})
    write_state(tmp, step, {
        **state,
        "world_size": world,
        "optimizer": {"param_groups": _to_json(optim_sd["param_groups"]), "scalars": opt_scalars},
    })


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
    model_sd = read_weights(ckpt)
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
