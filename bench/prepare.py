"""Benchmark data preparation: throughput (MB of input per second) and peak memory.

    python bench/prepare.py                       # ../shared/data and a 10x replicated copy
    python bench/prepare.py --data-dir DIR --workers 2 --vocab-size 16384

Each case runs ``src/data/prepare_data.py`` as a child process and samples the resident
memory of its whole process tree (main process + encoding workers) every 50 ms, so
"peak RSS" is what the machine had to hold at once. Cases:

  1x full       tokenizer training + encoding of train and val (a fresh user's run)
  1x encode     encoding only, with the tokenizer from "1x full" (--tokenizer)
  10x encode    the same on a copy where every input file is repeated 10 times
  peer          Hugging Face ``tokenizers`` (Rust) doing the same job on the 1x data:
                train a byte-level BPE of the same vocabulary on the same detokenised
                training texts, then encode every train and val document
  10x full      (only with --full-10x) tokenizer training on the 10x copy too

``--standin-103 N`` runs one case instead: a WikiText-103 stand-in in the release's layout
(``wikitext-103/wiki.train.tokens`` = WikiText-2 train repeated N times, plus the validation
and DailyDialog files) prepared in full with ``--wikitext 103``, so the tokenizer learns from
its bounded sample (``--tokenizer-sample-mb``, 64 MB by default) as on the real corpus.

Peak memory staying flat from 1x to 10x is the point of the streaming design. The 10x
copy is made in a temporary folder and deleted afterwards. Results are printed as a
table and written to bench/results/prepare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.data import sources
from src.utils.atomic import write_json_atomic


def _tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants, from /proc (Linux)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd``; return its wall time and peak process-tree RSS (raises if it fails)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss_bytes(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"benchmark case failed ({' '.join(cmd)}):\n{err[-2000:]}")
    return {"seconds": seconds, "peak_rss_mb": peak / 2**20, "stdout": out}


def input_bytes(data_dir: Path) -> int:
    """Bytes of the files a train,val run reads (as prepare_data picks them)."""
    paths = [sources.find_wikitext_file(data_dir, s) for s in ("train", "validation")]
    paths += [sources.find_dailydialog_file(data_dir, s) for s in ("train", "validation")]
    return sum(p.stat().st_size for p in paths)


def replicate(data_dir: Path, target: Path, times: int) -> None:
    """Copy the input files of ``data_dir`` into ``target``, each repeated ``times`` times."""
    for split in ("train", "validation"):
        for path in (sources.find_wikitext_file(data_dir, split), sources.find_dailydialog_file(data_dir, split)):
            dest = target / path.relative_to(data_dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            data = path.read_bytes()
            with open(dest, "wb") as f:
                for _ in range(times):
                    f.write(data)


def make_standin_103(data_dir: Path, target: Path, times: int) -> None:
    """``target/wikitext-103/`` from WikiText-2 (train repeated ``times`` times) and a copy of
    DailyDialog train / validation."""
    folder = target / "wikitext-103"
    folder.mkdir(parents=True)
    train = sources.find_wikitext_file(data_dir, "train")
    with open(folder / f"wiki.train{train.suffix}", "wb") as f:
        data = train.read_bytes()
        for _ in range(times):
            f.write(data)
    shutil.copy(sources.find_wikitext_file(data_dir, "validation", train.suffix[1:]),
                folder / f"wiki.valid{train.suffix}")
    for split in ("train", "validation"):
        path = sources.find_dailydialog_file(data_dir, split)
        dest = target / "dailydialog" / split / path.name
        dest.parent.mkdir(parents=True)
        shutil.copy(path, dest)


def peer_job(data_dir: str, vocab_size: int) -> None:
    """The peer case, run in a child process: HF tokenizers trains and encodes everything."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from src.data.corpus import unit_texts
    from src.tokenizer.special_tokens import SPECIAL_TOKENS

    def texts(split: str) -> list[str]:
        wiki = sources.find_wikitext_file(data_dir, split)
        dialog = sources.find_dailydialog_file(data_dir, split)
        units = [("wiki", a, True) for a in sources.iter_wikitext_articles(sources.iter_lines(wiki))]
        units += [("dialog", d, True) for d in sources.iter_dailydialog_file(dialog)]
        return [t for u in units for t in unit_texts(u, True)]

    train_texts = texts("train")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(train_texts, trainer=trainer)
    tokens = 0
    for split_texts in (train_texts, texts("validation")):
        for i in range(0, len(split_texts), 1024):
            tokens += sum(len(e.ids) for e in tok.encode_batch(split_texts[i : i + 1024]))
    print(json.dumps({"tokens": tokens}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--times", type=int, default=10, help="replication factor of the large case")
    p.add_argument("--full-10x", action="store_true", help="also train the tokenizer on the replicated copy")
    p.add_argument("--standin-103", type=int, metavar="N",
                   help="only: prepare a WikiText-103 stand-in (WikiText-2 train x N) with --wikitext 103")
    p.add_argument("--peer-job", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peer_job:
        peer_job(args.data_dir, args.vocab_size)
        return
    if args.standin_103:
        standin_103(Path(args.data_dir).resolve(), args)
        return

    data_dir = Path(args.data_dir).resolve()
    script = [sys.executable, "src/data/prepare_data.py"]
    common = ["--workers", str(args.workers), "--vocab-size", str(args.vocab_size), "--force"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        tmp = Path(tmp)
        one_mb = input_bytes(data_dir) / 1e6

        def case(name: str, mb: float, cmd: list[str]) -> dict:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            result = run_measured(cmd)
            row = {"case": name, "input_mb": mb, "seconds": result["seconds"], "mb_per_s": mb / result["seconds"],
                   "peak_rss_mb": result["peak_rss_mb"]}
            meta = tmp / "out" / "meta.json"
            if name != "peer" and meta.is_file():
                splits = json.loads(meta.read_text())["splits"]
                row["tokens"] = sum(s["tokens"] for s in splits.values())
            elif name == "peer":
                row["tokens"] = json.loads(result["stdout"].strip().splitlines()[-1])["tokens"]
            rows.append(row)
            return row

        out = ["--out", str(tmp / "out")]
        case("1x full", one_mb, script + ["--data-dir", str(data_dir), *out, *common])
        shutil.copy(tmp / "out" / "tokenizer.json", tmp / "tokenizer.json")
        reuse = ["--tokenizer", str(tmp / "tokenizer.json")]
        case("1x encode", one_mb, script + ["--data-dir", str(data_dir), *out, *common, *reuse])
        big = tmp / f"data-{args.times}x"
        replicate(data_dir, big, args.times)
        big_mb = input_bytes(big) / 1e6
        case(f"{args.times}x encode", big_mb, script + ["--data-dir", str(big), *out, *common, *reuse])
        if args.full_10x:
            case(f"{args.times}x full", big_mb, script + ["--data-dir", str(big), *out, *common])
        case("peer", one_mb, [sys.executable, "bench/prepare.py", "--peer-job", "--data-dir", str(data_dir),
                              "--vocab-size", str(args.vocab_size)])

    print(f"\nprepare_data: vocab {args.vocab_size}, {args.workers} workers, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")
    print(f"{'case':<12} {'input MB':>9} {'seconds':>8} {'MB/s':>7} {'peak RSS MB':>12} {'tokens':>12}")
    for r in rows:
        print(f"{r['case']:<12} {r['input_mb']:>9.1f} {r['seconds']:>8.1f} {r['mb_per_s']:>7.2f} {r['peak_rss_mb']:>12.0f} {r.get('tokens', 0):>12,}")
    print("peer = Hugging Face tokenizers (Rust): BPE training + encoding of the same detokenised documents,"
          " without writing token files")
    results = ROOT / "bench" / "results"
    report = {"benchmark": "prepare", "vocab_size": args.vocab_size, "workers": args.workers, "cpus": os.cpu_count(),
              "data_dir": str(data_dir), "rows": rows}
    write_json_atomic(results / "prepare.json", report)
    print(f"wrote {results / 'prepare.json'}")


def standin_103(data_dir: Path, args: argparse.Namespace) -> None:
    """Time and peak RSS of preparing the WikiText-103 stand-in, tokenizer training included."""
    with tempfile.TemporaryDirectory(prefix="bench-prepare-103-") as tmp:
        tmp = Path(tmp)
        make_standin_103(data_dir, tmp / "release", args.standin_103)
        mb = sum(f.stat().st_size for f in (tmp / "release").rglob("*") if f.is_file()) / 1e6
        print(f"running the WikiText-103 stand-in ({mb:.0f} MB) ...", file=sys.stderr, flush=True)
        result = run_measured([sys.executable, "src/data/prepare_data.py", "--data-dir", str(tmp / "release"),
                               "--wikitext", "103", "--out", str(tmp / "out"), "--workers", str(args.workers),
                               "--vocab-size", str(args.vocab_size)])
        meta = json.loads((tmp / "out" / "meta.json").read_text())
    row = {"case": f"wikitext-103 stand-in (WikiText-2 train x {args.standin_103})", "input_mb": mb,
           "seconds": result["seconds"], "mb_per_s": mb / result["seconds"], "peak_rss_mb": result["peak_rss_mb"],
           "tokens": sum(s["tokens"] for s in meta["splits"].values()),
           "tokenizer": meta["settings"]["tokenizer"]}
    print(f"{row['case']}: {mb:.0f} MB in {row['seconds']:.0f} s ({row['mb_per_s']:.2f} MB/s), "
          f"peak RSS {row['peak_rss_mb']:.0f} MB, {row['tokens']:,} tokens, tokenizer {row['tokenizer']}")
    write_json_atomic(ROOT / "bench" / "results" / "prepare_103.json",
                      {"benchmark": "prepare_103", "workers": args.workers, "cpus": os.cpu_count(), **row})


if __name__ == "__main__":
    main()
