"""Benchmark export.py: seconds to export a gpt-60m run (random weights; the time does not
depend on their values) as a Hugging Face folder (fp32) and as GGUF f16 and q8_0.

    python bench/export.py

The run is made in a temporary folder: a 16,384-token tokenizer trained on the WikiText-2
validation text and one weights-only checkpoint. Each export is timed once, from the call to
the renamed output folder (loading the checkpoint included). Results are printed and written
to bench/results/export.json.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from src.checkpoint import save_model_checkpoint
from src.export import export_run
from src.model.gpt import GPT
from src.tokenizer.bpe import BPETokenizer
from src.training.presets import model_config

VALID = ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"


def make_run(folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the validation text may allow fewer merges
        tok = BPETokenizer.train([VALID.read_text(encoding="utf-8")], 16384)
    torch.manual_seed(0)
    model = GPT(model_config("gpt-60m", vocab_size=tok.vocab_size))
    run = folder / "run"
    run.mkdir()
    tok.save(run / "tokenizer.json")
    save_model_checkpoint(run, 1, model.state_dict(), {
        "model_config": model.config.to_dict(), "tokenizer_hash": tok.hash}, is_best=True)
    print(f"gpt-60m: {model.num_params() / 1e6:.1f}M parameters, vocabulary {tok.vocab_size}")
    return run


def main() -> None:
    results = {"machine": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp))
        for fmt, dtype in (("hf", "float32"), ("gguf", "float16"), ("gguf", "q8_0")):
            start = time.perf_counter()
            result = export_run(run, Path(tmp) / f"{fmt}-{dtype}", fmt=fmt, dtype=dtype)
            seconds = time.perf_counter() - start
            size = sum(s for _, s in result.files)
            results["cases"][f"{fmt} {dtype}"] = {"seconds": round(seconds, 2),
                                                  "megabytes": round(size / 1e6, 1)}
            print(f"{fmt:5} {dtype:8} {seconds:6.1f} s  {size / 1e6:7.1f} MB")
    out = ROOT / "bench" / "results" / "export.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
