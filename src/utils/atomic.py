"""Atomic file writes: the one way this project writes data, tokenizers and checkpoints.

A write goes to a temporary file in the destination's folder, is flushed and fsync'ed,
then renamed over the destination. A rename within one file system is atomic, so a
reader (or a crash at any moment) sees either the old complete file or the new complete
file, never a half-written one. On any error the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _default_mode() -> int:
    """The permissions a plain ``open(path, "w")`` would give (mkstemp's are 0600): the one
    policy for every file this project writes, so a run copied to another user loads."""
    return 0o666 & ~_umask()


def _temp_beside(path: Path) -> tuple[int, Path]:
    """A new temporary file in ``path``'s folder (same file system, so rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, _default_mode())
    return fd, Path(tmp_name)


def fsync_dir(folder: Path) -> None:
    """Persist a rename: fsync the folder entry (a no-op where the OS does not allow it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open ``path`` for writing so that it appears only once the block completes.

    Usage: ``with atomic_open(p, "w", encoding="utf-8") as f: f.write(...)``.
    If the block raises, ``path`` is left untouched and the temporary file is deleted.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open is for writing, got mode {mode!r}")
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a library that writes files itself
    (e.g. ``safetensors.torch.save_file``); it is fsync'ed and renamed on success, with the
    same permissions as every other file (the library may have replaced the file with one of
    its own, e.g. mode 0600)."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), _default_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; when the block completes it replaces
    ``path`` (a missing or existing folder) in one rename, so ``path`` is never seen half
    written. If the block raises, the temporary folder is deleted and ``path`` is untouched.
    Whether an existing ``path`` may be replaced is the caller's decision."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # a plain mkdir's permissions (mkdtemp's are 0700)
    try:
        yield tmp
        fsync_dir(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old)  # an empty folder may be replaced by a rename
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON (plus a final newline) atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
