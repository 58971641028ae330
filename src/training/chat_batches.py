"""Conversations -> masked, padded training batches for chat fine-tuning.

Each conversation is rendered by the chat template (``encode_chat``: ids, and the mask of
the tokens the assistant says plus the token ending each of its turns). An *example* is a
conversation's ids with that mask; a conversation longer than the model's context is cut
into consecutive pieces of ``context_length + 1`` tokens overlapping by one, so every target
is in exactly one piece (a later piece then starts without the conversation's beginning).

Isolation: a row of a batch holds one example, right-padded. Attention is causal, so a real
token never sees the padding after it, and no row sees another: one conversation never
attends to another. The loss mask is False on padding and on everything but the assistant's
tokens, so only those reach the loss (src/training/batches.scored_targets).

Batches: a micro-batch holds as many examples as fit ``tokens_per_micro_batch`` positions
once padded to its longest. To keep padding low, each epoch shuffles the examples (seed,
epoch), sorts each run of GROUP consecutive examples by length, cuts them into micro-batches,
and shuffles the micro-batches. The order is a pure function of (seed, epoch), so the
source's whole state is the number of micro-batches consumed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from src.tokenizer.chat_template import Turn, encode_chat
from src.training.batches import IGNORE_INDEX, MicroBatch, scored_targets
from src.utils.cli import UserError

GROUP = 512  # examples sorted by length together: lower padding, order still well mixed

Example = tuple[np.ndarray, np.ndarray]  # (ids int64, assistant mask bool), same length


def encode_examples(tokenizer: Any, conversations: list[list[Turn]],
                    context_length: int) -> list[Example]:
    """The training examples of ``conversations`` (see the module docstring); pieces with no
    assistant target are dropped, as they would teach nothing."""
    examples = []
    for turns in conversations:
        ids, mask = encode_chat(tokenizer, turns)
        ids_a, mask_a = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)
        for start in range(0, max(1, len(ids) - 1), context_length):
            piece = slice(start, start + context_length + 1)
            if mask_a[piece][1:].any():
                examples.append((ids_a[piece], mask_a[piece]))
    return examples


def pad_batch(examples: list[Example]) -> MicroBatch:
    """``(inputs, targets, loss mask)`` of examples, right-padded to the longest; the mask is
    True exactly on the targets the assistant says."""
    width = max(len(ids) for ids, _ in examples) - 1
    x = torch.zeros(len(examples), width, dtype=torch.long)
    y = torch.zeros(len(examples), width, dtype=torch.long)
    m = torch.zeros(len(examples), width, dtype=torch.bool)
    for row, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        x[row, :n] = torch.from_numpy(ids[:-1])
        y[row, :n] = torch.from_numpy(ids[1:])
        m[row, :n] = torch.from_numpy(mask[1:])
    return x, y, m


def group_by_length(indices: np.ndarray, lengths: np.ndarray, tokens: int) -> list[list[int]]:
    """Cut ``indices`` (in the given order, longest first works best) into micro-batches of at
    most ``tokens`` positions once padded to their longest member."""
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in indices:
        length = int(lengths[i])
        if current and max(width, length) * (len(current) + 1) > tokens:
            batches.append(current)
            current, width = [], 0
        current.append(int(i))
        width = max(width, length)
    if current:
        batches.append(current)
    return batches


class ChatBatches:
    """The fine-tuning :class:`~src.training.batches.BatchSource`: each optimiser step takes
    ``grad_accum`` micro-batches per process (rank r the r-th share), each a padded
    ``(inputs, targets, loss mask)`` of at most ``tokens_per_micro_batch`` positions.
    ``tokens_per_step`` is that capacity over the step (real tokens are fewer: the rest is
    padding, see :meth:`fill`)."""

    def __init__(self, examples: list[Example], tokens_per_micro_batch: int, grad_accum: int = 1,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not examples:
            raise UserError("no training examples (no conversation has an assistant turn)")
        self.examples = examples
        self.lengths = np.array([len(ids) - 1 for ids, _ in examples])  # input positions
        self.tokens_per_micro_batch = tokens_per_micro_batch
        self.grad_accum, self.seed = grad_accum, seed
        self.rank, self.world_size = rank, world_size
        self.micro_index = 0  # micro-batches consumed by all processes together
        self._plans: list[list[list[int]]] = []  # micro-batches of epoch 0, 1, ...

    @property
    def tokens_per_step(self) -> int:
        return self.tokens_per_micro_batch * self.grad_accum * self.world_size

    @property
    def epoch(self) -> float:
        return self.micro_index / len(self._plan(0))

    @property
    def steps_per_epoch(self) -> float:
        """Optimiser steps in a pass over the examples (of the first epoch's plan)."""
        return len(self._plan(0)) / (self.grad_accum * self.world_size)

    def _plan(self, epoch: int) -> list[list[int]]:
        while len(self._plans) <= epoch:
            rng = np.random.default_rng([self.seed, len(self._plans)])
            order = rng.permutation(len(self.examples))
            batches: list[list[int]] = []
            for start in range(0, len(order), GROUP):
                group = order[start:start + GROUP]
                group = group[np.argsort(-self.lengths[group], kind="stable")]
                batches.extend(group_by_length(group, self.lengths, self.tokens_per_micro_batch))
            self._plans.append([batches[i] for i in rng.permutation(len(batches))])
        return self._plans[epoch]

    def _micro_batch(self, index: int) -> list[int]:
        epoch = 0
        while index >= len(self._plan(epoch)):
            index -= len(self._plan(epoch))
            epoch += 1
        return self._plan(epoch)[index]

    def fill(self) -> float:
        """Share of the padded positions of an epoch that are real tokens."""
        plan = self._plan(0)
        real = sum(int(self.lengths[b].sum()) for b in plan)
        return real / sum(len(b) * int(self.lengths[b].max()) for b in plan)

    def next_batch(self) -> list[MicroBatch]:
        first = self.micro_index + self.rank * self.grad_accum
        micro = [pad_batch([self.examples[i] for i in self._micro_batch(first + k)])
                 for k in range(self.grad_accum)]
        self.micro_index += self.grad_accum * self.world_size
        return micro

    def state_dict(self) -> dict[str, int]:
        return {"micro_index": self.micro_index, "seed": self.seed,
                "examples": len(self.examples)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("examples", len(self.examples)) != len(self.examples):
            raise UserError("the fine-tuning data changed since this checkpoint was written "
                            f"({state['examples']} examples then, {len(self.examples)} now)")
        self.seed, self.micro_index = int(state["seed"]), int(state["micro_index"])
        self._plans = []


def chat_validation(model: torch.nn.Module, examples: list[Example], tokens_per_batch: int,
                    device: torch.device, amp_dtype: torch.dtype | None
                    ) -> Callable[[], dict[str, float]]:
    """The loop's evaluation for fine-tuning: mean loss (and perplexity) over the assistant's
    tokens of ``examples``, each conversation on its own as in training."""
    lengths = np.array([len(ids) - 1 for ids, _ in examples])
    batches = group_by_length(np.argsort(-lengths, kind="stable"), lengths, tokens_per_batch)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        was_training = model.training
        model.eval()
        nll, count = 0.0, 0
        try:
            for batch in batches:
                padded = pad_batch([examples[i] for i in batch])
                x, y = (t.to(device) for t in scored_targets(padded))
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    _, loss = model(x, y)
                n = int((y != IGNORE_INDEX).sum())
                nll += float(loss) * n
                count += n
        finally:
            model.train(was_training)
        loss = nll / count
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}

    return evaluate
