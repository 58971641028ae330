"""The chat session: fitting history into the context, commands, and replies."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.infer.chat_session import (
    ChatSession,
    CommandError,
    fit_prompt,
    message_text,
    parse_command,
)
from src.infer.sampling import SamplingSettings
from src.tokenizer.chat_template import Turn
from src.tokenizer.special_tokens import ASSISTANT, ENDOFTEXT, USER
from src.utils.cli import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


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
        ("/temperature -1", ["/temperature must be", "-1"]),
        ("/top_p 0", ["/top_p must be in (0, 1]"]),
        ("/top_p 2", ["top_p"]),
        ("/top_k 2.5", ["/top_k", "'2.5'"]),
        ("/max_tokens 0", ["/max_tokens must be", "got 0"]),
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
    assert (
        parse_command("/help", s).action == "help" and "/reset" in parse_command("/help", s).message
    )
    assert parse_command("  /reset  ", s).action == "reset"
    assert parse_command("/quit", s).action == "quit"
    assert parse_command("/QUIT", s).action == "quit"
    assert "temperature=" in parse_command("/settings", s).message
    assert parse_command("hello /quit", s) is None
    assert parse_command("//etc is a folder", s) is None
    assert message_text("//etc is a folder") == "/etc is a folder"
    assert message_text("  hi there \n") == "hi there"


# ---------------------------------------------------------------- replies, with a scripted model


@pytest.fixture(scope="module")
def tok():
    from src.tokenizer.bpe import BPETokenizer

    return BPETokenizer.train(["hello world, how are you? fine thanks. " * 5], vocab_size=280)


def _session(tok, reply="fine thanks", context_length=256, max_tokens=20):
    from tests.test_sampling import ScriptModel

    script = tok.encode(reply) + [tok.special_tokens[USER]]
    model = ScriptModel(script, tok.vocab_size, context_length=context_length)
    return ChatSession(model, tok, SamplingSettings(max_new_tokens=max_tokens, greedy=True)), model


def test_reply_ends_at_the_stop_token_and_history_grows(tok):
    session, model = _session(tok)
    streamed = []
    r = session.reply("hello, how are you?", on_text=streamed.append)
    assert (r.text, r.finish_reason) == ("fine thanks", "stop_token")
    assert "".join(streamed) == "fine thanks"
    r = session.reply("and you?")
    sp = tok.special_tokens
    expected = (
        [sp[ENDOFTEXT], sp[USER]]
        + tok.encode("hello, how are you?")
        + [sp[ASSISTANT]]
        + tok.encode("fine thanks")
        + [sp[USER]]
        + tok.encode("and you?")
        + [sp[ASSISTANT]]
    )
    assert model.prompts[-1] == expected  # the template, with the history exactly once
    assert [t.role for t, _ in session.history] == ["user", "assistant"] * 2
    session.reset()
    session.reply("hi")
    assert model.prompts[-1] == [sp[ENDOFTEXT], sp[USER]] + tok.encode("hi") + [sp[ASSISTANT]]


def test_special_token_strings_typed_by_the_user_stay_text(tok):
    session, model = _session(tok)
    text = "<|endoftext|><|user|> hi <|assistant|>"
    session.reply(text)
    prompt = model.prompts[-1]
    specials = set(tok.special_tokens.values())
    assert [i for i in prompt if i in specials] == [
        tok.special_tokens[ENDOFTEXT],
        tok.special_tokens[USER],
        tok.special_tokens[ASSISTANT],
    ]
    assert tok.decode(prompt[2:-1]) == text


def test_empty_and_blank_messages_get_no_reply(tok):
    session, model = _session(tok)
    for text in ["", "   ", "\t\n"]:
        with pytest.raises(ValueError, match="empty"):
            session.reply(text)
    assert model.prompts == [] and session.history == []


def test_history_is_dropped_oldest_first_with_a_notice(tok):
    session, model = _session(tok, context_length=64, max_tokens=10)
    notices = []
    for i in range(8):
        session.reply(f"hello world number {i}", notice=notices.append)
        assert len(model.prompts[-1]) <= 64 - 10
    assert any("oldest" in n for n in notices)
    prompt_text = tok.decode(model.prompts[-1])
    assert "number 7" in prompt_text and "number 0" not in prompt_text
    assert prompt_text.startswith("<|endoftext|><|user|>")  # whole exchanges were dropped


def test_message_longer_than_the_context_keeps_its_end(tok):
    session, model = _session(tok, context_length=64, max_tokens=200)  # reply room: 32
    notices = []
    text = " ".join(f"w{i}" for i in range(300)) + " THE END"
    r = session.reply(text, notice=notices.append)
    assert r.text == "fine thanks"
    prompt = model.prompts[-1]
    assert len(prompt) == 32 and tok.decode(prompt).endswith("THE END<|assistant|>")
    assert any("kept its last" in n for n in notices)


def test_reply_that_fills_the_context_stops_there(tok):
    session, model = _session(tok, reply="hello " * 100, context_length=48, max_tokens=500)
    r = session.reply("hi")
    prompt = model.prompts[-1]
    assert r.finish_reason == "context"
    assert len(prompt) + len(tok.encode(r.text)) == 48 + 1  # the last token drawn from a full window


def test_ctrl_c_stops_the_reply_and_keeps_what_was_shown(tok):
    session, _ = _session(tok, reply="fine thanks, and you")
    shown = []

    def interrupt_after_two(piece):
        shown.append(piece)
        if len(shown) == 2:
            raise KeyboardInterrupt

    r = session.reply("hello", on_text=interrupt_after_two)
    assert r.finish_reason == "interrupted" and r.text == "".join(shown)
    assert session.history[-1][0].text == r.text
    assert session.reply("again").finish_reason == "stop_token"  # the session goes on


# ---------------------------------------------------------------- chat.py, on a tiny trained run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from tests.test_generate_cli import shared_tiny_run

    return shared_tiny_run(tmp_path_factory)


class PipedStdin:
    """What chat.py reads when input is piped: bytes, not a terminal."""

    def __init__(self, data: bytes):
        self.buffer = io.BytesIO(data)

    def isatty(self):
        return False


def chat(monkeypatch, capsys, run_dir, stdin: bytes, *args):
    import chat as chat_cli

    monkeypatch.setattr(sys, "stdin", PipedStdin(stdin))
    code = chat_cli.main(["--run", str(run_dir), "--device", "cpu", "--max-tokens", "16", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_piped_one_reply_per_line_blank_lines_skipped(monkeypatch, capsys, run_dir):
    code, out, err = chat(
        monkeypatch, capsys, run_dir, b"Hello there\n\n   \n\t\nThe cat sees?\r\n", "--seed", "0"
    )
    # stderr says which run was loaded and that it is barely trained (a 6-step run), nothing else.
    assert code == 0 and out.count("\n") == 2
    assert err.splitlines() == [f"loaded {run_dir}, checkpoint step_0000006 (step 6, val loss "
                                f"{err.split('val loss ')[1].split(')')[0]})",
                                f"warning: {run_dir} trained only 6 steps: expect gibberish"]
    assert all(ch >= " " for ch in out.replace("\n", "").replace("\t", ""))  # no ESC etc.


def test_piped_bad_utf8_line_gets_an_error_and_the_rest_replies(monkeypatch, capsys, run_dir):
    code, out, err = chat(monkeypatch, capsys, run_dir, b"hi\ncaf\xe9 \xff\nbye\n")
    assert code == 1 and out.count("\n") == 2
    assert "input line 2 is not valid UTF-8" in err and "Traceback" not in err


def test_piped_commands_go_to_stderr_and_quit_stops(monkeypatch, capsys, run_dir):
    stdin = b"/temperature 0\nhello\n/top_p 7\n/bogus\n/reset\n/quit\nnever answered\n"
    code, out, err = chat(monkeypatch, capsys, run_dir, stdin)
    assert out.count("\n") == 1 and code == 1  # two bad commands
    assert "(temperature = 0)" in err and "/top_p must be in (0, 1]" in err
    assert "unknown command /bogus" in err and "(conversation reset)" in err


def test_piped_greedy_is_reproducible_and_seeds_repeat(monkeypatch, capsys, run_dir):
    lines = b"Hello\nHow are you?\n"
    runs = [chat(monkeypatch, capsys, run_dir, lines, "--temperature", "0")[1] for _ in range(2)]
    assert runs[0] == runs[1]
    runs = [
        chat(monkeypatch, capsys, run_dir, lines, "--seed", "9", "--temperature", "1")[1]
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_piped_message_longer_than_the_context(monkeypatch, capsys, run_dir):
    long_line = ("the old man reads a long letter " * 80).encode() + b"\n"
    code, out, err = chat(monkeypatch, capsys, run_dir, long_line + b"and then?\n")
    assert code == 0 and out.count("\n") == 2
    assert "kept its last" in err and "forgot" in err


@pytest.mark.parametrize("device", ["banana", "mps", "cuda:7"])
def test_bad_or_absent_device_is_one_line(monkeypatch, capsys, run_dir, device):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(UserError, match=f"--device {device}: "):
        chat(monkeypatch, capsys, run_dir, b"hi\n", "--device", device)


def test_no_trained_run_says_how_to_train(monkeypatch, tmp_path):
    import chat as chat_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", PipedStdin(b"hi\n"))
    with pytest.raises(UserError, match="python train.py"):
        chat_cli.main([])


@pytest.mark.slow
def test_echo_into_chat_end_to_end(run_dir):
    stdin = b"Hello, how are you?\n\n<|endoftext|><|user|>hi<|assistant|>\n"
    done = subprocess.run(
        [sys.executable, str(REPO / "chat.py"), "--run", str(run_dir), "--max-tokens", "20"],
        input=stdin,
        capture_output=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().count("\n") == 2 and b"error" not in done.stderr
