"""Sliding-window negative log-likelihood: the one scoring routine for evaluation and training.

A language model with a context of C tokens cannot see a whole split at once. Cutting the
split into disjoint C-token chunks would score the first token of every chunk with no
context at all, which inflates perplexity. Instead we slide a C-token window over the
stream by ``stride`` tokens and score only the targets the previous window did not score::

    tokens   t0 t1 t2 t3 t4 t5 t6 t7 t8 t9        C = 4, stride = 2
    window 1 [t0 t1 t2 t3]          -> scores t1 t2 t3 t4  (the first window scores all)
    window 2       [t2 t3 t4 t5]    -> scores t5 t6        (each later window: its last
    window 3             [t4 t5 t6 t7] -> scores t7 t8      ``stride`` targets)
    window 4                [t5 t6 t7 t8] -> scores t9     (the last window is aligned to
                                                            the end so it has full context)

So every token after the first is scored exactly once, each with at least
``context_length - stride + 1`` tokens of real context (except those of the first window,
which have all the context there is). ``stride == context_length`` gives disjoint chunks
(fast, pessimistic); ``stride == 1`` gives every token the full context (slow, best).
All windows but a lone first one have exactly ``context_length`` tokens, so they batch
without padding.

The model is any ``torch.nn.Module`` whose ``model(idx)`` maps a LongTensor (B, T) to
logits (B, T, vocab) causally (position t sees positions <= t); src/model/gpt.GPT is one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


def sliding_windows(num_tokens: int, context_length: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """The windows that score a stream of ``num_tokens`` tokens, as ``(start, end, first)``.

    The window's input is ``tokens[start:end]`` (at most ``context_length`` ids) and its
    targets are ``tokens[start + 1:end + 1]``; the targets at stream positions
    ``first .. end`` (inclusive) are the ones it scores. Over all windows these ranges
    tile ``1 .. num_tokens - 1`` exactly once, in order.
    """
    if context_length < 1:
        raise ValueError(f"context_length must be >= 1, got {context_length}")
    if not 1 <= stride <= context_length:
        raise ValueError(f"stride must be between 1 and context_length={context_length}, got {stride}")
    next_target = 1  # stream position of the first target not scored yet
    while next_target < num_tokens:
        # The first window scores a whole context's worth of targets, later ones `stride`.
        step = context_length if next_target == 1 else stride
        target_end = min(next_target + step, num_tokens)  # exclusive
        start = max(0, target_end - 1 - context_length)
        yield start, target_end - 1, next_target
        next_target = target_end


def sliding_window_nll(
    model: torch.nn.Module,
    tokens: np.ndarray,
    context_length: int,
    stride: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    loss_mask: np.ndarray | None = None,
    *,
    show_progress: bool | str = False,
) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of ``tokens`` under ``model``, and how many tokens it covers.

    Args:
        model: ``model(idx)`` -> logits (B, T, vocab), causal. It is put in eval mode for the
            call and its previous mode is restored afterwards (training calls this mid-run).
        tokens: 1-D array of token ids (any integer dtype; a np.memmap is read lazily).
        context_length: the longest window fed to the model (usually the model's context).
        stride: how far the window moves; 1 <= stride <= context_length.
        batch_size: windows per forward pass.
        device: where the model lives; windows are moved there.
        autocast_dtype: e.g. ``torch.bfloat16`` to run the forward pass under autocast;
            the log-softmax is always computed in float32 and summed in float64.
        loss_mask: optional boolean array aligned with ``tokens``: ``loss_mask[p]`` says
            whether token ``p`` counts as a target (``loss_mask[0]`` is never used, since
            the first token is never predicted). Masked-out tokens still serve as context.
        show_progress: a tqdm bar over batches (a string is used as its description).

    Returns:
        ``(total_nll, num_scored)``: the sum over scored tokens of -ln p(token | context),
        and the number of scored tokens (``len(tokens) - 1`` without a mask). Mean loss
        is ``total_nll / num_scored``; perplexity is ``exp`` of that.
    """
    if loss_mask is not None:
        loss_mask = np.asarray(loss_mask, dtype=bool)
        if loss_mask.shape != (len(tokens),):
            raise ValueError(f"loss_mask must have shape ({len(tokens)},) like tokens, got {loss_mask.shape}")
    nll = sliding_window_token_nll(
        model, tokens, context_length, stride, batch_size, device, autocast_dtype, show_progress=show_progress
    )
    if loss_mask is not None:
        nll = nll[loss_mask[1:]]
    return float(nll.sum()), int(nll.size)


def sliding_window_token_nll(
    model: torch.nn.Module,
    tokens: np.ndarray,
    context_length: int,
    stride: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    *,
    show_progress: bool | str = False,
) -> np.ndarray:
    """Per-token NLL (nats, float64) of ``tokens[1:]``: element ``p - 1`` is -ln p(tokens[p] | context).

    The same scoring as :func:`sliding_window_nll` (see it for the arguments), kept per
    token so one pass can be summed under several masks (e.g. all chat turns, and the
    assistant's turns only).
    """
    if not isinstance(tokens, np.memmap):
        tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    windows = list(sliding_windows(len(tokens), context_length, stride))
    out = np.zeros(max(len(tokens) - 1, 0), dtype=np.float64)

    device = torch.device(device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else nullcontext()
    )
    batches = range(0, len(windows), batch_size)
    if show_progress:
        from tqdm.auto import tqdm

        desc = show_progress if isinstance(show_progress, str) else "evaluating"
        batches = tqdm(batches, desc=desc, unit="batch", dynamic_ncols=True)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for b in batches:
                _score_batch(model, tokens, windows[b : b + batch_size], device, autocast, out)
    finally:
        model.train(was_training)
    return out


def _score_batch(model, tokens, windows, device, autocast, out: np.ndarray) -> None:
    """One forward pass over a few windows; writes their scored targets' NLL into ``out``."""
    length = max(end - start for start, end, _ in windows)
    inputs = np.zeros((len(windows), length), dtype=np.int64)
    targets = np.zeros((len(windows), length), dtype=np.int64)
    for row, (start, end, _) in enumerate(windows):
        inputs[row, : end - start] = tokens[start:end]
        targets[row, : end - start] = tokens[start + 1 : end + 1]
    # Right padding is harmless: a causal model's earlier positions never see it.
    # Window position i predicts stream position start + i + 1; only the positions from
    # the earliest scored one onward need a log-softmax.
    skip = min(first - start - 1 for start, _, first in windows)
    with autocast:
        logits = model(torch.from_numpy(inputs).to(device))
    logits = logits[:, skip:].float()
    nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        torch.from_numpy(targets[:, skip:]).to(device).reshape(-1),
        reduction="none",
    )
    # float64 from here on: a split has ~10^5-10^6 terms and float32 sums drift.
    nll = nll.view(len(windows), -1).double().cpu().numpy()
    for row, (start, end, first) in enumerate(windows):
        out[first - 1 : end] = nll[row, first - start - 1 - skip : end - start - skip]


def perplexity(total_nll: float, count: int) -> float:
    """exp(total_nll / count): per-token perplexity for a token count, word-level for a word count."""
    if count <= 0:
        raise ValueError(f"cannot compute a perplexity over {count} units")
    return math.exp(total_nll / count)


def bits_per_byte(total_nll: float, num_bytes: int) -> float:
    """Total NLL (nats) converted to bits, per UTF-8 byte of the text: tokenizer-independent."""
    if num_bytes <= 0:
        raise ValueError(f"cannot compute bits per byte over {num_bytes} bytes")
    return total_nll / LN2 / num_bytes


def nll_summary(total_nll: float, num_tokens: int, num_bytes: int) -> dict[str, Any]:
    """The figures every evaluation reports for a total NLL: ``total_nll``, ``num_tokens``,
    ``loss`` (nats/token), ``token_perplexity``, ``num_bytes``, ``bits_per_byte``
    (None where the count is zero)."""
    return {
        "total_nll": total_nll,
        "num_tokens": num_tokens,
        "loss": total_nll / num_tokens if num_tokens else None,
        "token_perplexity": perplexity(total_nll, num_tokens) if num_tokens else None,
        "num_bytes": num_bytes,
        "bits_per_byte": bits_per_byte(total_nll, num_bytes) if num_bytes else None,
    }


def text_bytes(tokenizer: Any, ids: Iterable[int]) -> int:
    """UTF-8 bytes of the text that ``ids`` spell, special tokens not counted.

    For bits per byte of (part of) a token stream. Exact when the text was encoded in
    pieces that tokens do not straddle (articles, chat turns), as all our streams are.
    """
    specials = set(tokenizer.special_tokens.values())
    return len(tokenizer.decode_bytes([int(i) for i in ids if int(i) not in specials]))
