"""Tests of the byte-level BPE tokenizer: training, encoding, special tokens, files."""

import json
import warnings
from collections import Counter

import numpy as np
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from src.tokenizer.bpe import BPETokenizer, StreamingDecoder, TokenizerFileError
from src.tokenizer.bpe_train import SPLIT_PATTERN, count_chunks, iter_blocks
from src.tokenizer.special_tokens import NUM_RESERVED_SPECIAL, SPECIAL_TOKENS
from src.utils.cli import UserError

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello world! Hello there, world.\nIt's 2024; we've got 1234567 tokens.\r\n",
    "naïve café — 東京 日本語 テキスト 😀😀 👍🏽 e\u0301\u0301 \t\tindent\n\n\n",
    "   spaces   before and after   ",
]


def naive_merges(texts, num_merges):
    """The textbook algorithm: recount every pair of every chunk occurrence per merge.

    Ties: highest count, then the smallest (left, right) pair of ids.
    """
    words = [list(c.encode("utf-8")) for t in texts for c in regex.findall(SPLIT_PATTERN, t)]
    merges = []
    for k in range(num_merges):
        counts = Counter(p for w in words for p in zip(w, w[1:]))
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        new_id = 256 + k
        merges.append(best)
        for wi, w in enumerate(words):
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[wi] = out
    return merges


def train_quiet(texts, vocab_size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BPETokenizer.train(texts, vocab_size)


def naive_encode(tok, text):
    """Apply every merge in order to every chunk: slow, obviously right."""
    out = []
    for chunk in regex.findall(SPLIT_PATTERN, text):
        ids = list(chunk.encode("utf-8"))
        for k, pair in enumerate(tok.merges):
            merged, i = [], 0
            while i < len(ids):
                if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
                    merged.append(256 + k)
                    i += 2
                else:
                    merged.append(ids[i])
                    i += 1
            ids = merged
        out.extend(ids)
    return out


BACKENDS = ["python"]
try:
    import tiktoken  # noqa: F401

    BACKENDS.append("tiktoken")
except ImportError:
    pass


@pytest.fixture(scope="module")
def trained():
    return train_quiet(CORPUS, 256 + NUM_RESERVED_SPECIAL + 120)


@pytest.fixture(scope="module", params=BACKENDS)
def tok(request, trained):
    """The same tokenizer on each encoder backend (python = the reference)."""
    t = BPETokenizer(trained.merges)
    t.backend_preference = request.param
    assert t.backend == request.param
    return t


@pytest.fixture(scope="module")
def py_tok(trained):
    t = BPETokenizer(trained.merges)
    t.backend_preference = "python"
    return t


# ---------------------------------------------------------------- training
@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    texts=st.lists(st.text(alphabet="ab c\n1é😀'", max_size=40), max_size=6),
    num_merges=st.integers(0, 30),
)
def test_trainer_matches_naive_reference(texts, num_merges):
    tok = train_quiet(texts, 256 + NUM_RESERVED_SPECIAL + num_merges)
    assert tok.merges == naive_merges(texts, num_merges)


def test_trainer_matches_naive_on_real_text():
    tok = BPETokenizer.train(CORPUS, 256 + NUM_RESERVED_SPECIAL + 60)
    assert tok.merges == naive_merges(CORPUS, 60)


def test_vocab_layout_and_specials(tok):
    n = 256 + len(tok.merges)
    assert tok.vocab_size == n + NUM_RESERVED_SPECIAL
    assert [tok.special_tokens[s] for s in SPECIAL_TOKENS] == list(range(n, n + len(SPECIAL_TOKENS)))
    assert tok.eot_id == n


def test_vocab_size_is_total_and_exact():
    text = ["".join(chr(0x4E00 + i) + " x" + str(i) for i in range(400))]
    tok = BPETokenizer.train(text, 400)
    assert tok.vocab_size == 400 and len(tok.merges) == 400 - 256 - NUM_RESERVED_SPECIAL


def test_too_small_vocab_and_early_stop():
    with pytest.raises(ValueError, match="at least"):
        BPETokenizer.train(["abc"], 100)
    with pytest.warns(UserWarning, match="only 2 merges"):
        tok = BPETokenizer.train(["abc"], 1000)
    assert tok.vocab_size == 256 + 2 + NUM_RESERVED_SPECIAL


def test_training_input_errors():
    with pytest.raises(ValueError, match="lone surrogate U\\+D83D"):
        BPETokenizer.train(["ok text", "bad \ud83d text"], 300)
    with pytest.raises(TypeError, match="not one string"):
        BPETokenizer.train("a text", 300)


def test_training_is_deterministic():
    a = train_quiet(CORPUS, 400)
    b = train_quiet(list(reversed(CORPUS)), 400)
    assert a.merges == b.merges and a.hash == b.hash


def test_block_cutting_does_not_change_chunks():
    text = "".join(f"line {i} has  words, 1234 and\n  spaces \n\nnext" for i in range(300))
    blocks = list(iter_blocks(text, block_chars=500))
    assert len(blocks) > 10 and "".join(blocks) == text
    assert count_chunks([text]) == Counter(c for b in blocks for c in regex.findall(SPLIT_PATTERN, b))


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.text(alphabet="ab 1.\n\r\t'😀", max_size=300), st.integers(1, 40))
def test_block_cutting_property(text, block_chars):
    blocks = list(iter_blocks(text, block_chars=block_chars))
    assert "".join(blocks) == text
    assert [c for b in blocks for c in regex.findall(SPLIT_PATTERN, b)] == regex.findall(SPLIT_PATTERN, text)


# ---------------------------------------------------------------- encoding
@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_roundtrip_any_text(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size - NUM_RESERVED_SPECIAL for i in ids)


@pytest.mark.parametrize(
    "text",
    ["", " ", "\r\n", "a\r\nb\r\n\r\n", " " * 100, "\x00\x01\x1b[0m\x7f", "😀👍🏽🇫🇷", "東京タワー", "e\u0301\u0302", "\t\n\x0b\x0c"],
)
def test_roundtrip_edge_cases(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.text(alphabet="ab \n\t1.'é😀xyz", max_size=120) | st.text(max_size=80))
def test_encoder_matches_naive_reference(py_tok, tok, text):
    text = text.encode("utf-8", "replace").decode("utf-8")
    assert tok.encode(text) == naive_encode(py_tok, text)


def test_long_chunks_use_the_linear_loop(tok, py_tok):
    for text in [" " * 5000 + "x", "\n" * 3000, "ab" * 3000, "1" * 1001, "😀" * 700, "é" * 999]:
        assert tok.encode(text) == naive_encode(py_tok, text)
        assert tok.decode(tok.encode(text)) == text


def test_backend_choice(trained, monkeypatch):
    monkeypatch.setenv("GPT_MODEL_BPE_BACKEND", "python")
    assert BPETokenizer(trained.merges).backend == "python"
    with pytest.raises(ValueError, match="backend must be"):
        BPETokenizer(trained.merges).backend_preference = "rust"
    monkeypatch.setenv("GPT_MODEL_BPE_BACKEND", "fast")
    with pytest.raises(ValueError, match="GPT_MODEL_BPE_BACKEND='fast'"):
        BPETokenizer(trained.merges)


def test_encode_compresses_and_is_cached(tok):
    text = CORPUS[0]
    ids = tok.encode(text)
    assert len(ids) < len(text.encode("utf-8")) / 2
    assert tok.encode(text) == ids  # second time from the chunk cache


def test_lone_surrogate_is_a_clear_error(tok):
    for encode in (tok.encode, tok.encode_with_special):
        with pytest.raises(ValueError, match="lone surrogate U\\+D800 at position 4"):
            encode("abc \ud800 def")
    with pytest.raises(ValueError, match="U\\+DFFF at position 15"):
        tok.encode_with_special("<|endoftext|>a \udfff")


def test_encode_never_emits_specials(tok):
    text = "hi<|endoftext|>there<|user|>x<|assistant|>"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text


def test_encode_with_special(tok):
    text = "hi<|endoftext|><|user|>q<|assistant|>a<|endoftext|"
    ids = tok.encode_with_special(text)
    s = tok.special_tokens
    assert ids.count(s["<|endoftext|>"]) == 1 and ids.count(s["<|user|>"]) == 1
    assert ids[: len(tok.encode("hi")) + 2] == tok.encode("hi") + [s["<|endoftext|>"], s["<|user|>"]]
    assert tok.decode(ids) == text


def test_encode_batch_returns_arrays(tok):
    texts = CORPUS * 3 + [""]
    arrays = tok.encode_batch(texts, num_workers=2)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.uint16 for a in arrays)
    assert [a.tolist() for a in arrays] == [tok.encode(t) for t in texts]


def test_encode_batch_cuts_long_texts(tok, monkeypatch):
    from src.tokenizer import bpe_batch

    monkeypatch.setattr(bpe_batch, "PARALLEL_MIN_CHARS", 1000)
    monkeypatch.setattr(bpe_batch, "GROUP_CHARS", 500)
    long_text = "".join(f"line {i}: {CORPUS[i % 4]}\n" for i in range(40))
    texts = ["", long_text, "x", long_text * 2]
    assert [a.tolist() for a in tok.encode_batch(texts, num_workers=2)] == [tok.encode(t) for t in texts]
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.encode_batch(["fine", "bad \udfff"], num_workers=2)


def test_encode_batch_in_worker_processes(py_tok, monkeypatch):
    long_text = "".join(f"line {i}: {CORPUS[i % 4]}\n" for i in range(60))
    from src.tokenizer import bpe_batch

    # Shrink the thresholds so a small batch is cut into pieces and sent to 2 processes.
    monkeypatch.setattr(bpe_batch, "PARALLEL_MIN_CHARS", 1000)
    monkeypatch.setattr(bpe_batch, "GROUP_CHARS", 700)
    assert len(bpe_batch.split_work([long_text], py_tok.pattern, 700)) > 5
    texts = [long_text, "", "short one", long_text[:999]]
    arrays = py_tok.encode_batch(texts, num_workers=2)
    assert [a.tolist() for a in arrays] == [py_tok.encode(t) for t in texts]
    assert all(a.dtype == np.uint16 for a in arrays)


# ---------------------------------------------------------------- decoding
def test_decode_bad_ids(tok):
    with pytest.raises(ValueError, match="reserved special id"):
        tok.decode([tok.vocab_size - 1])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="must be integers"):
        tok.decode([65, "66"])
    assert tok.decode(np.array([72, 105], dtype=np.uint16)) == "Hi"


def test_decode_invalid_utf8_replaces(tok):
    assert tok.decode([0xE6, 0x97]) == "\ufffd"  # the first two bytes of a 3-byte character


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.text(max_size=60).filter(lambda s: not any(0xD800 <= ord(c) < 0xE000 for c in s)))
def test_streaming_decoder(tok, text):
    ids = tok.encode_with_special(text + "<|endoftext|>")
    dec = StreamingDecoder(tok)
    pieces = [dec.feed(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == tok.decode(ids) == text + "<|endoftext|>"
    assert "\ufffd" not in "".join(pieces)


def test_streaming_decoder_holds_partial_characters(tok):
    dec = StreamingDecoder(tok)
    emoji = "😀".encode()
    assert [dec.feed(b) for b in emoji] == ["", "", "", "😀"]
    assert dec.feed(emoji[0]) == "" and dec.flush() == "\ufffd"


# ---------------------------------------------------------------- files
def test_save_load_roundtrip(tok, tmp_path):
    p = tmp_path / "t" / "tokenizer.json"
    tok.save(p)
    data = json.loads(p.read_text())
    assert data["format_version"] == 1 and data["hash"] == tok.hash and data["pattern"] == tok.pattern
    assert data["special_tokens"] == tok.special_tokens and len(data["merges"]) == len(tok.merges)
    tok2 = BPETokenizer.load(p)
    assert tok2.merges == tok.merges and tok2.hash == tok.hash and tok2.vocab_size == tok.vocab_size
    assert tok2.encode(CORPUS[2]) == tok.encode(CORPUS[2])
    assert [f.name for f in p.parent.iterdir()] == ["tokenizer.json"]


def test_hash_depends_on_content(tok):
    other = BPETokenizer(tok.merges[:-1])
    assert other.hash != tok.hash and len(tok.hash) == 64


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda s: s[: len(s) // 2], "not valid JSON"),
        (lambda s: '{"model": {"type": "BPE"}}', "not a gpt-model-bpe"),
        (lambda s: s.replace('"format_version": 1', '"format_version": 99'), "format_version"),
        (lambda s: s.replace("{1,3}", "{1,4}", 1), "hash mismatch"),
        (lambda s: s.replace('"num_reserved_special": 16', '"num_reserved_special": 8'), "reserved"),
        (lambda s: s.replace('[97, 98, "ab"]', '[97, 98, "xy"]', 1), "the file says"),
        (lambda s: s.replace('[97, 98, "ab"]', '[97, 98.5]', 1), "integer ids"),
        (lambda s: s.replace('"merges": [', '"merges": [[99999, 1],', 1), "not defined before"),
        (lambda s: s.replace('"pattern"', '"patern"'), "missing field"),
        (lambda s: "[1, 2]", "not a gpt-model-bpe"),
    ],
)
def test_load_rejects_bad_files(tmp_path, mangle, message):
    tok = train_quiet(["ab ab ab abc abc"], 300)
    p = tmp_path / "tok.json"
    tok.save(p)
    p.write_text(mangle(p.read_text()))
    with pytest.raises(TokenizerFileError, match=message) as info:
        BPETokenizer.load(p)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value) and str(p) in str(info.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(TokenizerFileError, match="not found"):
        BPETokenizer.load(tmp_path / "nope.json")


def test_vocabulary_tiktoken_cannot_represent_falls_back():
    # Hand-made merges where two pairs make "abc" (training never produces this).
    merges = [(97, 98), (256, 99), (98, 99), (97, 258)]
    t = BPETokenizer(merges)
    if "tiktoken" in BACKENDS:
        with pytest.warns(UserWarning, match="fast path disabled"):
            assert t.backend == "python"
    assert t.encode("abc abc") == [257, 32, 257] and t.decode([259]) == "abc"
    from src.tokenizer.formats import hf_tokenizer_json

    with pytest.raises(ValueError, match="same bytes"):
        hf_tokenizer_json(t)


def _batch_in_pool_worker(merges):
    from src.tokenizer import bpe_batch

    bpe_batch.PARALLEL_MIN_CHARS = 10  # would start processes, were it not a daemon
    tok = BPETokenizer(merges)
    tok.backend_preference = "python"
    return [a.tolist() for a in tok.encode_batch(CORPUS * 20, num_workers=2)]


def test_encode_batch_inside_a_pool_worker(trained):
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1) as pool:
        result = pool.apply(_batch_in_pool_worker, (trained.merges,))
    assert result == [trained.encode(t) for t in CORPUS * 20]
