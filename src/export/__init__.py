"""The export room: a trained run as a Hugging Face folder and/or a GGUF file, and a Hugging
Face Llama folder back as a run (``python export.py``). It reads runs through src/checkpoint
and takes weight names from src/model and tokenizer formats from src/tokenizer; it never
imports src/training (export and training are siblings)."""

from src.export.pipeline import DTYPES, FORMATS, ExportResult, export_run, import_hf

__all__ = ["DTYPES", "FORMATS", "ExportResult", "export_run", "import_hf"]
