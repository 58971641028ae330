"""The chat template, checked with a stand-in tokenizer (one id per character) so that the
test exercises only the template's own logic."""

import pytest

from src.tokenizer.chat_template import (
    ASSISTANT_STOP_TOKENS,
    Turn,
    alternate_turns,
    encode_chat,
    render_chat,
    reply_stop_ids,
)
from src.tokenizer.special_tokens import ASSISTANT, ENDOFTEXT, USER


class CharTokenizer:
    special_tokens = {ENDOFTEXT: 1000, USER: 1001, ASSISTANT: 1002}

    def encode(self, text):
        return [ord(c) for c in text]


def test_render_and_encode_agree():
    turns = alternate_turns(["Hi!", "Hello.", "Bye"])
    assert [t.role for t in turns] == ["user", "assistant", "user"]
    assert render_chat(turns) == "<|user|>Hi!<|assistant|>Hello.<|user|>Bye<|endoftext|>"
    ids, mask = encode_chat(CharTokenizer(), turns)
    tok = CharTokenizer()
    inv = {v: k for k, v in tok.special_tokens.items()}
    assert "".join(inv.get(i, chr(i)) if i >= 1000 else chr(i) for i in ids) == render_chat(turns)
    assert len(mask) == len(ids)


def test_assistant_mask_covers_reply_and_its_end_token():
    ids, mask = encode_chat(CharTokenizer(), alternate_turns(["ab", "cd"]))
    # <|user|> a b <|assistant|> c d <|endoftext|>
    assert ids == [1001, 97, 98, 1002, 99, 100, 1000]
    assert mask == [False, False, False, False, True, True, True]


def test_generation_prompt_ends_with_assistant_token():
    ids, mask = encode_chat(
        CharTokenizer(), [Turn("user", "hi")], add_generation_prompt=True, end=False
    )
    assert ids[-1] == 1002 and ENDOFTEXT not in render_chat([Turn("user", "hi")], end=False)
    with pytest.raises(ValueError):
        encode_chat(CharTokenizer(), [Turn("user", "hi")], add_generation_prompt=True)


def test_literal_special_strings_stay_text():
    ids, _ = encode_chat(CharTokenizer(), [Turn("user", ENDOFTEXT)], end=False)
    assert ids[0] == 1001 and 1000 not in ids[1:]


def test_unknown_role_and_stop_tokens():
    with pytest.raises(ValueError):
        Turn("tool", "x")  # "system" is a role since issue 14
    assert set(ASSISTANT_STOP_TOKENS) == {USER, ENDOFTEXT}


def test_reply_stop_rule_is_every_special_token():
    specials = {**CharTokenizer.special_tokens, "<|reserved_0|>": 1003}
    stops = reply_stop_ids(specials)
    assert stops == [1000, 1001, 1002, 1003]
    assert {specials[name] for name in ASSISTANT_STOP_TOKENS} <= set(stops)
