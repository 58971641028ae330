"""Is a checkpoint folder intact? The checks behind every load and resume.

A checkpoint's ``state.json`` (written last) records the size and SHA-256 of each other file
of the folder under ``"files"`` and is sealed with its own checksum (src/utils/integrity.py).
:func:`checkpoint_problem` checks, cheapest first:

* state.json: present, a readable file, valid JSON, a known format, its own checksum;
* each file needed: present, a regular readable file, the recorded size (always), the
  recorded SHA-256 (only with ``hashes``: reading every byte costs time), and for
  ``.safetensors`` a well-formed header whose tensors fill the file exactly (reads a few KB;
  catches a damaged header without hashing).

Checkpoints written before sizes and hashes were recorded (no ``"files"``) get the format
checks only. The checks read files and never unpickle anything.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Collection
from pathlib import Path
from typing import Any

from src.utils.integrity import file_problem, file_record, seal_problem

FORMAT_VERSION = 1
STATE_FILE = "state.json"
WEIGHTS_FILE = "model.safetensors"
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def parse_state(ckpt: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(state, None)`` for a readable, well-formed, unchanged state.json of checkpoint folder
    ``ckpt``; ``(None, what is wrong)`` otherwise."""
    path = ckpt / STATE_FILE
    problem = file_problem(path)
    if problem:
        return None, problem
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        return None, f"{STATE_FILE} cannot be read ({exc.strerror})"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, f"{STATE_FILE} is not valid JSON (damaged or cut short)"
    if not isinstance(state, dict):
        return None, f"{STATE_FILE} is not a JSON object"
    problem = seal_problem(state, STATE_FILE)
    if problem:
        return None, problem
    if state.get("format_version") != FORMAT_VERSION:
        return None, (f"{STATE_FILE} has checkpoint format {state.get('format_version')!r}; "
                      f"this code reads format {FORMAT_VERSION}")
    return state, None


def safetensors_problem(path: Path) -> str | None:
    """None when ``path`` has a well-formed safetensors header whose tensors end exactly at the
    end of the file; otherwise what is wrong. Reads only the header."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = path.stat().st_size
            if len(head) < 8:
                return f"{path.name} is {size} bytes, too short for a safetensors file"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                return f"{path.name} has a damaged safetensors header (length {n} > file)"
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as exc:
        return f"{path.name} cannot be read ({exc.strerror})"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"{path.name} has a damaged safetensors header (not valid JSON)"
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return f"{path.name} has a damaged safetensors header (bad tensor entry)"
    if max(ends, default=0) != size - 8 - n:
        return (f"{path.name} holds {size - 8 - n:,} bytes of tensor data, its header describes "
                f"{max(ends, default=0):,} (truncated?)")
    return None


def checkpoint_problem(ckpt: Path, *, hashes: bool = False,
                       files: Collection[str] | None = None) -> str | None:
    """None when checkpoint folder ``ckpt`` is intact for the files in ``files`` (None: every
    file state.json records, or every ``.safetensors`` of an older checkpoint), always including
    state.json and model.safetensors; otherwise what is wrong, one phrase naming the file.
    ``hashes``: also compare SHA-256s (reads every byte)."""
    if not ckpt.is_dir():
        return f"{ckpt.name} is not a folder"
    state, problem = parse_state(ckpt)
    if problem:
        return problem
    records = state.get("files")
    if not isinstance(records, dict):  # written before sizes and hashes were recorded
        records = None
    if files is not None:
        names = [WEIGHTS_FILE, *(n for n in files if n != WEIGHTS_FILE)]
    elif records is not None:
        names = [WEIGHTS_FILE, *sorted(n for n in records if n != WEIGHTS_FILE)]
    else:
        names = [WEIGHTS_FILE, *sorted(p.name for p in ckpt.glob("*.safetensors")
                                       if p.name != WEIGHTS_FILE)]
    for name in names:
        path = ckpt / name
        record = records.get(name) if records is not None else None
        if records is not None and record is None:
            return f"{name} is not recorded in {STATE_FILE}"
        problem = file_problem(path, record, hashes=hashes)
        if problem is None and name.endswith(".safetensors"):
            problem = safetensors_problem(path)
        if problem:
            return problem
    return None


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file of a checkpoint folder being written (not state.json,
    which will hold them, nor hidden temporary files), for state.json's ``"files"``."""
    return {p.name: file_record(p) for p in sorted(folder.iterdir())
            if p.is_file() and p.name != STATE_FILE and not p.name.startswith(".")}
