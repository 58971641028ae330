"""notebooks/training.ipynb runs unattended, top to bottom, so it can never rot."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_training_notebook_runs(tmp_path, monkeypatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(ROOT / "notebooks" / "training.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), (
        "commit the notebook without outputs")
    work = tmp_path / "notebook-work"
    monkeypatch.setenv("GPT_NOTEBOOK_WORK", str(work))  # the kernel inherits it
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "notebooks")}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    outputs = "".join(
        o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "assistant:" in outputs and "word" in outputs
    # The tokenizer demo shows a piece that is part of a character as its bytes, not as '�'.
    assert "b'\\x" in outputs and "\ufffd" not in outputs
    # Nothing is left behind: it worked in the folder given (no temporary folder of its own)
    # and removed it at the end.
    assert f"working folder: {work}" in outputs
    assert f"removed {work}" in outputs and not work.exists()
