"""Export a trained run for other tools: ``python export.py``.

    python export.py --out exported/                        # newest run, best checkpoint, HF folder
    python export.py --run runs/small --out out/ --format both --dtype bfloat16
    python export.py --run runs/small --out out/ --format gguf --dtype q8_0
    python export.py --from-hf exported/ --out runs/imported   # a HF Llama folder -> a run

``--format hf`` writes a folder ``transformers`` loads without ``trust_remote_code``
(config.json, model.safetensors, generation_config.json, the tokenizer files with the chat
template, a README model card); ``--format gguf`` writes ``model-<type>.gguf`` (f32, f16,
bf16 or q8_0); ``both`` writes both into the folder. A non-empty ``--out`` is replaced only
with ``--force``; it is written into a temporary folder beside it and renamed when whole.
See src/export/ for the details.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the repository root

from src.export import DTYPES, FORMATS, export_run, import_hf
from src.utils.cli import UserError, run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Export a trained run as a Hugging Face folder and/or a GGUF file, or "
                    "convert a Hugging Face Llama folder into a run (--from-hf).")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run", type=Path, help="run folder (default: the newest run under runs/)")
    source.add_argument("--from-hf", type=Path, metavar="DIR",
                        help="convert this Hugging Face Llama folder into a run written to --out")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--format", default="hf", help=f"{' | '.join(FORMATS)} (default hf)")
    parser.add_argument("--dtype", default="float32",
                        help=f"{' | '.join(DTYPES)} (default float32; q8_0: GGUF only)")
    parser.add_argument("--checkpoint", default="best",
                        help="best | latest | a step number (default best)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    if args.from_hf is not None:
        if (args.format, args.dtype, args.checkpoint) != ("hf", "float32", "best"):
            raise UserError("--from-hf takes only --out and --force (the run keeps fp32 weights)")
        result = import_hf(args.from_hf, args.out, force=args.force)
    else:
        result = export_run(args.run, args.out, fmt=args.format, dtype=args.dtype,
                            checkpoint=args.checkpoint, force=args.force)
    print(result.describe())
    return 0


if __name__ == "__main__":
    run_cli(main)
