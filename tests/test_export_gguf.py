"""export.py --format gguf, verified by an independent reader: transformers' GGUF loader
(gguf-py underneath) must rebuild our model (logits within the stated tolerance per type)
and our tokenizer (same ids, same chat prompt), without any of our code."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers needs it to load GGUF weights

from src.checkpoint import load_model  # noqa: E402
from src.export import export_run  # noqa: E402
from src.model.gguf_llama import rope_interleave  # noqa: E402
from tests.fixtures import make_tiny_run  # noqa: E402
from tests.test_export import CHAT, chat_prompt, corpus  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# Max abs logit difference vs our fp32 model, per file type, relative to the largest |logit|
# (f32: absolute). Measured on this model (README "Export"): f32 0, f16 1.3e-4, bf16 9.4e-4,
# q8_0 4.2e-3, with logits up to 1.03.
TOLERANCE = {"f32": 1e-4, "f16": 2e-3, "bf16": 1e-2, "q8_0": 2e-2}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("gguf"), steps=6, d_model=64, d_ff=128)


@pytest.fixture(scope="module")
def ours(run_dir):
    return load_model(run_dir)


def export_gguf(run_dir, out, dtype):
    result = export_run(run_dir, out, fmt="gguf", dtype=dtype)
    [(name, _)] = result.files
    return name


@pytest.mark.parametrize("dtype,gtype", [("float32", "f32"), ("float16", "f16"),
                                         ("bfloat16", "bf16"), ("q8_0", "q8_0")])
def test_transformers_reads_our_gguf(run_dir, ours, tmp_path, dtype, gtype):
    model, tok, _ = ours
    name = export_gguf(run_dir, tmp_path / "g", dtype)
    assert name == f"model-{gtype}.gguf"
    reader = gguf.GGUFReader(tmp_path / "g" / name)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["output_norm.weight"] == "F32" and "output.weight" not in types  # tied
    assert types["blk.0.attn_q.weight"] == gtype.upper()
    assert types["token_embd.weight"] == gtype.upper()

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file=name,
                                                           dtype=torch.float32).eval()
    idx = torch.tensor([tok.encode(corpus()[-1][:2000])[:64]])
    with torch.no_grad():
        ref = model(idx)
        diff = (hf(idx).logits - ref).abs().max().item()
    scale = 1.0 if gtype == "f32" else ref.abs().max().item()
    assert diff <= TOLERANCE[gtype] * scale, diff

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file=name)
    for text in corpus():
        assert hf_tok(text)["input_ids"] == tok.encode(text), text[:40]
    ids = hf_tok.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"]
    assert ids == chat_prompt(tok, CHAT, add_generation_prompt=True, end=False)


def test_untied_multi_head_model(ours, tmp_path):
    """A separate output head (GGUF "output.weight") and as many key/value heads as heads."""
    from src.checkpoint import save_model_checkpoint
    from src.model.gpt import GPT

    model, tok, _ = ours
    torch.manual_seed(0)
    config = replace(model.config, n_kv_head=model.config.n_head, tie_embeddings=False)
    untied = GPT(config).eval()
    run = tmp_path / "run"
    run.mkdir()
    tok.save(run / "tokenizer.json")
    save_model_checkpoint(run, 1, untied.state_dict(),
                          {"model_config": config.to_dict(), "tokenizer_hash": tok.hash})
    export_run(run, tmp_path / "out", fmt="both")
    idx = torch.tensor([tok.encode("The cat sees the ball.")])
    with torch.no_grad():
        ref = untied(idx)
        for kwargs in ({}, {"gguf_file": "model-f32.gguf"}):
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", **kwargs)
            assert not hf.config.tie_word_embeddings
            assert (hf.eval()(idx).logits - ref).abs().max().item() <= 1e-4, kwargs


def test_tokenizer_metadata(run_dir, ours, tmp_path):
    _, tok, _ = ours
    name = export_gguf(run_dir, tmp_path / "g", "float16")
    reader = gguf.GGUFReader(tmp_path / "g" / name)

    def field(key):
        return reader.get_field(key).contents()

    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "llama-bpe"
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == tok.vocab_size
    assert len(field("tokenizer.ggml.merges")) == len(tok.merges)
    for special, i in tok.special_tokens.items():
        assert tokens[i] == special and types[i] == gguf.TokenType.CONTROL
    assert types[-1] == gguf.TokenType.UNUSED  # a reserved special id
    assert field("tokenizer.ggml.eos_token_id") == tok.eot_id
    assert field("tokenizer.ggml.add_bos_token") is False
    assert "<|assistant|>" in field("tokenizer.chat_template")


def test_rope_interleave_pairs_channels_for_llama_cpp():
    """Row j of a head's first half goes to 2j, of its second half to 2j + 1."""
    head_dim, heads = 8, 2
    w = torch.arange(heads * head_dim, dtype=torch.float32)[:, None].repeat(1, 3)
    out = rope_interleave(w, heads)
    first = out[:head_dim, 0].tolist()
    assert first == [0, 4, 1, 5, 2, 6, 3, 7]
    assert out[head_dim:, 0].tolist() == [8, 12, 9, 13, 10, 14, 11, 15]


def test_q8_0_falls_back_to_f16_for_short_rows(tmp_path):
    """Width 48 is not a multiple of q8_0's 32-value blocks: those matrices go f16, said once."""
    run_dir = make_tiny_run(tmp_path, steps=1)
    result = export_run(run_dir, tmp_path / "g", fmt="gguf", dtype="q8_0")
    assert result.notes and "f16" in result.notes[0]
    reader = gguf.GGUFReader(tmp_path / "g" / "model-q8_0.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "F16"
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of d_ff=128 values


def test_tokenizers_with_a_real_vocabulary(tmp_path):
    """With 496 merges learned from WikiText-2 (not the fixture's synthetic English), both
    exported tokenizers, the folder's and the GGUF's, still give exactly our ids."""
    from src.checkpoint import save_model_checkpoint
    from src.model.gpt import GPT
    from src.tokenizer.bpe import BPETokenizer
    from src.training.presets import model_config
    from tests.test_export import VALID

    train = VALID.parent / "wiki.train.tokens"
    if not train.is_file():
        pytest.skip(f"shared data not found: {train}")
    tok = BPETokenizer.train([train.read_text(encoding="utf-8")[:50_000]], 768)
    config = model_config("tiny", vocab_size=tok.vocab_size, d_model=64, d_ff=128)
    run = tmp_path / "run"
    run.mkdir()
    tok.save(run / "tokenizer.json")
    save_model_checkpoint(run, 1, GPT(config).state_dict(),
                          {"model_config": config.to_dict(), "tokenizer_hash": tok.hash})
    export_run(run, tmp_path / "out", fmt="both", dtype="float16")
    readers = [transformers.AutoTokenizer.from_pretrained(tmp_path / "out"),
               transformers.AutoTokenizer.from_pretrained(tmp_path / "out",
                                                          gguf_file="model-f16.gguf")]
    for text in corpus():
        ids = tok.encode(text)
        assert len(ids) < len(text.encode("utf-8")) or len(text) < 100  # merges do apply
        for reader in readers:
            assert reader(text)["input_ids"] == ids, text[:40]
