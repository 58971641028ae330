"""DailyDialog evaluation: loss and perplexity on all turns and on the assistant's turns only.

Each dialogue becomes a document exactly as data preparation builds it: its utterances
(detokenised or not, as the run was trained) as alternating user / assistant turns in the
project's one chat template (src/tokenizer/chat_template.encode_chat), ending in
``<|endoftext|>``. The dialogues follow each other in one stream behind a leading
``<|endoftext|>``, and one sliding-window pass scores every token once; the two figures are
two sums over that pass:

* all turns: every token (role tokens and the final ``<|endoftext|>`` included): the
  model's loss on the corpus, as training sees it;
* assistant turns: the tokens the assistant says and the token ending its turn (the mask of
  ``encode_chat``): what a chat model is judged on, since the user's lines are given.

Perplexities here are per token of this project's tokenizer; bits per byte (over the UTF-8
bytes of the utterances in question, role tokens not counted) compares across tokenizers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from src.data.detokenize import detokenize_dailydialog
from src.eval.perplexity import nll_summary, sliding_window_token_nll, text_bytes
from src.tokenizer.chat_template import alternate_turns, encode_chat
from src.utils.cli import UserError


def dialog_stream(
    dialogues: list[list[str]], tokenizer: Any, *, detokenize: bool, max_tokens: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, assistant_mask)`` of the dialogues as one stream.

    ``ids`` starts with ``<|endoftext|>`` then each dialogue's ``encode_chat`` ids;
    ``assistant_mask[p]`` is True where token ``p`` belongs to an assistant turn.
    With ``max_tokens``, encoding stops once the stream is longer than that.
    """
    ids: list[int] = [tokenizer.eot_id]
    mask: list[bool] = [False]
    for utterances in dialogues:
        if max_tokens is not None and len(ids) > max_tokens:
            break
        if detokenize:
            utterances = [detokenize_dailydialog(u) for u in utterances]
        turn_ids, turn_mask = encode_chat(tokenizer, alternate_turns(utterances))
        ids.extend(turn_ids)
        mask.extend(turn_mask)
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)


def _summary(nll: np.ndarray, tokenizer: Any, targets: np.ndarray) -> dict[str, Any]:
    return nll_summary(float(nll.sum()), int(nll.size), text_bytes(tokenizer, targets))


def evaluate_dailydialog(
    model: torch.nn.Module,
    tokenizer: Any,
    dialogues: list[list[str]],
    *,
    detokenize: bool,
    context_length: int,
    stride: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    max_tokens: int | None = None,
    show_progress: bool | str = False,
) -> dict[str, Any]:
    """Score DailyDialog dialogues; returns the JSON entry of ``evaluate.py``:
    ``{"all_turns": {...}, "assistant_turns": {...}, "dialogues", "stride", ...}``, each
    part with ``total_nll``, ``num_tokens``, ``loss``, ``token_perplexity``, ``num_bytes``,
    ``bits_per_byte``. ``max_tokens`` scores only the first N tokens (``truncated``)."""
    if not dialogues:
        raise UserError("DailyDialog: no dialogues to evaluate")
    ids, mask = dialog_stream(dialogues, tokenizer, detokenize=detokenize, max_tokens=max_tokens)
    truncated = max_tokens is not None and max_tokens < len(ids) - 1
    if truncated:
        ids, mask = ids[: max_tokens + 1], mask[: max_tokens + 1]
    nll = sliding_window_token_nll(
        model, ids, context_length, stride, batch_size, device, autocast_dtype, show_progress=show_progress
    )
    return {
        "all_turns": _summary(nll, tokenizer, ids[1:]),
        "assistant_turns": _summary(nll[mask[1:]], tokenizer, ids[1:][mask[1:]]),
        "dialogues": len(dialogues),
        "stride": stride,
        "context_length": context_length,
        "detokenized": detokenize,
        "truncated": truncated,
    }
