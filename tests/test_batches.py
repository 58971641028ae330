"""Training batches: deterministic order, epochs without repeats, rank shards, exact restarts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from src.training.batches import BatchLoader, open_tokens, read_meta
from src.utils.cli import UserError

T = 8


def tokens(n: int = 1000) -> np.ndarray:
    return (np.arange(n) % 65521).astype(np.uint16)  # token value == position: easy to check


def test_inputs_and_targets_are_shifted_windows():
    data = tokens()
    (x, y), = BatchLoader(data, T, batch_size=4, seed=0).next_batch()
    assert x.shape == y.shape == (4, T) and x.dtype == torch.int64
    for row_x, row_y in zip(x, y):
        start = int(row_x[0])
        assert row_x.tolist() == list(range(start, start + T))
        assert row_y.tolist() == list(range(start + 1, start + T + 1))


def test_order_is_deterministic_and_seeded():
    def first_batches(seed):
        loader = BatchLoader(tokens(), T, batch_size=4, seed=seed)
        return [torch.cat([x for x, _ in loader.next_batch()]) for _ in range(3)]

    a, b, c = first_batches(1), first_batches(1), first_batches(2)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


def test_each_window_once_per_epoch_and_phase_changes():
    loader = BatchLoader(tokens(), T, batch_size=1, seed=3)
    n = loader.windows_per_epoch
    assert n == (1000 - T) // T
    epoch0 = loader.window_starts(0, n)
    epoch1 = loader.window_starts(n, n)
    for starts in (epoch0, epoch1):
        phase = starts.min() % T
        assert sorted(starts.tolist()) == [phase + k * T for k in range(n)]  # a permutation
        assert starts.max() + T + 1 <= 1000  # every window fits, target included
    assert epoch0.tolist() != epoch1.tolist()


def test_ranks_split_the_global_batch_like_one_process():
    single = BatchLoader(tokens(), T, batch_size=4, grad_accum=1, seed=5)
    ranks = [BatchLoader(tokens(), T, batch_size=1, grad_accum=2, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        (x_single, _), = single.next_batch()
        x_ranks = torch.cat([x for loader in ranks for x, _ in loader.next_batch()])
        assert torch.equal(x_single, x_ranks)
    assert single.sample_index == ranks[0].sample_index == ranks[1].sample_index == 12
    # No two ranks read the same window in a step.
    a = BatchLoader(tokens(), T, batch_size=2, seed=5, rank=0, world_size=2).next_batch()[0][0]
    b = BatchLoader(tokens(), T, batch_size=2, seed=5, rank=1, world_size=2).next_batch()[0][0]
    assert not set(a[:, 0].tolist()) & set(b[:, 0].tolist())


def test_state_round_trip_continues_exactly():
    loader = BatchLoader(tokens(), T, batch_size=3, grad_accum=2, seed=7)
    for _ in range(200):  # several epochs
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # as stored in state.json
    expected = loader.next_batch()
    fresh = BatchLoader(tokens(), T, batch_size=3, grad_accum=2, seed=7)
    fresh.load_state_dict(state)
    got = fresh.next_batch()
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, got))
    other_data = BatchLoader(tokens(500), T, batch_size=3, seed=7)
    with pytest.raises(UserError, match="changed"):
        other_data.load_state_dict(state)


def test_too_little_data_is_a_clear_error():
    with pytest.raises(UserError, match="too few for context length"):
        BatchLoader(tokens(10), T, batch_size=1)


def test_token_files(tmp_path):
    with pytest.raises(UserError, match="prepare_data.py"):
        read_meta(tmp_path)
    meta = {"tokenizer_hash": "h", "dtype": "uint16", "splits": {"train": {"tokens": 100}}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "train.bin")
    arr = open_tokens(tmp_path, "train")
    assert isinstance(arr, np.memmap) and arr.dtype == np.uint16 and arr[99] == 99
    with pytest.raises(UserError, match="missing"):
        open_tokens(tmp_path, "val")
    (tmp_path / "train.bin").write_bytes(b"\x00" * 201)  # odd byte count: truncated
    with pytest.raises(UserError, match="whole number"):
        open_tokens(tmp_path, "train")
    (tmp_path / "train.bin").write_bytes(b"\x00" * 100)  # 50 tokens, meta says 100
    with pytest.raises(UserError, match="meta.json says 100"):
        open_tokens(tmp_path, "train")
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_meta(tmp_path)


def test_raw_releases_folder_gets_advice_to_prepare_elsewhere(tmp_path):
    # `train.py --data ../shared/data` (the raw releases): never advise writing into that folder.
    releases = tmp_path / "releases"
    (releases / "wikitext-2").mkdir(parents=True)
    (releases / "wikitext-2" / "wiki.train.tokens").write_text(" = A = \n", encoding="utf-8")
    with pytest.raises(UserError) as exc:
        read_meta(releases)
    message = str(exc.value)
    assert f"--data-dir {releases} --out data`" in message and f"--out {releases}" not in message
    # An empty or missing folder is where the prepared data can go.
    with pytest.raises(UserError, match=f"--out {tmp_path / 'new'}`"):
        read_meta(tmp_path / "new")
