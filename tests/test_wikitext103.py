"""WikiText-103 one flag away: --wikitext 103 picks the release (Hub config or the
wikitext-103*/ folder of --data-dir), and a large corpus trains the tokenizer on a bounded,
evenly spread sample of its documents. The corpus here is a stand-in in the release's layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from src.data import corpus, prepare_data, sources
from src.tokenizer.bpe import BPETokenizer
from src.utils.cli import UserError
from tests.test_prepare_data import DD_TRAIN, DD_VALID, WIKI_TRAIN, WIKI_VALID

# A stand-in for WikiText-103: distinct articles (so a sample differs from the whole), many
# more of them than the WikiText-2 stand-in beside it.
ARTICLE = " = {title} = \n \n The {title} is a {kind} in the north , first recorded in {year} . \n \n"
KINDS = ["river", "castle", "village", "mountain", "bridge", "forest"]


def wt103_text(articles: int) -> str:
    parts = [" \n"]
    for i in range(articles):
        parts.append(ARTICLE.format(title=f"Place{i}", kind=KINDS[i % len(KINDS)], year=1700 + i))
    return "".join(parts)


def make_standin(root: Path, articles: int = 60) -> Path:
    """wikitext-2/ and wikitext-103/ side by side (release file names) plus dailydialog/."""
    for folder, train in (("wikitext-2", WIKI_TRAIN), ("wikitext-103", wt103_text(articles))):
        (root / folder).mkdir(parents=True)
        (root / folder / "wiki.train.tokens").write_text(train, encoding="utf-8")
        (root / folder / "wiki.valid.tokens").write_text(WIKI_VALID, encoding="utf-8")
    for split, text in (("train", DD_TRAIN), ("validation", DD_VALID)):
        (root / "dailydialog" / split).mkdir(parents=True)
        (root / "dailydialog" / split / f"dialogues_{split}.txt").write_text(text, encoding="utf-8")
    return root


def prepare(data_dir: Path, out: Path, *extra: str) -> dict:
    code = prepare_data.main(["--data-dir", str(data_dir), "--out", str(out), "--vocab-size", "320",
                              "--workers", "1", *extra])
    assert code == 0
    return json.loads((out / "meta.json").read_text())


def test_sizes_and_hub_configs():
    assert sources.hub_wikitext_config("103") == "wikitext-103-raw-v1"
    assert sources.hub_wikitext_config("2") == "wikitext-2-raw-v1"
    assert sources.hub_wikitext_config("wikitext-103-v1") == "wikitext-103-v1"
    for name, size in (("wikitext-103", "103"), ("wikitext-103-raw-v1", "103"), ("WikiText-2-raw", "2"),
                       ("wikitext-2", "2"), ("wikitext", None), ("wikitext-20", None)):
        assert sources.wikitext_size_of(name) == size, name


def test_wikitext_103_is_one_flag_away(tmp_path):
    data = make_standin(tmp_path / "release")
    # Two releases side by side: without a size the choice is ambiguous, and the error says how.
    with pytest.raises(UserError, match="several WikiText train files.*--wikitext 2 or 103"):
        prepare(data, tmp_path / "none")
    meta = prepare(data, tmp_path / "wt103", "--wikitext", "103")
    wiki = meta["sources"]["wikitext"]["inputs"]
    assert "wikitext-103" in wiki["train"][0]["path"] and "wikitext-103" in wiki["val"][0]["path"]
    assert meta["splits"]["train"]["by_source"]["wikitext"]["documents"] == 60
    meta2 = prepare(data, tmp_path / "wt2", "--wikitext", "2")
    assert "wikitext-2/" in meta2["sources"]["wikitext"]["inputs"]["train"][0]["path"]
    assert meta2["splits"]["train"]["by_source"]["wikitext"]["documents"] == 2


def test_spread_sample_is_even_and_deterministic():
    units = [("text", str(i), True) for i in range(100)]
    picked = [int(u[1]) for u in corpus.spread_sample(units, 0.25)]
    assert picked == list(range(3, 100, 4))  # every 4th, across the whole stream
    assert len(list(corpus.spread_sample(units, 1.0))) == 100
    assert len(list(corpus.spread_sample(units, 0.013))) == 1


def test_tokenizer_learns_from_a_bounded_sample(tmp_path, capsys):
    data = make_standin(tmp_path / "release", articles=200)
    total_chars = sum(len(a) for a in sources.iter_wikitext_articles(
        (data / "wikitext-103" / "wiki.train.tokens").read_text().split("\n")))
    sample_mb = total_chars / 4 / 1e6  # about a quarter of the training text
    full = prepare(data, tmp_path / "full", "--wikitext", "103")
    assert full["settings"]["tokenizer"] == {"train": True, "vocab_size": 320}  # no sampling
    sampled = prepare(data, tmp_path / "sampled", "--wikitext", "103", "--tokenizer-sample-mb", str(sample_mb))
    err = capsys.readouterr().err
    assert "evenly spread" in err and "--tokenizer-sample-mb" in err
    assert sampled["settings"]["tokenizer"]["sample_mb"] == pytest.approx(sample_mb)
    # The sampled tokenizer saw fewer distinct titles, so it differs from the full one ...
    tok_full = BPETokenizer.load(tmp_path / "full" / "tokenizer.json")
    tok_sampled = BPETokenizer.load(tmp_path / "sampled" / "tokenizer.json")
    assert tok_full.hash != tok_sampled.hash
    # ... yet every training document is still encoded, losslessly.
    assert sampled["splits"]["train"]["documents"] == full["splits"]["train"]["documents"]
    ids = np.fromfile(tmp_path / "sampled" / "train.bin", dtype=sampled["dtype"]).tolist()
    assert "Place199 is a castle" in tok_sampled.decode(ids)
    # A re-run with the same settings is a no-op.
    prepare(data, tmp_path / "sampled", "--wikitext", "103", "--tokenizer-sample-mb", str(sample_mb))
    assert "up to date" in capsys.readouterr().out


def test_bad_sample_size_is_a_user_error(tmp_path):
    data = make_standin(tmp_path / "release")
    with pytest.raises(UserError, match="--tokenizer-sample-mb -1"):
        prepare(data, tmp_path / "out", "--wikitext", "103", "--tokenizer-sample-mb", "-1")
    assert not (tmp_path / "out").exists()
