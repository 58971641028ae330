import json

import pytest

from src.utils.atomic import atomic_folder, atomic_open, atomic_path, write_json_atomic


def test_write_json_atomic_roundtrip(tmp_path):
    p = tmp_path / "sub" / "x.json"
    write_json_atomic(p, {"b": 1, "a": [1, 2]})
    assert json.loads(p.read_text()) == {"a": [1, 2], "b": 1}
    assert [f.name for f in p.parent.iterdir()] == ["x.json"]  # no temp file left


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(p, "w", encoding="utf-8") as f:
        f.write("new, half written")
        raise RuntimeError("crash mid-write")
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["x.txt"]


def test_atomic_path_for_library_writers(tmp_path):
    p = tmp_path / "w.bin"
    with atomic_path(p) as tmp:
        assert tmp != p and tmp.parent == p.parent
        tmp.write_bytes(b"abc")
        assert not p.exists()
    assert p.read_bytes() == b"abc"


def test_files_get_ordinary_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {})
    finally:
        os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def test_atomic_open_rejects_read_mode(tmp_path):
    with pytest.raises(ValueError), atomic_open(tmp_path / "x", "rb"):
        pass


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), atomic_folder(out) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt  # Ctrl-C mid-export
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("first")
        assert not out.exists()
    with atomic_folder(out) as tmp:  # replaces the folder in one rename
        (tmp / "b.txt").write_text("second")
        assert (out / "a.txt").is_file()
    assert [p.name for p in out.iterdir()] == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
