"""Conversations for chat fine-tuning: DailyDialog dialogues and the user's own JSONL file,
both as lists of chat-template turns (src/tokenizer/chat_template.py).

The user's file has one conversation per line, in the common messages form::

    {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]}

Rules, each broken one reported as ``FILE:LINE: what is wrong`` (a UserError, exit 2):
roles are those of the chat template (``ROLE_TOKENS``: user and assistant, and system only
when the template has a token for it, then only as the first message); after it the turns
alternate user, assistant, user, ... starting with the user; every content is a non-empty
string; each conversation has at least one assistant message (the only text scored). Blank
lines are skipped; a file with no conversation at all is an error too.
"""

from __future__ import annotations

import json
from pathlib import Path

from src.data.detokenize import detokenize_dailydialog
from src.data.sources import check_text_file, iter_lines
from src.tokenizer.chat_template import ROLE_TOKENS, Turn, alternate_turns
from src.utils.cli import UserError

SPEAKERS = ("second", "both")  # which DailyDialog speakers play the assistant


def dailydialog_conversations(
    dialogues: list[list[str]], *, detokenize: bool, speakers: str = "second"
) -> list[list[Turn]]:
    """DailyDialog dialogues as conversations. ``speakers="second"``: the second speaker is the
    assistant (as in data preparation and evaluation); ``"both"``: each dialogue a second time
    with the roles swapped, starting at its second utterance so that it still opens with the
    user (a dialogue of two utterances has nothing left to swap)."""
    if speakers not in SPEAKERS:
        raise UserError(f"speakers must be one of {', '.join(SPEAKERS)}, got {speakers!r}")
    out: list[list[Turn]] = []
    for utterances in dialogues:
        if detokenize:
            utterances = [detokenize_dailydialog(u) for u in utterances]
        out.append(alternate_turns(utterances))
        if speakers == "both" and len(utterances) > 2:
            out.append(alternate_turns(utterances[1:]))
    return out


def _turns_of(record: object, where: str) -> list[Turn]:
    """The turns of one JSONL record, or a UserError saying what is wrong with it."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise UserError(f"{where}: expected an object with a \"messages\" list")
    messages = record["messages"]
    if not messages:
        raise UserError(f"{where}: \"messages\" is empty")
    turns: list[Turn] = []
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise UserError(f"{where}: message {i} is not an object with \"role\" and \"content\"")
        role, content = message.get("role"), message.get("content")
        if role not in ROLE_TOKENS:
            raise UserError(f"{where}: message {i} has unknown role {role!r} "
                            f"(expected one of {', '.join(sorted(ROLE_TOKENS))})")
        if not isinstance(content, str) or not content.strip():
            raise UserError(f"{where}: message {i} ({role}) has empty or missing text \"content\"")
        if role == "system" and i != 1:
            raise UserError(f"{where}: message {i} is a system message; only the first may be")
        expected = "user" if not turns or turns[-1].role != "user" else "assistant"
        if role != "system" and role != expected:
            raise UserError(f"{where}: message {i} is {role!r} but {expected!r} was expected "
                            "(turns must alternate user, assistant, ... starting with the user)")
        turns.append(Turn(role, content))
    if not any(t.role == "assistant" for t in turns):
        raise UserError(f"{where}: no assistant message (nothing to learn from)")
    return turns


def read_chat_jsonl(path: str | Path) -> list[list[Turn]]:
    """Every conversation of a JSONL file of ``{"messages": [{"role", "content"}, ...]}``
    lines, validated as the module docstring says."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a JSONL file of conversations")
    check_text_file(path)  # exists, not empty, UTF-8
    conversations = []
    for number, line in enumerate(iter_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
        conversations.append(_turns_of(record, where))
    if not conversations:
        raise UserError(f"{path}: no conversations in it (one JSON object per line expected)")
    return conversations
