"""Exports to Hugging Face tokenizers/transformers and tiktoken give exactly our ids.

Trains a small tokenizer on a slice of the real training data and compares on a slice of
each validation file in ../shared/data (skipped when the data or a package is missing).
"""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from src.tokenizer.bpe import BPETokenizer
from src.tokenizer.formats import (
    hf_tokenizer_json,
    load_tiktoken,
    save_hf,
    save_tiktoken,
    to_tiktoken,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TRAIN = [DATA / "wikitext-2" / "wiki.train.tokens", DATA / "dailydialog" / "train" / "dialogues_train.txt"]
VALID = [
    DATA / "wikitext-2" / "wiki.valid.tokens",
    DATA / "wikitext-2-raw" / "wiki.valid.raw",
    DATA / "dailydialog" / "validation" / "dialogues_validation.txt",
]
SLICE = 150_000  # characters of each file: keeps the test fast
SPECIAL_TEXT = "<|user|>Hi there!<|assistant|>Hello <|endoftext|>x<|endoftext|"


def head(path: Path) -> str:
    return path.read_text(encoding="utf-8")[:SLICE]


@pytest.fixture(scope="module")
def tok():
    if not all(p.exists() for p in TRAIN + VALID):
        pytest.skip(f"shared data not found under {DATA}")
    t = BPETokenizer.train([head(p) for p in TRAIN], 1024)
    t.backend_preference = "python"  # compare the exports with the reference encoder
    return t


@pytest.fixture(scope="module")
def fast_tok(tok):
    pytest.importorskip("tiktoken")
    fast = BPETokenizer(tok.merges)
    fast.backend_preference = "tiktoken"
    return fast


@pytest.fixture(scope="module")
def valid_texts(tok):
    return {p.name: head(p) for p in VALID}


def test_hf_tokenizers_same_ids(tok, valid_texts, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path / "tokenizer.json"
    save_hf(tok, path)
    hf = tokenizers.Tokenizer.from_file(str(path))
    assert hf.get_vocab_size() == tok.vocab_size - 16 + len(tok.special_tokens)
    for name, text in valid_texts.items():
        ids = tok.encode(text)
        assert hf.encode(text).ids == ids, name
        assert hf.decode(ids) == text
    # Special tokens are added tokens (special=True) with our ids.
    assert hf.encode(SPECIAL_TEXT).ids == tok.encode_with_special(SPECIAL_TEXT)
    for s, i in tok.special_tokens.items():
        assert hf.token_to_id(s) == i
    assert hf.decode(tok.encode_with_special(SPECIAL_TEXT), skip_special_tokens=False) == SPECIAL_TEXT


def test_transformers_fast_tokenizer_same_ids(tok, valid_texts, tmp_path):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "tokenizer.json"
    save_hf(tok, path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>")
    text = valid_texts["wiki.valid.raw"][:50_000]
    assert fast(text)["input_ids"] == tok.encode(text)
    assert fast.eos_token_id == tok.eot_id
    ids = tok.encode_with_special(SPECIAL_TEXT)
    assert fast.decode(ids) == SPECIAL_TEXT
    assert fast.convert_tokens_to_ids("<|assistant|>") == tok.special_tokens["<|assistant|>"]


def test_tiktoken_same_ids(tok, valid_texts, tmp_path):
    pytest.importorskip("tiktoken")
    enc = to_tiktoken(tok)
    for name, text in valid_texts.items():
        assert enc.encode_ordinary(text) == tok.encode(text), name
    assert enc.encode(SPECIAL_TEXT, allowed_special="all") == tok.encode_with_special(SPECIAL_TEXT)
    # The files written by the CLI's export read back to the same encoding.
    save_tiktoken(tok, tmp_path / "tok.tiktoken")
    enc2 = load_tiktoken(tmp_path / "tok.tiktoken")
    text = valid_texts["dialogues_validation.txt"]
    assert enc2.encode_ordinary(text) == tok.encode(text)
    assert enc2.decode(tok.encode(text)) == text


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.text(max_size=100) | st.text(alphabet=" \t\r\n\x0b\x0c\x1c\x85\xa0\u2028\u3000aZ1'é", max_size=60))
def test_fast_path_agrees_with_reference_on_any_text(tok, fast_tok, text):
    text = text.encode("utf-8", "replace").decode("utf-8")
    fast = fast_tok
    assert fast.encode(text) == tok.encode(text)
    assert fast.encode_with_special(text + "<|endoftext|>") == tok.encode_with_special(text + "<|endoftext|>")


def test_fast_path_agrees_on_validation(tok, valid_texts):
    pytest.importorskip("tiktoken")
    fast = BPETokenizer(tok.merges)
    assert fast.backend == "tiktoken"
    texts = list(valid_texts.values())
    assert [a.tolist() for a in fast.encode_batch(texts)] == [tok.encode(t) for t in texts]


def test_hf_json_is_byte_level_bpe(tok):
    data = hf_tokenizer_json(tok)
    model = data["model"]
    assert model["type"] == "BPE" and model["ignore_merges"] is False
    assert len(model["merges"]) == len(tok.merges) and len(model["vocab"]) == 256 + len(tok.merges)
    assert [t["id"] for t in data["added_tokens"]] == sorted(tok.special_tokens.values())
    assert all(t["special"] for t in data["added_tokens"])


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    corpus=st.lists(st.text(alphabet="aab c\n1'", min_size=1, max_size=80), min_size=1, max_size=5),
    probes=st.lists(st.text(alphabet="aab c\n1'", max_size=40), min_size=1, max_size=10),
    num_merges=st.integers(1, 40),
)
def test_tiktoken_byte_ranks_equal_pair_merges_for_trained_vocabularies(corpus, probes, num_merges):
    """tiktoken ranks by token bytes, we by merge pairs: equal for any trained vocabulary."""
    pytest.importorskip("tiktoken")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = BPETokenizer.train(corpus, 256 + 16 + num_merges)
    tok.backend_preference = "python"
    enc = to_tiktoken(tok)
    for text in probes + corpus:
        assert enc.encode_ordinary(text) == tok.encode(text)
