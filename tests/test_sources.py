"""Readers of the release layouts, the user's text files and the Hub (with a local Dataset)."""

import hashlib
import json

import pytest

from src.data import sources
from src.utils.cli import UserError

# Two articles in the WikiText release format (blank lines are a single space), including
# the two traps: a section heading, and a table line that looks like a top-level heading.
WIKI = (
    " \n = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : a game . \n \n"
    " = = Gameplay = = \n \n It is a role @-@ playing game . \n"
    " = Goals ; A = \n Assists . \n \n \n"
    " = Tower Building = \n \n It was built in 1840 . \n \n"
)
DIALOGUES = (
    "Say , Jim , how about going for a few beers ? __eou__ You know that is tempting . __eou__ \n"
    "Can you do push-ups ? __eou__ Of course I can . __eou__ Really ? __eou__ \n"
)


def make_release(root, wiki_variants=("raw",), splits=("train", "valid"), dialog_splits=("train", "validation")):
    for variant in wiki_variants:
        folder = root / ("wikitext-2-raw" if variant == "raw" else "wikitext-2")
        folder.mkdir(parents=True, exist_ok=True)
        for split in splits:
            (folder / f"wiki.{split}.{variant}").write_text(WIKI, encoding="utf-8")
    for split in dialog_splits:
        folder = root / "dailydialog" / split
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"dialogues_{split}.txt").write_text(DIALOGUES, encoding="utf-8")
    return root


def test_wikitext_articles_split_only_at_top_level_headings():
    articles = list(sources.iter_wikitext_articles(WIKI.split("\n")))
    assert len(articles) == 2
    assert articles[0].startswith(" = Valkyria Chronicles III = \n \n Senjō")
    assert " = = Gameplay = = " in articles[0] and " = Goals ; A = \n Assists . " in articles[0]
    assert articles[0].endswith("Assists . ")  # trailing blank lines are not part of it
    assert articles[1] == " = Tower Building = \n \n It was built in 1840 . "


def test_wikitext_article_at_file_start_and_adjacent_headings():
    lines = [" = A = ", " ", " a . ", " ", " = B = ", " ", " = C = ", " ", " c . "]
    assert [a.split("\n")[0] for a in sources.iter_wikitext_articles(lines)] == [" = A = ", " = B = ", " = C = "]


def test_file_picking_follows_the_train_files_variant(tmp_path):
    # Like ../shared/data: tokenised train, both variants of valid -> valid must be tokenised
    # too, or the model would be validated on text unlike what it trained on.
    make_release(tmp_path, wiki_variants=("raw", "tokens"), splits=("valid",))
    make_release(tmp_path, wiki_variants=("tokens",), splits=("train",))
    assert sources.find_wikitext_file(tmp_path, "validation").name == "wiki.valid.tokens"
    assert sources.find_wikitext_file(tmp_path, "val", "raw").name == "wiki.valid.raw"
    assert sources.find_wikitext_file(tmp_path, "train").name == "wiki.train.tokens"
    # A raw train file makes raw the choice for every split.
    make_release(tmp_path, wiki_variants=("raw",), splits=("train",))
    assert sources.find_wikitext_file(tmp_path, "validation").name == "wiki.valid.raw"
    assert sources.find_wikitext_file(tmp_path, "train").name == "wiki.train.raw"


def test_file_picking_without_a_train_file_prefers_raw_then_tokens(tmp_path):
    make_release(tmp_path, wiki_variants=("raw", "tokens"), splits=("valid",))
    make_release(tmp_path, wiki_variants=("tokens",), splits=("test",))
    assert sources.find_wikitext_file(tmp_path, "validation").name == "wiki.valid.raw"
    assert sources.find_wikitext_file(tmp_path, "test").name == "wiki.test.tokens"
    with pytest.raises(UserError, match=r"no WikiText test file \(wiki.test.raw\)"):
        sources.find_wikitext_file(tmp_path, "test", "raw")
    with pytest.raises(UserError, match=r"no WikiText train file \(wiki.train.raw or wiki.train.tokens\)"):
        sources.find_wikitext_file(tmp_path, "train")


def test_ambiguous_wikitext_folders_are_an_error(tmp_path):
    for name in ("wikitext-2-raw", "wikitext-103-raw"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "wiki.train.raw").write_text(WIKI, encoding="utf-8")
    with pytest.raises(UserError, match="several WikiText train files"):
        sources.find_wikitext_file(tmp_path, "train")


def test_read_wikitext_and_dailydialog(tmp_path):
    make_release(tmp_path)
    wiki = sources.read_wikitext(tmp_path, "validation")
    assert wiki.variant == "raw" and wiki.source.endswith("wiki.valid.raw")
    assert wiki.text() == WIKI
    assert wiki.articles()[1] == "= Tower Building =\n\nIt was built in 1840."
    assert wiki.articles(detokenize=False)[1] == " = Tower Building = \n \n It was built in 1840 . "
    dialogues = sources.read_dailydialog(tmp_path, "val")
    assert dialogues == [
        ["Say , Jim , how about going for a few beers ?", "You know that is tempting ."],
        ["Can you do push-ups ?", "Of course I can .", "Really ?"],
    ]


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(UserError, match="data directory not found"):
        sources.find_wikitext_file(tmp_path / "nope", "train")
    with pytest.raises(UserError, match="no DailyDialog train file"):
        sources.find_dailydialog_file(tmp_path, "train")
    with pytest.raises(UserError, match="file not found"):
        sources.check_text_file(tmp_path / "missing.txt")


def test_check_text_file_hashes_and_rejects_empty(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("héllo\n".encode())
    info = sources.check_text_file(path)
    assert info.sha256 == hashlib.sha256("héllo\n".encode()).hexdigest() and info.bytes == 7
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(UserError, match=r"empty\.txt: file is empty"):
        sources.check_text_file(tmp_path / "empty.txt")


@pytest.mark.parametrize("prefix_len", [10, (1 << 20) - 1, 1 << 20])
def test_non_utf8_byte_offset_is_exact_across_chunks(tmp_path, prefix_len):
    # A valid 2-byte character straddles the 1 MiB read boundary; then a bad byte follows.
    data = b"a" * prefix_len + "é".encode() + b"ok" + b"\xff" + b"tail"
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    with pytest.raises(UserError, match=rf"bad\.txt: not UTF-8 text \(byte 0xff at offset {prefix_len + 4}\)"):
        sources.check_text_file(path)


def test_truncated_character_at_end_of_file(tmp_path):
    path = tmp_path / "cut.txt"
    path.write_bytes(b"abc" + "é".encode()[:1])
    with pytest.raises(UserError, match="offset 3"):
        sources.check_text_file(path)


def test_dialogue_line_without_eou(tmp_path):
    make_release(tmp_path, wiki_variants=())
    path = tmp_path / "dailydialog" / "train" / "dialogues_train.txt"
    path.write_text(DIALOGUES + "No end marker here .\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"dialogues_train\.txt:3: dialogue line without __eou__"):
        list(sources.iter_dailydialog_file(path))
    path.write_text("Hi . __eou__ trailing words\n", encoding="utf-8")
    with pytest.raises(UserError, match=r":1: text after the last __eou__"):
        list(sources.iter_dailydialog_file(path))


def test_text_files_jsonl_and_plain(tmp_path, monkeypatch):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 2}) + "\n", encoding="utf-8")
    assert list(sources.iter_text_file(jsonl)) == [("one", True), ("two", True)]
    jsonl.write_text('{"text": "ok"}\n{"txt": "no"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"c\.jsonl:2: JSONL record without a string 'text' field"):
        list(sources.iter_text_file(jsonl))
    jsonl.write_text('{"text": "ok"\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"c\.jsonl:1: not valid JSON"):
        list(sources.iter_text_file(jsonl))

    monkeypatch.setattr(sources, "TEXT_CHUNK_CHARS", 10)
    plain = tmp_path / "book.txt"
    body = "first line\nsecond line\n\nthird\n"
    plain.write_text(body, encoding="utf-8")
    pieces = list(sources.iter_text_file(plain))
    assert "".join(t for t, _ in pieces) == body  # nothing lost, cut at line ends
    assert [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True]
    assert all(t.endswith("\n") for t, _ in pieces)


# ---------------------------------------------------------------------------- the Hub


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset answering from locally built Datasets; records its calls."""
    datasets = pytest.importorskip("datasets")
    calls = []
    wiki_rows = [line + "\n" if line.strip() else "" for line in WIKI.split("\n")[:-1]]
    tables = {
        sources.HUB_WIKITEXT: datasets.Dataset.from_dict({"text": wiki_rows}),
        sources.HUB_DAILYDIALOG: datasets.Dataset.from_dict(
            {
                # The Hub rows keep the release's spaces (the loading script split on __eou__).
                "dialog": [["Say , Jim , how about it ? ", " Sure . ", " "], ["Hi ! ", " Hello . "]],
                "act": [[3, 4, 1], [1, 1]],
                "emotion": [[0, 0, 0], [4, 4]],
            }
        ),
    }

    def load_dataset(path, name=None, *, split=None, revision=None, **kwargs):
        calls.append({"path": path, "name": name, "split": split, "revision": revision})
        return tables[path]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=5.0: True)
    return calls


def test_hub_wikitext(fake_hub):
    wiki = sources.load_hub_wikitext("wikitext-2-raw-v1", "val")
    assert fake_hub == [{"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1", "split": "validation", "revision": None}]
    assert wiki.variant == "raw" and wiki.source == "hub:Salesforce/wikitext/wikitext-2-raw-v1"
    assert len(wiki.articles()) == 2 and wiki.articles()[1] == "= Tower Building =\n\nIt was built in 1840."
    assert sources.load_hub_wikitext("wikitext-103-v1", "train").variant == "tokens"
    with pytest.raises(UserError, match="unknown WikiText config 'wikitext-3'"):
        sources.load_hub_wikitext("wikitext-3", "train")


def test_hub_dailydialog_uses_the_parquet_conversion(fake_hub):
    dialogues = sources.load_hub_dailydialog("train")
    assert fake_hub[0]["path"] == "li2017dailydialog/daily_dialog"
    assert fake_hub[0]["revision"] == "refs/convert/parquet"
    assert dialogues == [["Say , Jim , how about it ?", "Sure ."], ["Hi !", "Hello ."]]


def test_hub_unreachable_is_one_line_suggesting_data_dir(monkeypatch):
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=5.0: False)
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub.*--data-dir") as info:
        sources.load_hub_dailydialog("train")
    assert "\n" not in str(info.value)


def test_hub_connection_error_during_load(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=5.0: True)
    with pytest.raises(UserError, match=r"cannot reach .*\(Couldn't reach 'Salesforce/wikitext'.*--data-dir") as info:
        sources.load_hub_wikitext("wikitext-2-raw-v1", "train")
    assert "\n" not in str(info.value)
