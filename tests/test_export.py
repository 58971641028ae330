"""export.py: a run as a Hugging Face folder, checked by real ``transformers`` (tokenizer ids,
chat template, logits, greedy generation), and back to a bit-identical run (--from-hf).

A tiny model (width 64, so q8_0 blocks fit) is trained for a few steps once per module.
GGUF files are checked in tests/test_export_gguf.py, bad input in tests/test_export_errors.py.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from src.checkpoint import load_model, read_weights  # noqa: E402
from src.export import export_run, import_hf  # noqa: E402
from src.infer.chat_session import ChatSession  # noqa: E402
from src.infer.sampling import SamplingSettings, generate  # noqa: E402
from src.tokenizer.chat_template import ROLE_TOKENS, Turn, encode_chat, reply_stop_ids  # noqa: E402
from src.tokenizer.formats import jinja_chat_template  # noqa: E402
from src.tokenizer.special_tokens import ASSISTANT, ENDOFTEXT, USER  # noqa: E402
from tests.fixtures import make_tiny_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VALID = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"
MIXED = [
    "Plain English: the cat sees the ball in the park.",
    "Unicode: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, ﬁ ligature, e\u0301",
    "Emoji: 😀👍🏽 👩‍👩‍👧 🇫🇷 and ✨",
    "Whitespace runs:   three,\t\ttabs,\n\n\nnewlines, \r\n CRLF,    \n  trailing   ",
    "Numbers 1234567 and 3.14159, contractions: don't, I'LL, we've, it's",
]
SPECIAL_LOOKING = "say <|endoftext|> and <|user|>x<|assistant|> or <|endoftext| literally"
CHAT = [
    {"role": "user", "content": "Hi there! How are you?"},
    {"role": "assistant", "content": "Fine, thanks. And you?"},
    {"role": "user", "content": "Great, 😀 see  you"},
]


def corpus() -> list[str]:
    texts = list(MIXED)
    if VALID.is_file():
        texts.append(VALID.read_text(encoding="utf-8")[:20_000])
    return texts


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("export"), steps=6, d_model=64, d_ff=128)


@pytest.fixture(scope="module")
def ours(run_dir):
    return load_model(run_dir)


@pytest.fixture(scope="module")
def hf_dir(run_dir) -> Path:
    out = run_dir.parent / "hf"
    export_run(run_dir, out)
    return out


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    return transformers.AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()


def test_folder_holds_the_model_the_tokenizer_and_a_card(hf_dir, ours):
    model, tok, info = ours
    names = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "README.md"} <= names
    assert not any(n.startswith(".") for n in names)
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    gen = transformers.GenerationConfig.from_pretrained(hf_dir)
    assert sorted(gen.eos_token_id) == reply_stop_ids(tok.special_tokens)
    assert gen.top_p == 0.9 and gen.top_k == 0 and gen.do_sample
    card = (hf_dir / "README.md").read_text()
    assert f"step {info['step']:,}" in card and "val_loss" in card
    assert "license:" in card and "Licence of the data" in card
    # The card's own usage code runs as written.
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    torch.manual_seed(0)
    exec(code.replace("PATH", str(hf_dir)), {"print": lambda *a: None})


def test_autotokenizer_gives_our_ids(hf_tok, ours):
    _, tok, _ = ours
    for text in corpus():
        ids = tok.encode(text)
        assert hf_tok(text)["input_ids"] == ids, text[:40]
        assert hf_tok.decode(ids) == text
    # Text spelling a special token stays text when the caller asks for plain text, as our
    # encode always does; by transformers' convention a plain call parses special tokens.
    plain = hf_tok(SPECIAL_LOOKING, split_special_tokens=True)["input_ids"]
    assert plain == tok.encode(SPECIAL_LOOKING)
    assert hf_tok(SPECIAL_LOOKING)["input_ids"] == tok.encode_with_special(SPECIAL_LOOKING)
    assert hf_tok.eos_token_id == tok.eot_id and hf_tok.bos_token_id == tok.eot_id


def chat_prompt(tok, messages, **kwargs) -> list[int]:
    """Our chat prompt, as ChatSession builds it: <|endoftext|> then encode_chat."""
    turns = [Turn(m["role"], m["content"]) for m in messages]
    return [tok.eot_id] + encode_chat(tok, turns, **kwargs)[0]


def test_chat_template_gives_our_chat_prompt(hf_tok, ours):
    model, tok, _ = ours
    ids = hf_tok.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"]
    assert ids == chat_prompt(tok, CHAT, add_generation_prompt=True, end=False)
    session = ChatSession(model, tok, SamplingSettings(max_new_tokens=1))  # room for it all
    session.history = [(Turn(m["role"], m["content"]),
                        encode_chat(tok, [Turn(m["role"], m["content"])], end=False)[0])
                       for m in CHAT[:2]]
    assert ids == session.build_prompt(CHAT[2]["content"])[0]
    finished = hf_tok.apply_chat_template(CHAT[:2])["input_ids"]
    assert finished == chat_prompt(tok, CHAT[:2], end=True)
    # A message spelling special tokens: plain text here, and there with sanitizing.
    if "sanitize_control_tokens" not in inspect.signature(hf_tok.apply_chat_template).parameters:
        return  # an older transformers: no way to keep them plain there
    tricky = [{"role": "user", "content": SPECIAL_LOOKING}]
    sanitized = hf_tok.apply_chat_template(tricky, add_generation_prompt=True,
                                           sanitize_control_tokens=True)["input_ids"]
    assert sanitized == chat_prompt(tok, tricky, add_generation_prompt=True, end=False)
    with pytest.raises(Exception, match="unknown chat role"):
        hf_tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_chat_template_system_role(hf_tok, ours):
    if "system" not in ROLE_TOKENS:
        pytest.skip("the tokenizer has no system role yet")
    _, tok, _ = ours
    messages = [{"role": "system", "content": "Be brief."}, *CHAT]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert ids == chat_prompt(tok, messages, add_generation_prompt=True, end=False)
    with pytest.raises(Exception, match="system"):
        hf_tok.apply_chat_template([CHAT[0], {"role": "system", "content": "late"}])


def test_template_has_only_the_roles_the_tokenizer_has():
    """A run whose tokenizer predates a role gets no template branch for it."""
    import re

    specials = {ENDOFTEXT: 300, USER: 301, ASSISTANT: 302}
    written = set(re.findall(r"<\|\w+\|>", jinja_chat_template(specials)))
    assert written == set(specials)


def test_logits_match_fp32(hf_model, ours):
    model, tok, _ = ours
    idx = torch.tensor([tok.encode(corpus()[-1][:2000])[:64]])
    with torch.no_grad():
        diff = (hf_model(idx).logits - model(idx)).abs().max().item()
    assert diff <= 1e-4


def test_bf16_export_within_stated_tolerance(run_dir, ours, tmp_path):
    """README: bf16 weights, run by transformers in bf16, stay within 5% of the largest |logit|
    of our fp32 model (measured: 0.6%)."""
    model, tok, _ = ours
    export_run(run_dir, tmp_path / "bf16", dtype="bfloat16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").eval()
    assert hf.dtype == torch.bfloat16
    idx = torch.tensor([tok.encode(corpus()[-1][:2000])[:64]])
    with torch.no_grad():
        ref = model(idx)
        diff = (hf(idx).logits.float() - ref).abs().max().item()
    assert 0 < diff <= 0.05 * ref.abs().max().item()


def test_greedy_generation_matches_ours(hf_model, hf_tok, ours):
    model, tok, _ = ours
    greedy = SamplingSettings(max_new_tokens=24, greedy=True)
    # generate.py --greedy: a document after <|endoftext|>, stopping at <|endoftext|>.
    prompt = [tok.eot_id] + tok.encode("The cat sees")
    (mine,) = generate(model, tok, prompt, greedy, stop_ids=[tok.eot_id])
    out = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24,
                            eos_token_id=tok.eot_id)
    theirs = [t for t in out[0, len(prompt):].tolist() if t != tok.eot_id]
    assert theirs == mine.ids and len(mine.ids) > 0
    # A chat reply with the folder's own generation config (its stop ids), greedy, within
    # the context (where ours stops; transformers would run past it).
    chat = hf_tok.apply_chat_template(CHAT[:1], add_generation_prompt=True, return_tensors="pt")
    n = chat["input_ids"].shape[1]
    greedy = SamplingSettings(max_new_tokens=model.config.context_length - n, greedy=True)
    (reply,) = generate(model, tok, chat["input_ids"][0].tolist(), greedy,
                        stop_ids=reply_stop_ids(tok.special_tokens))
    out = hf_model.generate(**chat, do_sample=False, max_new_tokens=greedy.max_new_tokens)
    text = hf_tok.decode(out[0, n:], skip_special_tokens=True)
    assert text == reply.text


def test_round_trip_is_bit_identical_and_usable(hf_dir, run_dir, ours, tmp_path):
    model, tok, info = ours
    result = import_hf(hf_dir, tmp_path / "back")
    back, back_tok, back_info = load_model(tmp_path / "back")
    assert back_tok.hash == tok.hash and back_info["step"] == info["step"]
    assert back_info["data_meta"] == info["data_meta"]  # evaluate.py prepares text as trained
    ours_sd, again = model.state_dict(), back.state_dict()
    assert ours_sd.keys() == again.keys()
    for name in ours_sd:
        assert torch.equal(ours_sd[name], again[name]), name
    assert back.lm_head.weight is back.tok_emb.weight
    assert any(name.endswith("model.safetensors") for name, _ in result.files)
    # chat.py's session answers with it.
    reply = ChatSession(back, back_tok, SamplingSettings(max_new_tokens=5), seed=0).reply("Hi")
    assert reply.finish_reason in ("stop_token", "length")
    # Fine-tuning starts from its weights as from a trained run: one optimiser step learns.
    from src.model.gpt import GPT
    from src.training.optim import build_optimizers
    from tests.fixtures import tiny_config

    cfg = tiny_config(run_dir.parent / "data", tmp_path / "ft")
    student = GPT(back.config)
    student.load_state_dict(read_weights(back_info["checkpoint"]), strict=True)
    opt = build_optimizers(student, cfg)
    batch = torch.tensor([tok.encode("The cat sees the ball. A dog likes the river.")])
    losses = []
    for _ in range(2):
        _, loss = student(batch[:, :-1], batch[:, 1:])
        losses.append(loss.item())
        loss.backward()
        for o in opt:
            o.step()
            o.zero_grad()
    assert losses[1] < losses[0]


def test_a_folder_saved_by_transformers_converts_back(hf_model, hf_tok, tmp_path):
    """Fine-tuned in transformers and saved by it (its own serialisation of config, weights
    and tokenizer): --from-hf gives a run computing the same logits."""
    folder = tmp_path / "saved"
    hf_model.save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    import_hf(folder, tmp_path / "run")
    model, tok, info = load_model(tmp_path / "run")
    assert info["step"] == 0 and info["data_meta"] is None  # no gpt_model_run.json there
    idx = torch.tensor([tok.encode("The cat sees the ball.")])
    with torch.no_grad():
        assert torch.equal(model(idx), hf_model(idx).logits)


def test_another_llama_with_its_own_byte_level_bpe(tmp_path):
    """A Llama made elsewhere: a GPT-2-style tokenizer (HF tokenizers' trainer: special token
    first, bytes in its own order) and random weights. --from-hf renumbers the tokens into our
    layout and reorders the embedding rows, so the run predicts exactly what the original did."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from src.tokenizer.formats import byte_to_unicode
    from tests.fixtures import tiny_corpus

    folder = tmp_path / "other"
    folder.mkdir()
    hf_tok = Tokenizer(models.BPE())
    hf_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tok.decoder = decoders.ByteLevel()
    hf_tok.train_from_iterator(tiny_corpus(200, 3), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok.save(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=hf_tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, tie_word_embeddings=False, eos_token_id=0)
    other = transformers.LlamaForCausalLM(config).eval()
    other.save_pretrained(folder)

    result = import_hf(folder, tmp_path / "run")
    assert "<|user|>" in result.notes[0]  # our role tokens are new to it
    model, tok, _ = load_model(tmp_path / "run")
    b2u = byte_to_unicode()
    theirs_of = [hf_tok.token_to_id("".join(b2u[b] for b in t)) for t in tok.vocab]
    text = "The old man reads a long letter in the park. Café!"
    ids = tok.encode(text)
    assert [theirs_of[i] for i in ids] == hf_tok.encode(text).ids  # the same tokens
    with torch.no_grad():
        mine = model(torch.tensor([[tok.eot_id, *ids]]))
        ref = other(torch.tensor([[0, *hf_tok.encode(text).ids]])).logits
    torch.testing.assert_close(mine[..., : len(tok.vocab)], ref[..., theirs_of], rtol=1e-5,
                               atol=1e-5)


def test_force_replaces_and_nothing_is_left_beside(run_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    export_run(run_dir, out, force=True)
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_room_never_imports_training():
    """Export and training are sibling rooms: src/export reads runs through src/checkpoint."""
    import ast

    for path in (Path(__file__).resolve().parents[1] / "src" / "export").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("src.training") for n in names), path.name


@pytest.mark.parametrize("mix,licence", [
    ({"wikitext": 1.0, "dailydialog": 2.0}, "cc-by-nc-sa-4.0"),
    ({"wikitext": 1.0, "dailydialog": 0.0}, "cc-by-sa-3.0"),  # DailyDialog left out of training
])
def test_model_card_licence_follows_the_training_data(ours, hf_dir, mix, licence):
    from src.export.model_card import model_card

    model, _, info = ours
    meta = {"sources": {name: {} for name in mix}, "mix": mix}
    card = model_card(model, {**info, "data_meta": meta}, ["config.json"], None)
    assert f"license: {licence}" in card
    assert ("non-commercial" in card) == (mix["dailydialog"] > 0)
    assert "CC BY-SA 3.0" in card
