"""prepare_data.py end to end on tiny corpora in the releases' formats (made by the tests)."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from src.data import corpus, prepare_data, sources, token_files
from src.data.detokenize import detokenize_dailydialog, detokenize_wikitext
from src.tokenizer.bpe import BPETokenizer
from src.tokenizer.chat_template import alternate_turns, render_chat
from src.tokenizer.special_tokens import ENDOFTEXT
from src.utils.cli import UserError

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

WIKI_TRAIN = (
    " \n = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : 戦場のヴァルキュリア3 ) "
    ", is a tactical role @-@ playing video game . \n \n = = Gameplay = = \n \n"
    " The game 's opening theme was sung by May 'n . It cost $ 14 @,@ 000 . \n \n"
    " = Tower Building = \n \n The Tower Building , also known as U.S. Arsenal Building , is a building . \n \n"
)
WIKI_VALID = " \n = Homarus gammarus = \n \n It may grow to a length of 60 cm ( 24 in ) . \n \n"
WIKI_TEST = " \n = Robert Boulter = \n \n Robert Boulter is an English film actor . \n \n"
DD_TRAIN = (
    "Say , Jim , how about going for a few beers after dinner ? __eou__ Good.Let ' s go now . __eou__ \n"
    "Can you do push-ups ? __eou__ Of course I can . It's a piece of cake ! __eou__ Really ? __eou__ \n"
    "I ’ m a defender . __eou__ You don ’ t say ! __eou__ \n"
)
DD_VALID = "Excuse me . Is this seat taken ? __eou__ No , it isn't . __eou__ \n"
DD_TEST = "Hello , Could you connect me to Mr . Cook's office ? __eou__ One moment . __eou__ \n"


def make_release(root: Path) -> Path:
    (root / "wikitext-2").mkdir(parents=True)
    (root / "wikitext-2" / "wiki.train.tokens").write_text(WIKI_TRAIN, encoding="utf-8")
    (root / "wikitext-2" / "wiki.valid.tokens").write_text(WIKI_VALID, encoding="utf-8")
    (root / "wikitext-2" / "wiki.test.tokens").write_text(WIKI_TEST, encoding="utf-8")
    for split, text in (("train", DD_TRAIN), ("validation", DD_VALID), ("test", DD_TEST)):
        (root / "dailydialog" / split).mkdir(parents=True)
        (root / "dailydialog" / split / f"dialogues_{split}.txt").write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def release(tmp_path):
    return make_release(tmp_path / "release")


def run(data_dir, out, *extra):
    return prepare_data.main(["--data-dir", str(data_dir), "--out", str(out), "--vocab-size", "400", "--workers", "1", *extra])


def documents(out: Path, name: str) -> list[str]:
    """The decoded documents of a token file (each ends in <|endoftext|>)."""
    meta = json.loads((out / "meta.json").read_text())
    tok = BPETokenizer.load(out / "tokenizer.json")
    ids = np.fromfile(out / name, dtype=meta["dtype"])
    assert ids[-1] == tok.eot_id
    text = tok.decode(ids.tolist())
    return [d + ENDOFTEXT for d in text.split(ENDOFTEXT)[:-1]]


def expected_documents(wiki: str, dialogues: str, detokenize: bool = True) -> list[str]:
    articles = list(sources.iter_wikitext_articles(wiki.split("\n")))
    docs = [(detokenize_wikitext(a) if detokenize else a) + ENDOFTEXT for a in articles]
    for line in dialogues.splitlines():
        utterances = sources.parse_dialogue(line, "test")
        if detokenize:
            utterances = [detokenize_dailydialog(u) for u in utterances]
        docs.append(render_chat(alternate_turns(utterances)))
    return docs


def test_prepares_local_release(release, tmp_path, capsys):
    out = tmp_path / "data"
    assert run(release, out) == 0
    assert sorted(p.name for p in out.iterdir()) == [".tokenizer.fingerprint", "meta.json", "tokenizer.json", "train.bin", "val.bin"]
    meta = json.loads((out / "meta.json").read_text())
    tok = BPETokenizer.load(out / "tokenizer.json")
    assert meta["tokenizer_hash"] == tok.hash and meta["vocab_size"] == tok.vocab_size == 400
    assert meta["dtype"] == "uint16" and meta["detokenized"] is True and meta["format_version"] == 1
    assert meta["mix"] == {"wikitext": 1.0, "dailydialog": 1.0}

    # The files decode back to exactly the detokenised documents, in source order.
    assert documents(out, "train.bin") == expected_documents(WIKI_TRAIN, DD_TRAIN)
    assert documents(out, "val.bin") == expected_documents(WIKI_VALID, DD_VALID)
    assert "<|user|>Say, Jim, how about going for a few beers after dinner?<|assistant|>Good. Let's go now." in documents(out, "train.bin")[2]

    train = meta["splits"]["train"]
    assert (train["documents"], train["by_source"]["wikitext"]["documents"], train["by_source"]["dailydialog"]["documents"]) == (5, 2, 3)
    assert train["tokens"] == os.path.getsize(out / "train.bin") // 2
    assert train["tokens"] == sum(s["tokens"] for s in train["by_source"].values())
    articles = [detokenize_wikitext(a) for a in sources.iter_wikitext_articles(WIKI_TRAIN.split("\n"))]
    assert train["by_source"]["wikitext"]["bytes"] == sum(len(a.encode()) for a in articles)
    assert train["by_source"]["wikitext"]["variant"] == "tokens"
    wiki_input = meta["sources"]["wikitext"]["inputs"]["train"][0]
    assert wiki_input["sha256"] == sources.check_text_file(release / "wikitext-2" / "wiki.train.tokens").sha256
    assert set(meta["sources"]["dailydialog"]["inputs"]) == {"train", "val"}  # never test
    assert "wrote" in capsys.readouterr().out


def test_rerun_is_a_no_op_until_inputs_or_settings_change(release, tmp_path, capsys):
    out = tmp_path / "data"
    run(release, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert run(release, out) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    # Same bytes rewritten: still up to date (inputs are compared by sha256, not mtime).
    path = release / "dailydialog" / "train" / "dialogues_train.txt"
    path.write_text(DD_TRAIN, encoding="utf-8")
    run(release, out)
    assert "nothing to do" in capsys.readouterr().out
    # Changed input, changed setting, --force, or a truncated output: work again.
    path.write_text(DD_TRAIN + "Bye . __eou__ \n", encoding="utf-8")
    run(release, out)
    captured = capsys.readouterr()
    assert "nothing to do" not in captured.out
    assert "training the tokenizer" in captured.err  # new training text: new tokenizer
    assert json.loads((out / "meta.json").read_text())["splits"]["train"]["by_source"]["dailydialog"]["documents"] == 4
    run(release, out, "--mix", "dailydialog=2")
    assert "nothing to do" not in capsys.readouterr().out
    run(release, out, "--mix", "dailydialog=2", "--force")
    assert "nothing to do" not in capsys.readouterr().out
    with open(out / "val.bin", "r+b") as f:
        f.truncate(4)
    run(release, out, "--mix", "dailydialog=2")
    assert "nothing to do" not in capsys.readouterr().out


def test_keep_tokenized(release, tmp_path):
    out = tmp_path / "data"
    run(release, out, "--keep-tokenized")
    assert json.loads((out / "meta.json").read_text())["detokenized"] is False
    assert documents(out, "train.bin") == expected_documents(WIKI_TRAIN, DD_TRAIN, detokenize=False)


def test_mixing_weights_repeat_documents(release, tmp_path):
    out = tmp_path / "data"
    run(release, out, "--mix", "wikitext=2,dailydialog=0.34")
    meta = json.loads((out / "meta.json").read_text())
    by_source = meta["splits"]["train"]["by_source"]
    assert by_source["wikitext"]["documents"] == 4 and by_source["dailydialog"]["documents"] == 1
    expected = expected_documents(WIKI_TRAIN, DD_TRAIN)
    wiki, dialogues = expected[:2], expected[2:]
    assert documents(out, "train.bin") == wiki + wiki + [dialogues[2]]
    assert documents(out, "val.bin") == expected_documents(WIKI_VALID, DD_VALID)  # never mixed
    assert meta["mix"] == {"wikitext": 2.0, "dailydialog": 0.34}


def test_fractional_documents_are_evenly_spread():
    assert token_files.fractional_documents(10, 0.3).tolist() == [3, 6, 9]
    assert token_files.fractional_documents(4, 0.5).tolist() == [1, 3]
    assert len(token_files.fractional_documents(1000, 0.25)) == 250


def test_weight_zero_drops_a_source(release, tmp_path):
    out = tmp_path / "data"
    run(release, out, "--mix", "dailydialog=0")
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta["splits"]["val"]["by_source"]) == {"wikitext"}


def test_test_split_is_separate_and_reuses_the_tokenizer(release, tmp_path, capsys):
    out = tmp_path / "data"
    with pytest.raises(UserError, match="no tokenizer to encode test"):
        run(release, out, "--splits", "test")
    run(release, out)
    train_bytes = (out / "train.bin").read_bytes()
    run(release, out, "--splits", "test")
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta["splits"]) == {"train", "val", "test"}
    assert documents(out, "test.bin") == expected_documents(WIKI_TEST, DD_TEST)
    assert (out / "train.bin").read_bytes() == train_bytes
    capsys.readouterr()
    run(release, out, "--splits", "test")
    assert "nothing to do" in capsys.readouterr().out
    run(release, out)  # train/val still up to date after the test run
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(UserError, match="prepare test on its own"):
        run(release, out, "--splits", "train,test")


def test_user_text_jsonl_with_held_out_validation(release, tmp_path):
    corpus = tmp_path / "mine.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document number {i}."}) + "\n" for i in range(6)), encoding="utf-8")
    out = tmp_path / "data"
    prepare_data.main(["--text", str(corpus), "--out", str(out), "--vocab-size", "280", "--workers", "1", "--text-val-every", "3"])
    assert documents(out, "train.bin") == [f"Document number {i}.{ENDOFTEXT}" for i in (0, 1, 3, 4)]
    assert documents(out, "val.bin") == [f"Document number {i}.{ENDOFTEXT}" for i in (2, 5)]
    meta = json.loads((out / "meta.json").read_text())
    assert list(meta["sources"]) == ["text"] and meta["detokenized"] is True

    # Together with the releases (and the user's text as is, never detokenised).
    out2 = tmp_path / "data2"
    run(release, out2, "--text", str(corpus), "--sources", "wikitext,text", "--text-val-every", "3")
    meta = json.loads((out2 / "meta.json").read_text())
    assert set(meta["splits"]["train"]["by_source"]) == {"wikitext", "text"}
    assert documents(out2, "val.bin")[-1] == f"Document number 5.{ENDOFTEXT}"


def test_plain_text_file_is_one_document(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "TEXT_CHUNK_CHARS", 16)
    book = tmp_path / "book.txt"
    lines = [f"Line {i} of the book.\n" for i in range(8)]
    book.write_text("".join(lines), encoding="utf-8")
    out = tmp_path / "data"
    prepare_data.main(["--text", str(book), "--out", str(out), "--vocab-size", "280", "--workers", "1", "--text-val-every", "4"])
    # Pieces 3 and 7 (one line each here) are held out; the rest stays one document.
    train = [line for i, line in enumerate(lines) if i % 4 != 3]
    assert documents(out, "train.bin") == ["".join(train) + ENDOFTEXT]
    assert documents(out, "val.bin") == [lines[3] + ENDOFTEXT, lines[7] + ENDOFTEXT]


def test_small_text_file_still_gets_a_validation_share(tmp_path, capsys):
    # A 50 KB book is below one 64 KiB piece: it is cut smaller so a piece is held out.
    book = tmp_path / "book.txt"
    lines = [f"Line {i} of a small book, with a few words on it.\n" for i in range(1000)]
    book.write_text("".join(lines), encoding="utf-8")
    assert 40_000 < book.stat().st_size < 64 * 1024
    out = tmp_path / "data"
    prepare_data.main(["--text", str(book), "--out", str(out), "--vocab-size", "280", "--workers", "1"])
    meta = json.loads((out / "meta.json").read_text())
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert 0.05 < val["bytes"] / (train["bytes"] + val["bytes"]) < 0.15
    # The book is one training document (the held-out piece cut out of it), and the summary
    # says so instead of "documents 0", and does not claim the text was detokenised.
    assert train["documents"] == 1 and val["documents"] == 1
    assert "".join(d.removesuffix(ENDOFTEXT) for d in documents(out, "train.bin") + documents(out, "val.bin")) == "".join(lines)
    summary = capsys.readouterr().out
    assert "your text as given" in summary and "detokenised" not in summary
    train_row = next(line for line in summary.splitlines() if line.startswith("train  text"))
    assert train_row.split()[3] == "1"


def test_text_too_small_or_blank_is_refused(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n\n  \t\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"blank\.txt: no text in it \(only whitespace\)"):
        prepare_data.main(["--text", str(blank), "--out", str(tmp_path / "d"), "--workers", "1"])
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Just one short line.\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"too little text to hold out a validation share; give at least 2,048 bytes"):
        prepare_data.main(["--text", str(tiny), "--out", str(tmp_path / "d"), "--workers", "1"])
    assert not (tmp_path / "d").exists()


def test_given_tokenizer_is_reused(release, tmp_path):
    first = tmp_path / "first"
    run(release, first)
    out = tmp_path / "data"
    prepare_data.main(["--data-dir", str(release), "--out", str(out), "--tokenizer", str(first / "tokenizer.json"), "--workers", "1"])
    assert json.loads((out / "meta.json").read_text())["tokenizer_hash"] == BPETokenizer.load(first / "tokenizer.json").hash
    assert (out / "train.bin").read_bytes() == (first / "train.bin").read_bytes()


def test_worker_processes_give_identical_files(release, tmp_path, monkeypatch):
    monkeypatch.setattr(token_files, "BATCH_UNITS", 1)  # many small tasks, out of order if unbounded
    run(release, tmp_path / "one")
    prepare_data.main(["--data-dir", str(release), "--out", str(tmp_path / "two"), "--vocab-size", "400", "--workers", "2"])
    for name in ("tokenizer.json", "train.bin", "val.bin"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: (r / "wikitext-2" / "wiki.valid.tokens").write_bytes(b" = A = \n caf\xe9 \n"), r"wiki\.valid\.tokens: not UTF-8 text \(byte 0xe9 at offset 12\)"),
        (lambda r: (r / "wikitext-2" / "wiki.train.tokens").write_bytes(b""), r"wiki\.train\.tokens: file is empty"),
        (lambda r: (r / "wikitext-2" / "wiki.train.tokens").write_text(" \n \n"), r"wiki\.train\.tokens: no wikitext documents"),
        (lambda r: (r / "dailydialog" / "validation" / "dialogues_validation.txt").write_text("Hi . __eou__\nNo marker\n"), r"dialogues_validation\.txt:2: dialogue line without __eou__"),
        (lambda r: (r / "dailydialog" / "train" / "dialogues_train.txt").unlink(), "no DailyDialog train file"),
    ],
)
def test_bad_input_writes_nothing(release, tmp_path, damage, message):
    damage(release)
    out = tmp_path / "data"
    with pytest.raises(UserError, match=message):
        run(release, out)
    assert not out.exists()


def test_bad_settings(release, tmp_path):
    with pytest.raises(UserError, match="--mix 'wikitext=1,books=2': unknown source 'books'"):
        run(release, tmp_path / "d", "--mix", "wikitext=1,books=2")
    with pytest.raises(UserError, match="weight 'x' of wikitext is not a number"):
        run(release, tmp_path / "d", "--mix", "wikitext=x")
    with pytest.raises(UserError, match="--sources: unknown source 'books'"):
        run(release, tmp_path / "d", "--sources", "books")
    with pytest.raises(UserError, match="data directory not found"):
        run(tmp_path / "missing", tmp_path / "d")
    assert not (tmp_path / "d").exists()
    (tmp_path / "a_file").write_text("not a folder")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "below"):
        with pytest.raises(UserError, match=r"--out .*a_file is a file, not a folder"):
            run(release, out)


def test_failed_run_leaves_no_trusted_output(release, tmp_path, monkeypatch, capsys):
    out = tmp_path / "data"
    run(release, out)
    old_train = (out / "train.bin").read_bytes()

    def broken(self, part, folder):
        raise RuntimeError("disk full")

    monkeypatch.setattr(token_files.Encoder, "encode", broken)
    with pytest.raises(RuntimeError):
        run(release, out, "--mix", "wikitext=3")
    assert not (out / "meta.json").exists()  # the old one no longer vouches for anything
    assert (out / "train.bin").read_bytes() == old_train  # never half-written
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".tokenizer.fingerprint"]  # temp files cleaned
    monkeypatch.undo()
    tokenizer_mtime = (out / "tokenizer.json").stat().st_mtime_ns
    run(release, out, "--mix", "wikitext=3")
    assert (out / "tokenizer.json").stat().st_mtime_ns == tokenizer_mtime  # resumed: not retrained
    assert "continuing: reusing" in capsys.readouterr().err
    assert json.loads((out / "meta.json").read_text())["splits"]["train"]["by_source"]["wikitext"]["documents"] == 6


@pytest.mark.slow
def test_encoding_workers_ignore_ctrl_c(tmp_path, capfd):
    # Ctrl-C reaches every process of the terminal's group; only the main one should act on it
    # (it stops the pool). A worker that took it would die printing a KeyboardInterrupt traceback.
    tok = BPETokenizer.train(["hello world, hello there"] * 4, 280)
    tok.save(tmp_path / "tokenizer.json")
    part = corpus.Part("text", "train", [], lambda: iter([("text", "hello world", True)] * 3))
    encoder = token_files.Encoder(tmp_path / "tokenizer.json", True, np.dtype(np.uint16), 2)
    try:
        encoder.encode(part, tmp_path)  # the workers are up and have run a task
        workers = multiprocessing.active_children()
        assert len(workers) == 2
        for worker in workers:
            os.kill(worker.pid, signal.SIGINT)
        time.sleep(0.5)
        assert all(w.is_alive() for w in workers)
        assert encoder.encode(part, tmp_path).documents == 3
    finally:
        encoder.close()
    assert "KeyboardInterrupt" not in capfd.readouterr().err


@pytest.mark.slow
def test_ctrl_c_while_encoding_stops_quietly_and_a_rerun_continues(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("".join(f"Sentence {i} of a book that is long enough to encode.\n" for i in range(4000)), encoding="utf-8")
    out = tmp_path / "data"
    cmd = [sys.executable, "src/data/prepare_data.py", "--text", str(book), "--out", str(out),
           "--vocab-size", "300", "--workers", "2"]
    # Its own process group, signalled as a whole: what Ctrl-C in a terminal does.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    err = b""
    while b"encode text" not in err:  # the worker processes are starting now
        chunk = os.read(proc.stderr.fileno(), 4096)
        assert chunk, err.decode()
        err += chunk
    os.killpg(proc.pid, signal.SIGINT)
    rest, rest_err = proc.communicate(timeout=60)
    err = (err + rest_err).decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "interrupted: " in err and "the same command continues from that tokenizer" in err
    assert (out / "tokenizer.json").is_file() and not (out / "meta.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".prepare-")]
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "continuing: reusing" in again.stderr and (out / "meta.json").is_file()


def test_hub_path_with_a_local_dataset(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def wiki_rows(text):
        return {"text": [line + "\n" if line.strip() else "" for line in text.split("\n")[:-1]]}

    def dd_rows(text):
        return {"dialog": [line.split("__eou__")[:-1] for line in text.splitlines()]}

    tables = {
        ("Salesforce/wikitext", "train"): wiki_rows(WIKI_TRAIN),
        ("Salesforce/wikitext", "validation"): wiki_rows(WIKI_VALID),
        ("li2017dailydialog/daily_dialog", "train"): dd_rows(DD_TRAIN),
        ("li2017dailydialog/daily_dialog", "validation"): dd_rows(DD_VALID),
    }
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, *, split, revision=None: datasets.Dataset.from_dict(tables[path, split]))
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=5.0: True)
    out = tmp_path / "data"
    prepare_data.main(["--out", str(out), "--vocab-size", "400", "--workers", "1"])
    assert documents(out, "train.bin") == expected_documents(WIKI_TRAIN, DD_TRAIN)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["sources"]["wikitext"]["origin"] == "hub"
    assert meta["sources"]["wikitext"]["inputs"]["train"][0]["hub"] == "hub:Salesforce/wikitext/wikitext-2-raw-v1"
    assert meta["sources"]["wikitext"]["variant"]["train"] == "raw"


def test_cli_user_error_is_one_line_exit_2(tmp_path):
    out = tmp_path / "data"
    result = subprocess.run(
        [sys.executable, "src/data/prepare_data.py", "--data-dir", str(tmp_path / "nowhere"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'}: data directory not found"]
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
def test_prepares_the_real_shared_data(tmp_path):
    out = tmp_path / "data"
    prepare_data.main(["--data-dir", str(SHARED_DATA), "--out", str(out), "--vocab-size", "2048", "--workers", "2"])
    meta = json.loads((out / "meta.json").read_text())
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    # WikiText-2 has 600 / 60 articles; DailyDialog 11,118 / 1,000 dialogues.
    assert train["by_source"]["wikitext"]["documents"] == 600 and val["by_source"]["wikitext"]["documents"] == 60
    assert train["by_source"]["dailydialog"]["documents"] == 11118 and val["by_source"]["dailydialog"]["documents"] == 1000
    # Only the tokenised train file is there, so validation uses the tokenised file too (not wiki.valid.raw).
    assert train["by_source"]["wikitext"]["variant"] == val["by_source"]["wikitext"]["variant"] == "tokens"
    for stats in (train, val):
        assert 2.0 < stats["bytes"] / stats["tokens"] < 5.0  # a 2k vocab compresses English ~3x
        assert stats["tokens"] * 2 == os.path.getsize(out / stats["file"])
    assert meta["sources"]["wikitext"]["inputs"]["train"][0]["sha256"] == "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f"

    # val.bin decodes back to the detokenised validation documents.
    wiki = sources.read_wikitext(SHARED_DATA, "validation")
    dialogues = sources.read_dailydialog(SHARED_DATA, "validation")
    expected = [a + ENDOFTEXT for a in wiki.articles()]
    expected += [render_chat(alternate_turns([detokenize_dailydialog(u) for u in d])) for d in dialogues]
    assert documents(out, "val.bin") == expected
    assert "@-@" not in "".join(expected[:60]) and " , " not in "".join(expected)
