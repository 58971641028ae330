"""The tokenizer's command line: python src/tokenizer/cli.py train|encode|decode|stats|export."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from src.tokenizer.bpe import BPETokenizer
from src.tokenizer.cli import main
from src.utils.cli import UserError

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "log", "it's", "naïve", "café", "東京", "😀", "running", "quickly", "jumped", "over", "lazy", "brown", "fox"]
TEXT = "".join(f"{WORDS[i % 19]} {WORDS[i * 7 % 19]}{i % 13}, {WORDS[i * 3 % 19]}.\r\n" for i in range(400))


def cli(*args, stdin=None, binary=False):
    return subprocess.run(
        [sys.executable, str(ROOT / "src" / "tokenizer" / "cli.py"), *map(str, args)],
        input=stdin.encode() if binary and stdin is not None else stdin,
        capture_output=True, timeout=120, **({} if binary else {"text": True, "encoding": "utf-8"}),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    corpus = folder / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = folder / "tok.json"
    r = cli("train", "--input", corpus, "--vocab-size", 330, "--output", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "vocab_size 330" in r.stderr
    return folder, corpus, out


def test_train_encode_decode_pipeline(trained):
    folder, corpus, tok_path = trained
    tok = BPETokenizer.load(tok_path)
    r = cli("encode", "--tokenizer", tok_path, "--input", corpus)
    assert r.returncode == 0, r.stderr
    ids = [int(x) for x in r.stdout.split()]
    assert ids == tok.encode(TEXT)
    r = cli("decode", "--tokenizer", tok_path, stdin=r.stdout, binary=True)
    assert r.returncode == 0 and r.stdout == TEXT.encode("utf-8")  # exact bytes, \r\n kept


def test_big_input_encodes_block_by_block_with_same_ids(trained, tmp_path):
    _, _, tok_path = trained
    tok = BPETokenizer.load(tok_path)
    big = tmp_path / "big.txt"
    big.write_text(TEXT * 150, encoding="utf-8")  # > 1 MB characters: several blocks
    main(["encode", "--tokenizer", str(tok_path), "--input", str(big), "--output", str(tmp_path / "ids")])
    assert [int(x) for x in (tmp_path / "ids").read_text().split()] == tok.encode(TEXT * 150)


def test_train_files(trained):
    _, corpus, tok_path = trained
    assert BPETokenizer.train_files([corpus], 330).hash == BPETokenizer.load(tok_path).hash


def test_encode_specials_only_when_asked(trained, tmp_path, capsys):
    _, _, tok_path = trained
    tok = BPETokenizer.load(tok_path)
    src = tmp_path / "in.txt"
    src.write_text("hi<|endoftext|>", encoding="utf-8")
    main(["encode", "--tokenizer", str(tok_path), "--input", str(src), "--output", str(tmp_path / "plain")])
    main(["encode", "--tokenizer", str(tok_path), "--input", str(src), "--output", str(tmp_path / "sp"), "--special"])
    plain = [int(x) for x in (tmp_path / "plain").read_text().split()]
    special = [int(x) for x in (tmp_path / "sp").read_text().split()]
    assert tok.eot_id not in plain and special[-1] == tok.eot_id


def test_stats(trained, capsys):
    _, corpus, tok_path = trained
    main(["stats", "--tokenizer", str(tok_path), "--input", str(corpus)])
    out = capsys.readouterr().out
    tok = BPETokenizer.load(tok_path)
    n_bytes, n_tokens = len(TEXT.encode()), len(tok.encode(TEXT))
    assert f"{n_bytes / n_tokens:.3f}" in out and "yes" in out and f"{n_tokens:,}" in out


def test_export_both_formats(trained, tmp_path):
    _, _, tok_path = trained
    main(["export", "--tokenizer", str(tok_path), "--format", "hf", "--output", str(tmp_path / "hf.json")])
    assert json.loads((tmp_path / "hf.json").read_text())["model"]["type"] == "BPE"
    main(["export", "--tokenizer", str(tok_path), "--format", "tiktoken", "--output", str(tmp_path / "t.tiktoken")])
    lines = (tmp_path / "t.tiktoken").read_text().splitlines()
    assert len(lines) == BPETokenizer.load(tok_path).vocab_size - 16


def test_help():
    r = cli("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ["train", "encode", "decode", "stats", "export"])
    r = cli("train", "--help")
    assert r.returncode == 0 and "--vocab-size" in r.stdout


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["encode", "--tokenizer", "{missing}"], "", "tokenizer file not found"),
        (["encode", "--tokenizer", "{corrupt}"], "", "not valid JSON"),
        (["decode", "--tokenizer", "{tok}"], "1 2 x\n", "'x' is not a token id"),
        (["decode", "--tokenizer", "{tok}"], "99999\n", "out of range"),
        (["train", "--input", "{missing}", "--vocab-size", "300", "--output", "{out}"], None, "file not found"),
        (["train", "--input", "{corpus}", "--vocab-size", "100", "--output", "{out}"], None, "too small"),
        (["stats", "--tokenizer", "{tok}", "--input", "{binary}"], None, "not UTF-8"),
    ],
)
def test_bad_input_is_one_line_exit_2(trained, tmp_path, args, stdin, message):
    _, corpus, tok_path = trained
    (tmp_path / "corrupt.json").write_text('{"format": "gpt-model-bpe", "merg')
    (tmp_path / "binary.bin").write_bytes(b"\xff\xfe\x00abc")
    paths = {
        "missing": tmp_path / "missing.json", "corrupt": tmp_path / "corrupt.json", "tok": tok_path,
        "out": tmp_path / "out.json", "corpus": corpus, "binary": tmp_path / "binary.bin",
    }
    r = cli(*[a.format(**paths) for a in args], stdin=stdin)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and message in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out.json").exists()


def test_user_error_in_process(tmp_path):
    with pytest.raises(UserError, match="not found"):
        main(["stats", "--tokenizer", str(tmp_path / "none.json"), "--input", "x"])


@pytest.mark.parametrize("fmt", ["hf", "tiktoken"])
def test_export_refuses_a_vocabulary_the_format_cannot_hold(tmp_path, fmt):
    # Hand-made merges where two pairs make "abc" (training never produces this).
    path = tmp_path / "dup.json"
    BPETokenizer([(97, 98), (256, 99), (98, 99), (97, 258)]).save(path)
    with pytest.raises(UserError, match="same bytes"):
        main(["export", "--tokenizer", str(path), "--format", fmt, "--output", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == [path]  # nothing written
