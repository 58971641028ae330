"""Talk to a trained model.

    python chat.py                      # the newest fine-tuned run under runs/, else the newest run,
                                        # its best checkpoint (says on stderr which it loaded)
    python chat.py --run runs/small --checkpoint latest   # or best, or a step number
    python chat.py --run runs/small --temperature 0.7
    echo "Hello, how are you?" | python chat.py --run runs/small

In a terminal: type a message and press Enter; the reply streams as it is generated.
/help lists the commands (/reset, /quit, /temperature 0.7, /top_p 0.9, /top_k 40,
/max_tokens 100, ...). Ctrl-C stops a reply (not the program); Ctrl-D leaves.

Piped (stdin is not a terminal): each input line is one message and gets one reply, one
line on stdout (a line break inside a reply is written as a space; control characters such
as ESC are never printed, in a terminal either). There is no banner or prompt, and notices
go to stderr, so stdout holds only the replies. Commands work too (their messages go to
stderr). Empty and whitespace-only lines are skipped without a reply. A line that is not valid UTF-8 gets an
error on stderr and no reply; the other lines are answered and the exit status is then 1
(0 when every line was fine).

The conversation is kept as history; when it outgrows the model's context the oldest
exchanges are forgotten (said on stderr). See src/infer/chat_session.py for the details.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the repo root

from src.infer.chat_session import ChatSession, CommandError, message_text, parse_command
from src.infer.generate import (
    add_loading_args,
    add_sampling_args,
    load_model_from_args,
    settings_from_args,
)
from src.infer.sampling import CHAT_DEFAULTS
from src.utils.cli import run_cli
from src.utils.terminal import printable


def read_lines_piped():
    """Yield each line of stdin's bytes as text, or None when the line is not UTF-8
    (decoding per line, so one bad line does not spoil the rest)."""
    for number, raw in enumerate(sys.stdin.buffer, 1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark
        try:
            yield raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            print(
                f"error: input line {number} is not valid UTF-8 (byte {exc.start}: "
                f"0x{raw[exc.start]:02x}); no reply",
                file=sys.stderr,
                flush=True,
            )
            yield None


def read_lines_interactive():
    """Yield each line typed at the terminal (None when not UTF-8) until Ctrl-D."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    while True:
        try:
            line = input("you> ")
            line.encode("utf-8")  # bytes that are not UTF-8 arrive as lone surrogates
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /quit leaves)")
            continue
        except (UnicodeDecodeError, UnicodeEncodeError):
            print("error: that line is not valid UTF-8; no reply", file=sys.stderr)
            yield None
            continue
        yield line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Chat with a trained model (type /help in the chat for its commands).",
        epilog='Piped: echo "Hello" | python chat.py  prints one reply per input line.',
    )
    add_loading_args(parser)
    add_sampling_args(parser, CHAT_DEFAULTS)
    parser.add_argument("--max-tokens", type=int, default=CHAT_DEFAULTS.max_new_tokens,
                        help=f"longest reply (default {CHAT_DEFAULTS.max_new_tokens})")
    args = parser.parse_args(argv)
    settings = settings_from_args(args, args.max_tokens, max_tokens_flag="--max-tokens")

    interactive = sys.stdin.isatty()
    model, tokenizer, info = load_model_from_args(args, prefer_finetuned=True)
    session = ChatSession(model, tokenizer, settings, seed=args.seed)
    # Stdout carries only replies when piped; everything else goes to stderr then.
    talk = sys.stdout if interactive else sys.stderr

    def notice(message: str) -> None:
        print(f"({message})", file=sys.stderr, flush=True)

    if interactive:
        print(
            f"Chatting with {info['run_dir']} (step {info['step']}, "
            f"{model.num_params() / 1e6:.1f}M parameters, context {session.context_length} "
            f"tokens). /help for commands, Ctrl-D to leave."
        )

    label = "bot> " if interactive else ""
    pending_label = False  # the label is shown with the first piece, after any notice

    def show(piece: str) -> None:
        nonlocal pending_label
        if pending_label:
            sys.stdout.write(label)
            pending_label = False
        piece = printable(piece)  # also drops "\r"
        if not interactive:  # one line per reply, whatever the model says
            piece = piece.replace("\n", " ")
        sys.stdout.write(piece)
        sys.stdout.flush()

    failed = 0
    lines = read_lines_interactive() if interactive else read_lines_piped()
    for line in lines:
        if line is None:
            failed += 1
            continue
        if not line.strip():
            continue  # an empty line is not a message
        try:
            command = parse_command(line, session.settings)
        except CommandError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            failed += 1
            continue
        if command is not None:
            if command.action == "quit":
                break
            if command.action == "reset":
                session.reset()
            if command.action == "set":
                session.settings = command.settings
            if command.message:
                print(command.message, file=talk, flush=True)
            continue
        pending_label = True
        try:
            ending = session.reply(message_text(line), on_text=show, notice=notice).finish_reason
        except KeyboardInterrupt:  # Ctrl-C before the reply began: no reply, the chat goes on
            ending = "interrupted"
        show("")  # the label, if the reply was empty
        sys.stdout.write("\n")
        sys.stdout.flush()
        if ending == "interrupted":
            notice("reply stopped")
        elif ending == "context":
            notice("the reply reached the end of the context; /reset starts afresh")
    return 1 if failed and not interactive else 0


if __name__ == "__main__":
    run_cli(main)
