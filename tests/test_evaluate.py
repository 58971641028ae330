"""evaluate.py and src/eval/{wikitext,dialog}.py: word counts, stream building, known answers,
the command line end to end on a tiny run, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluate import main as evaluate_main
from src.data import sources
from src.data.detokenize import detokenize_dailydialog, detokenize_wikitext
from src.eval.dialog import evaluate_dailydialog
from src.eval.perplexity import sliding_window_nll
from src.eval.wikitext import WordCount, count_words, evaluate_wikitext, release_word_count
from src.tokenizer.chat_template import alternate_turns, encode_chat
from src.utils.cli import EXIT_USER_ERROR, run_cli
from tests.fixtures import make_tiny_run, tiny_corpus

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

# A tiny WikiText split in the release's format: blank lines are a single space, headings
# " = Title = ", tokens space-separated, number escapes, rare words as <unk> (tokens only).
ARTICLES = [
    [" = The Red House = ", " ", " The cat sees the ball . It is 1 @,@ 000 m long . ", " ",
     " = = History = = ", " ", " A dog likes the old {rare} garden ( and the river ) . "],
    [" = Green Apples = ", " ", " My friend reads a long letter every morning , again . ",
     " The teacher helps \" the small bird \" with care . "],
]
WIKI_WORDS = 77  # 63 whitespace tokens + 14 lines (one end-of-line each), counted by hand
DIALOGUES = [
    ["Hello , how are you ?", "Fine , thanks . And you ?", "I'm good ."],
    ["Can you help me with the garden ?", "Sure , I will help you today ."],
    ["Where is the river ?", "It's past the red house.It is not far ."],
]


def wiki_lines(rare: str) -> list[str]:
    lines = [" "]
    for article in ARTICLES:
        lines += [line.replace("{rare}", rare) for line in article] + [" "]
    return lines


def make_release_dir(root: Path, *, raw: bool = True, tokens: bool = True, dialog: bool = True) -> Path:
    """A --data-dir in the releases' layouts: wikitext-2{,-raw}/ and dailydialog/validation/."""
    if tokens:
        (root / "wikitext-2").mkdir(parents=True)
        (root / "wikitext-2" / "wiki.valid.tokens").write_text("\n".join(wiki_lines("<unk>")) + "\n", encoding="utf-8")
    if raw:
        (root / "wikitext-2-raw").mkdir(parents=True)
        (root / "wikitext-2-raw" / "wiki.valid.raw").write_text("\n".join(wiki_lines("Rosaceae")) + "\n", encoding="utf-8")
    if dialog:
        folder = root / "dailydialog" / "validation"
        folder.mkdir(parents=True)
        text = "".join(" __eou__ ".join(d) + " __eou__ \n" for d in DIALOGUES)
        (folder / "dialogues_validation.txt").write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("evalrun"))


@pytest.fixture(scope="module")
def tok():
    from src.tokenizer.bpe import BPETokenizer

    return BPETokenizer.train(tiny_corpus(100, seed=0), 300)


class UniformModel(torch.nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*idx.shape, self.vocab)


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run evaluate.py's main as the command line does (run_cli); (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: evaluate_main(argv))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


# ------------------------------------------------------------------------------ word counts


def test_count_words_counts_tokens_plus_one_end_of_line_per_line():
    # " " -> 0 + 1;  " = A = " -> 3 + 1;  " a b , c . " -> 5 + 1;  "" -> 0 + 1
    assert count_words([" ", " = A = ", " a b , c . ", ""]) == 12
    assert count_words([]) == 0
    assert count_words(wiki_lines("<unk>")) == WIKI_WORDS


def test_word_count_comes_from_the_tokenised_release(tmp_path):
    data = make_release_dir(tmp_path / "both")
    split = sources.read_wikitext(data, "valid")  # auto: the raw file, as prepare_data picks it
    assert split.variant == "raw"
    words = release_word_count(split, data, "valid")
    assert (words.num_words, words.variant) == (WIKI_WORDS, "tokens")
    assert words.source.endswith("wiki.valid.tokens")
    # Only the raw file: the same count (<unk> replaces whole words), labelled as raw.
    raw_only = make_release_dir(tmp_path / "raw", tokens=False, dialog=False)
    words = release_word_count(sources.read_wikitext(raw_only, "valid"), raw_only, "valid")
    assert (words.num_words, words.variant) == (WIKI_WORDS, "raw")


@pytest.mark.skipif(not (SHARED / "wikitext-2" / "wiki.valid.tokens").is_file(), reason="../shared/data absent")
def test_real_wikitext2_validation_has_217646_words(tmp_path):
    tokens = sources.read_wikitext(SHARED, "valid", "tokens")
    assert count_words(tokens.lines) == 217_646
    assert len(tokens.lines) == 3_760  # every line counts, the 1,299 blank ones included
    raw = sources.read_wikitext(SHARED, "valid", "raw")
    assert release_word_count(raw, SHARED, "valid") == WordCount(217_646, str(SHARED / "wikitext-2" / "wiki.valid.tokens"), "tokens")
    assert count_words(raw.lines) == 217_646  # the raw release gives the same count
    assert len(list(sources.iter_wikitext_articles(tokens.lines))) == 60


# ------------------------------------------------------------------------------ known answers


def test_uniform_model_gives_vocab_size_and_the_exact_word_level_conversion(tok, tmp_path):
    data = make_release_dir(tmp_path)
    split = sources.read_wikitext(data, "valid")
    words = release_word_count(split, data, "valid")
    v = tok.vocab_size
    r = evaluate_wikitext(UniformModel(v), tok, split, words, detokenize=True, context_length=16, stride=8)
    articles = [detokenize_wikitext(a) for a in sources.iter_wikitext_articles(split.lines)]
    expected_tokens = sum(len(tok.encode(a)) + 1 for a in articles)  # + one <|endoftext|> each
    assert r["num_tokens"] == expected_tokens
    assert r["total_nll"] == pytest.approx(expected_tokens * math.log(v), rel=1e-6)
    assert r["token_perplexity"] == pytest.approx(v, rel=1e-6)
    assert r["num_words"] == WIKI_WORDS
    assert r["word_perplexity"] == pytest.approx(v ** (expected_tokens / WIKI_WORDS), rel=1e-5)
    assert r["num_bytes"] == sum(len(a.encode("utf-8")) for a in articles)
    assert r["bits_per_byte"] == pytest.approx(expected_tokens * math.log2(v) / r["num_bytes"], rel=1e-6)
    assert (r["stride"], r["context_length"], r["documents"], r["truncated"]) == (8, 16, 2, False)

    # --max-tokens: exactly that many tokens scored, the bytes of that prefix, words pro rata.
    q = evaluate_wikitext(UniformModel(v), tok, split, words, detokenize=True, context_length=16, stride=8, max_tokens=40)
    assert q["num_tokens"] == 40 and q["truncated"]
    assert 0 < q["num_bytes"] < r["num_bytes"]
    assert q["num_words"] == round(WIKI_WORDS * q["num_bytes"] / r["num_bytes"])


def test_dailydialog_scores_all_turns_and_assistant_turns(tok):
    v = tok.vocab_size
    ids, mask = [tok.eot_id], [False]
    for d in DIALOGUES:
        i, m = encode_chat(tok, alternate_turns([detokenize_dailydialog(u) for u in d]))
        ids += i
        mask += m
    r = evaluate_dailydialog(UniformModel(v), tok, DIALOGUES, detokenize=True, context_length=16, stride=4)
    assert r["all_turns"]["num_tokens"] == len(ids) - 1
    assert r["assistant_turns"]["num_tokens"] == sum(mask[1:])
    for part in ("all_turns", "assistant_turns"):
        assert r[part]["token_perplexity"] == pytest.approx(v, rel=1e-6)
    assistant_text = [detokenize_dailydialog(u) for d in DIALOGUES for u in d[1::2]]
    assert r["assistant_turns"]["num_bytes"] == sum(len(u.encode("utf-8")) for u in assistant_text)
    assert r["dialogues"] == 3


@pytest.mark.filterwarnings("ignore:the training texts allow only")
@pytest.mark.parametrize("keep_tokenized", [False, True])
def test_evaluated_streams_are_exactly_what_prepare_data_writes(tmp_path, keep_tokenized):
    """Evaluation scores the text as training saw it: the streams (after their leading
    <|endoftext|>) are val.bin's WikiText and DailyDialog documents, token for token."""
    from src.data.prepare_data import main as prepare_main
    from src.eval.dialog import dialog_stream
    from src.eval.wikitext import wikitext_stream
    from src.tokenizer.bpe import BPETokenizer

    data = make_release_dir(tmp_path / "release")
    shutil.copy(data / "wikitext-2" / "wiki.valid.tokens", data / "wikitext-2" / "wiki.train.tokens")
    (data / "dailydialog" / "train").mkdir()
    shutil.copy(data / "dailydialog" / "validation" / "dialogues_validation.txt",
                data / "dailydialog" / "train" / "dialogues_train.txt")
    out = tmp_path / "prepared"
    argv = ["--data-dir", str(data), "--out", str(out), "--vocab-size", "512", "--workers", "1"]
    assert prepare_main(argv + (["--keep-tokenized"] if keep_tokenized else [])) == 0
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["detokenized"] is not keep_tokenized
    tok = BPETokenizer.load(out / "tokenizer.json")
    val = np.fromfile(out / "val.bin", dtype=meta["dtype"])

    split = sources.read_wikitext(data, "valid")
    wiki = wikitext_stream(split.articles(detokenize=meta["detokenized"]), tok)
    dialog, _ = dialog_stream(sources.read_dailydialog(data, "valid"), tok, detokenize=meta["detokenized"])
    np.testing.assert_array_equal(val, np.concatenate([wiki[1:], dialog[1:]]))
    assert meta["splits"]["val"]["by_source"]["wikitext"]["bytes"] == sum(
        len(a.encode("utf-8")) for a in split.articles(detokenize=meta["detokenized"]))


# ------------------------------------------------------------------------------ command line


@pytest.mark.slow
def test_cli_end_to_end_matches_an_independent_computation(tiny_run, tmp_path):
    from src.checkpoint import load_model

    data = make_release_dir(tmp_path / "data")
    out_json = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "--run", str(tiny_run), "--data-dir", str(data),
         "--split", "valid", "--json", str(out_json), "--batch-size", "3", "--dtype", "fp32"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "word perplexity" in proc.stdout and "AWD-LSTM" in proc.stdout and "assistant turns" in proc.stdout
    assert "WikiText valid" in proc.stderr  # the progress bar
    r = json.loads(out_json.read_text(encoding="utf-8"))

    model, tok, info = load_model(tiny_run)
    context = model.config.context_length
    assert (r["context_length"], r["stride"], r["dtype"]) == (context, context // 2, "fp32")
    # WikiText: the raw file, detokenised (the run's meta says so), articles then <|endoftext|>.
    w = r["wikitext"]
    assert info["data_meta"]["detokenized"] is True and w["detokenized"] is True
    raw = (data / "wikitext-2-raw" / "wiki.valid.raw").read_text(encoding="utf-8").split("\n")[:-1]
    articles = [detokenize_wikitext(a) for a in sources.iter_wikitext_articles(raw)]
    assert "1,000 m long" in articles[0] and "Rosaceae" in articles[0]
    stream = [tok.eot_id]
    for a in articles:
        stream += tok.encode(a) + [tok.eot_id]
    nll, count = sliding_window_nll(model, np.array(stream), context, context // 2)
    assert w["num_tokens"] == count == len(stream) - 1
    assert w["total_nll"] == pytest.approx(nll, rel=1e-9)
    assert w["num_words"] == WIKI_WORDS and w["word_count_variant"] == "tokens"
    assert w["word_perplexity"] == pytest.approx(math.exp(nll / WIKI_WORDS), rel=1e-9)
    assert w["num_bytes"] == sum(len(a.encode("utf-8")) for a in articles)
    assert w["bits_per_byte"] == pytest.approx(nll / math.log(2) / w["num_bytes"], rel=1e-9)
    assert {ref["model"].split(" ")[0] for ref in w["references"]} == {"AWD-LSTM"}  # no valid figure for GPT-2
    # DailyDialog: both sums of one pass.
    d = r["dailydialog"]
    assert d["all_turns"]["num_tokens"] > d["assistant_turns"]["num_tokens"] > 0
    assert d["all_turns"]["loss"] == pytest.approx(d["all_turns"]["total_nll"] / d["all_turns"]["num_tokens"])


def test_cli_evaluates_what_is_found_and_the_test_split(tiny_run, tmp_path, capsys):
    data = make_release_dir(tmp_path / "d", raw=False, dialog=False)
    (data / "wikitext-2" / "wiki.valid.tokens").rename(data / "wikitext-2" / "wiki.test.tokens")
    # A run whose data meta says its validation WikiText was the raw release.
    run = shutil.copytree(tiny_run, tmp_path / "run")
    meta = json.loads((run / "data_meta.json").read_text(encoding="utf-8"))
    meta["sources"] = {"wikitext": {"variant": {"train": "tokens", "val": "raw"}}}
    (run / "data_meta.json").write_text(json.dumps(meta), encoding="utf-8")
    code, out, err = cli(["--run", str(run), "--data-dir", str(data), "--split", "test",
                          "--no-progress", "--stride", "64"], capsys)
    assert code == 0, err
    assert "skipping dailydialog" in err and "test split" in err
    assert "--wikitext-variant raw to match" in err
    assert "stride 64" in out and "GPT-2 small" in out and "DailyDialog" not in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data-dir", "{tmp}/nowhere"], "nowhere: data directory not found"),
        (["--data-dir", "{tmp}/bad"], "wiki.valid.tokens: not UTF-8"),
        (["--stride", "0"], "--stride 0: must be at least 1"),
        (["--stride", "65"], "--stride 65: must be at most the model's context (64)"),
        (["--batch-size", "0"], "--batch-size 0"),
        (["--tasks", "wikitext,squad"], "--tasks"),
        (["--data-dir", "{tmp}/empty"], "neither WikiText nor DailyDialog"),
        (["--tasks", "dailydialog", "--data-dir", "{tmp}/nodialog"], "no DailyDialog validation file"),
        (["--json", "{tmp}"], "is a folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_run, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    make_release_dir(tmp_path / "nodialog", dialog=False)
    bad = make_release_dir(tmp_path / "bad", raw=False, dialog=False)
    (bad / "wikitext-2" / "wiki.valid.tokens").write_bytes(b" = T = \n \xff\xfe broken\n")
    data = make_release_dir(tmp_path / "good")
    argv = ["--run", str(tiny_run), "--data-dir", str(data), "--no-progress"]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, out, err = cli(argv, capsys)
    assert code == EXIT_USER_ERROR
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err


def test_missing_run_and_unreachable_hub_are_one_line_errors(tmp_path, capsys, monkeypatch):
    code, _, err = cli(["--run", str(tmp_path / "norun"), "--data-dir", str(make_release_dir(tmp_path / "d"))], capsys)
    assert code == EXIT_USER_ERROR and "norun" in err and err.count("\n") == 1
    # No --data-dir: the Hub. Point it at a closed local port so the check fails at once.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    code, _, err = cli(["--run", str(tmp_path / "norun")], capsys)
    assert code == EXIT_USER_ERROR and err.count("\n") == 1
    assert "Hugging Face Hub" in err and "--data-dir" in err


def test_json_is_not_written_on_error(tiny_run, tmp_path, capsys):
    out_json = tmp_path / "out.json"
    code, _, _ = cli(["--run", str(tiny_run), "--data-dir", str(tmp_path / "nowhere"), "--json", str(out_json)], capsys)
    assert code == EXIT_USER_ERROR and not out_json.exists()
