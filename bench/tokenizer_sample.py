"""What training the tokenizer on a sample costs: bytes per token on the validation split.

    python bench/tokenizer_sample.py                         # ../shared/data, vocab 16,384
    python bench/tokenizer_sample.py --fractions 0.125,0.25,0.5

prepare_data.py trains the tokenizer on an evenly spread sample of the training documents
when there is more text than ``--tokenizer-sample-mb`` (src/data/corpus.py: spread_sample).
This trains one tokenizer on all of WikiText-2 + DailyDialog train and one per sample
fraction, exactly as prepare_data.py feeds them (detokenised documents), and scores each on
the validation documents: bytes per token (higher is better) and its loss against "all".
Results go to bench/results/tokenizer_sample.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.data.corpus import resolve_parts, spread_sample, unit_chars, unit_texts
from src.tokenizer.bpe import BPETokenizer
from src.utils.atomic import write_json_atomic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--fractions", default="0.125,0.25,0.5")
    args = p.parse_args()
    parts = resolve_parts(["wikitext", "dailydialog"], ["train", "validation"], data_dir=Path(args.data_dir),
                          hub_wikitext="", wikitext_variant="auto", text_files=[], text_val_every=100)
    train = [p for p in parts if p.split == "train"]
    val_texts = [t for p in parts if p.split == "validation" for u in p.make_units() for t in unit_texts(u, True)]
    val_bytes = sum(len(t.encode("utf-8")) for t in val_texts)
    total_mb = sum(p.text_chars for p in train) / 1e6

    rows = []
    for fraction in [1.0] + [float(f) for f in args.fractions.split(",")]:
        texts = [t for p in train for u in spread_sample(p.make_units(), fraction) for t in unit_texts(u, True)]
        sample_mb = sum(unit_chars(u) for p in train for u in spread_sample(p.make_units(), fraction)) / 1e6
        start = time.perf_counter()
        tok = BPETokenizer.train(texts, args.vocab_size)
        seconds = time.perf_counter() - start
        tokens = sum(len(tok.encode(t)) for t in val_texts)
        rows.append({"fraction": fraction, "sample_mb": round(sample_mb, 2), "train_seconds": round(seconds, 1),
                     "val_tokens": tokens, "bytes_per_token": round(val_bytes / tokens, 4)})
        print(f"sample {fraction:>6.3f} ({sample_mb:5.1f} of {total_mb:.1f} MB): {seconds:5.1f} s, "
              f"{val_bytes / tokens:.4f} bytes/token on validation", flush=True)
    for row in rows:
        row["tokens_vs_all"] = round(row["val_tokens"] / rows[0]["val_tokens"] - 1, 5)
    write_json_atomic(ROOT / "bench" / "results" / "tokenizer_sample.json",
                      {"benchmark": "tokenizer_sample", "vocab_size": args.vocab_size, "train_mb": total_mb,
                       "val_bytes": val_bytes, "rows": rows})


if __name__ == "__main__":
    main()
