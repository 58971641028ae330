"""The chat session: fitting history into the context, commands, and replies."""

from __future__ import annotations

import pytest

from src.data.chat_template import Turn
from src.infer.chat_session import CommandError, fit_prompt, message_text, parse_command
from src.infer.sampling import SamplingSettings

# ---------------------------------------------------------------- fitting the context

U, A, E = 901, 902, 900  # role and end ids of a stand-in vocabulary


def _turn(role, n, fill):
    return (Turn(role, "x"), [U if role == "user" else A] + [fill] * n)


def _history():
    # Four exchanges; user turns 4 ids, assistant turns 6 ids (10 per exchange).
    h = []
    for i in range(4):
        h += [_turn("user", 3, 10 + i), _turn("assistant", 5, 20 + i)]
    return h


def test_everything_kept_when_it_fits():
    h = _history()
    msg = [U, 1, 2]
    ids, dropped, cut = fit_prompt(h, msg, prefix=[E], suffix=[A], budget=100)
    assert dropped == 0 and cut == 0
    assert ids == [E] + sum((t for _, t in h), []) + msg + [A]


def test_oldest_exchanges_dropped_first_never_the_message():
    h = _history()
    msg = [U, 1, 2]
    # prefix 1 + message 3 + suffix 1 = 5; 25 - 5 = 20 fits the last two exchanges exactly.
    ids, dropped, cut = fit_prompt(h, msg, prefix=[E], suffix=[A], budget=25)
    assert dropped == 4 and cut == 0 and len(ids) == 25
    assert ids[1:3] == [U, 12] and ids[-4:] == [U, 1, 2, A]
    # One token less: the last exchange's assistant turn would fit without its user turn;
    # whole exchanges go, so the kept history starts at a user turn.
    ids, dropped, _ = fit_prompt(h, msg, prefix=[E], suffix=[A], budget=24)
    assert dropped == 6 and ids[1:3] == [U, 13] and len(ids) == 15


def test_message_longer_than_the_context_is_cut_from_the_front():
    h = _history()
    msg = [U] + list(range(100, 150))
    ids, dropped, cut = fit_prompt(h, msg, prefix=[E], suffix=[A], budget=20)
    assert dropped == 8  # no history fits at all
    assert len(ids) == 20 and cut == 50 - 17
    assert ids[:2] == [E, U] and ids[2:-1] == list(range(133, 150)) and ids[-1] == A


def test_tiny_budget_is_an_error():
    with pytest.raises(ValueError):
        fit_prompt([], [U, 1], prefix=[E], suffix=[A], budget=3)


# ---------------------------------------------------------------- commands


def test_settings_commands_change_only_their_setting():
    s = SamplingSettings(temperature=1.0, top_p=1.0)
    c = parse_command("/temperature 0.7", s)
    assert c.action == "set" and c.settings.temperature == 0.7 and c.settings.top_p == 1.0
    assert parse_command("/top_p 0.9", s).settings.top_p == 0.9
    assert parse_command("/top_k 40", s).settings.top_k == 40
    assert parse_command("/top_k 0", s).settings.top_k is None
    assert parse_command("/max_tokens 12", s).settings.max_new_tokens == 12
    assert parse_command("/repetition_penalty 1.2", s).settings.repetition_penalty == 1.2
    assert "temperature is 1.0" in parse_command("/temperature", s).message


@pytest.mark.parametrize(
    "line, words",
    [
        ("/temperature hot", ["/temperature", "'hot'"]),
        ("/temperature -1", ["temperature", "-1"]),
        ("/top_p 0", ["top_p"]),
        ("/top_p 2", ["top_p"]),
        ("/top_k 2.5", ["/top_k", "'2.5'"]),
        ("/max_tokens 0", ["max_new_tokens"]),
        ("/frobnicate", ["unknown command /frobnicate", "/help"]),
    ],
)
def test_bad_commands_say_what_is_wrong(line, words):
    with pytest.raises(CommandError) as exc:
        parse_command(line, SamplingSettings())
    for w in words:
        assert w in str(exc.value)


def test_other_commands_and_plain_messages():
    s = SamplingSettings()
    assert parse_command("/help", s).action == "help" and "/reset" in parse_command("/help", s).message
    assert parse_command("  /reset  ", s).action == "reset"
    assert parse_command("/quit", s).action == "quit"
    assert parse_command("/QUIT", s).action == "quit"
    assert "temperature=" in parse_command("/settings", s).message
    assert parse_command("hello /quit", s) is None
    assert parse_command("//etc is a folder", s) is None
    assert message_text("//etc is a folder") == "/etc is a folder"
    assert message_text("  hi there \n") == "hi there"
