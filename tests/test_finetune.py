"""Chat fine-tuning: conversations, masked batches, the stage end to end, resume, bad input."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from src import checkpoint as reader
from src.data.conversations import dailydialog_conversations, read_chat_jsonl
from src.tokenizer.bpe import BPETokenizer
from src.tokenizer.chat_template import ROLE_TOKENS, Turn, encode_chat
from src.training.batches import scored_targets
from src.training.chat_batches import ChatBatches, encode_examples
from src.utils.cli import UserError
from tests.fixtures import make_tiny_run, tiny_corpus

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py
REPO = Path(__file__).resolve().parents[1]
QUIET = ["--device", "cpu", "--dtype", "fp32", "--no-progress", "--no-plot", "--no-tensorboard",
         "--batch-size", "4", "--tokens-per-step", "256", "--eval-interval", "3",
         "--warmup-steps", "1", "--sample-tokens", "0"]


def write_dailydialog(root: Path, seed: int = 0) -> Path:
    """A tiny DailyDialog release (train and validation) of simple English utterances."""
    rng = random.Random(seed)
    sentences = [s.strip() + "." for doc in tiny_corpus(60, seed)
                 for s in doc.split(".") if s.strip()]
    for split, n in (("train", 60), ("validation", 12)):
        folder = root / "dailydialog" / split
        folder.mkdir(parents=True)
        lines = [" __eou__ ".join(rng.sample(sentences, rng.randint(2, 7))) + " __eou__"
                 for _ in range(n)]
        (folder / f"dialogues_{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny pretrained run in <root>/runs/base and a tiny DailyDialog release in <root>/dd."""
    root = tmp_path_factory.mktemp("ft")
    run = make_tiny_run(root, steps=4, sample_tokens=0)
    (root / "runs").mkdir()
    shutil.move(run, root / "runs" / "base")
    return root, root / "runs" / "base", write_dailydialog(root / "dd")


@pytest.fixture(scope="module")
def tokenizer(setup):
    return BPETokenizer.load(setup[1] / "tokenizer.json")


def run_finetune(root: Path, *args: str) -> dict:
    """``python finetune.py ARGS`` (quiet, tiny settings) run in ``root``; its summary."""
    from src.training.finetune import finetune, parse_args

    cwd = Path.cwd()
    os.chdir(root)
    try:
        stage, explicit = parse_args([*QUIET, *args])
        return finetune(stage, explicit)
    finally:
        os.chdir(cwd)


# ---------------------------------------------------------------------------------------------
# Conversations


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records),
                    encoding="utf-8")
    return path


def msgs(*pairs: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


def test_jsonl_conversations_are_read_as_turns(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        msgs(("user", "Hi"), ("assistant", "Hello.")), "",
        msgs(("user", "a"), ("assistant", "b"), ("user", "c"))])
    assert read_chat_jsonl(path) == [
        [Turn("user", "Hi"), Turn("assistant", "Hello.")],
        [Turn("user", "a"), Turn("assistant", "b"), Turn("user", "c")],
    ]


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "bot", "content": "x"}]}', "message 1 has unknown role 'bot'"),
    (json.dumps(msgs(("user", "hi"), ("assistant", "  "))), "message 2 (assistant) has empty"),
    (json.dumps(msgs(("user", "hi"), ("user", "again"), ("assistant", "x"))),
     "message 2 is 'user' but 'assistant' was expected"),
    (json.dumps(msgs(("assistant", "I start"), ("user", "x"))),
     "message 1 is 'assistant' but 'user' was expected"),
    (json.dumps(msgs(("user", "only me"))), "no assistant message"),
    ('{"messages": [}', "not valid JSON"),
    ('{"text": "plain"}', 'expected an object with a "messages" list'),
    ('{"messages": []}', '"messages" is empty'),
])
def test_bad_jsonl_lines_name_the_line_and_the_problem(tmp_path, line, message):
    good = json.dumps(msgs(("user", "Hi"), ("assistant", "Hello.")))
    path = write_jsonl(tmp_path / "c.jsonl", [good, line])
    with pytest.raises(UserError, match=rf"c\.jsonl:2: {_re(message)}"):
        read_chat_jsonl(path)


def _re(text: str) -> str:
    import re

    return re.escape(text)


def test_system_role_only_if_the_template_has_it(tmp_path):
    first = msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."))
    later = msgs(("user", "Hi"), ("system", "Be brief."), ("assistant", "Hello."))
    if "system" in ROLE_TOKENS:
        assert read_chat_jsonl(write_jsonl(tmp_path / "a.jsonl", [first]))[0][0].role == "system"
        with pytest.raises(UserError, match="only the first may be"):
            read_chat_jsonl(write_jsonl(tmp_path / "b.jsonl", [later]))
    else:
        with pytest.raises(UserError, match=":1: message 1 has unknown role 'system'"):
            read_chat_jsonl(write_jsonl(tmp_path / "a.jsonl", [first]))


def test_empty_or_missing_jsonl_is_an_error(tmp_path):
    with pytest.raises(UserError, match="file is empty"):
        read_chat_jsonl(write_jsonl(tmp_path / "e.jsonl", []))
    with pytest.raises(UserError, match="no conversations"):
        read_chat_jsonl(write_jsonl(tmp_path / "blank.jsonl", ["", "  "]))
    with pytest.raises(UserError, match="file not found"):
        read_chat_jsonl(tmp_path / "missing.jsonl")


def test_dailydialog_with_either_speaker_as_the_assistant():
    dialogue = ["A1", "B1", "A2", "B2"]
    assert dailydialog_conversations([dialogue], detokenize=False) == [
        [Turn("user", "A1"), Turn("assistant", "B1"), Turn("user", "A2"), Turn("assistant", "B2")]]
    both = dailydialog_conversations([dialogue, ["x", "y"]], detokenize=False, speakers="both")
    # The swapped copy starts at B1 so that it still opens with the user; A2 is the assistant.
    assert both[1] == [Turn("user", "B1"), Turn("assistant", "A2"), Turn("user", "B2")]
    assert len(both) == 3  # a two-utterance dialogue has no swapped copy


# ---------------------------------------------------------------------------------------------
# Batches


def conversations(n: int, seed: int = 0) -> list[list[Turn]]:
    rng = random.Random(seed)
    words = ["hello", "the cat", "a dog", "sees", "the river", "today", "why?", "yes."]
    return [[Turn("user" if i % 2 == 0 else "assistant",
                  " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))))
             for i in range(rng.randint(2, 8))] for _ in range(n)]


def test_a_batch_scores_exactly_the_assistant_tokens_of_one_conversation_per_row(tokenizer):
    convs = conversations(40)
    encoded = {tuple(ids): mask for ids, mask in (encode_chat(tokenizer, c) for c in convs)}
    assert max(len(ids) for ids in encoded) <= 513  # no conversation is cut here
    examples = encode_examples(tokenizer, convs, context_length=512)
    batches = ChatBatches(examples, tokens_per_micro_batch=4 * 512, grad_accum=2, seed=3)
    seen = 0
    for _ in range(4):
        for batch in batches.next_batch():
            x, y, mask = batch
            _, targets = scored_targets(batch)
            assert (targets != -1).equal(mask)  # what the model's loss skips
            for row in range(x.shape[0]):
                # The row holds one whole conversation (id 0, byte 0, is not in any text).
                (ids,) = [ids for ids in encoded if len(ids) - 1 <= x.shape[1]
                          and x[row, :len(ids) - 1].tolist() == list(ids[:-1])
                          and y[row, :len(ids) - 1].tolist() == list(ids[1:])
                          and not x[row, len(ids) - 1:].any()]
                length = len(ids) - 1
                # Scored: exactly the assistant's tokens (and the token ending its turn) ...
                assert mask[row, :length].tolist() == list(encoded[ids][1:])
                # ... and never the padding, which holds no other conversation's tokens.
                assert not mask[row, length:].any() and not x[row, length:].any()
                seen += 1
    assert seen > 0


def test_long_conversations_are_cut_so_each_target_is_scored_once(tokenizer):
    long = [Turn("user" if i % 2 == 0 else "assistant", "the cat sees the river " * 6)
            for i in range(10)]
    ids, mask = encode_chat(tokenizer, long)
    examples = encode_examples(tokenizer, [long], context_length=32)
    assert len(ids) > 64 and all(len(e[0]) <= 33 for e in examples)
    # Consecutive pieces overlap by one token, so each scored target is in exactly one piece
    # (pieces with nothing to score, here within a long user turn, are dropped).
    scored = [int(t) for piece, m in examples for t, s in zip(piece[1:], m[1:]) if s]
    assert scored == [t for t, s in zip(ids[1:], mask[1:]) if s] and len(examples) > 2


def test_batch_order_is_deterministic_covers_each_epoch_and_resumes(tokenizer):
    examples = encode_examples(tokenizer, conversations(30), context_length=64)
    make = lambda: ChatBatches(examples, tokens_per_micro_batch=128, grad_accum=1, seed=5)  # noqa: E731
    a = make()
    plan = a._plan(0)
    assert sorted(i for b in plan for i in b) == list(range(len(examples)))  # each once an epoch
    assert all(len(b) * max(len(examples[i][0]) - 1 for i in b) <= 128 for b in plan)
    steps = [a.next_batch() for _ in range(len(plan) + 3)]  # into the second epoch
    b = make()
    for _ in range(4):
        b.next_batch()
    c = make()
    c.load_state_dict(b.state_dict())
    for want in steps[4:]:
        got = c.next_batch()
        assert all(torch.equal(g, w) for gb, wb in zip(got, want) for g, w in zip(gb, wb))
    assert a.epoch > 1
    with pytest.raises(UserError, match="data changed"):
        ChatBatches(examples[:-1], 128).load_state_dict(b.state_dict())


def test_two_processes_take_disjoint_shares_of_a_step(tokenizer):
    examples = encode_examples(tokenizer, conversations(30), context_length=64)
    one = ChatBatches(examples, 128, grad_accum=2, seed=1).next_batch()
    ranks = [ChatBatches(examples, 128, grad_accum=1, seed=1, rank=r, world_size=2).next_batch()
             for r in range(2)]
    assert all(torch.equal(a, b) for mine, ref in zip([ranks[0][0], ranks[1][0]], one)
               for a, b in zip(mine, ref))


# ---------------------------------------------------------------------------------------------
# The stage


def test_finetune_lowers_assistant_loss_and_makes_an_ordinary_run(setup, monkeypatch, capsys):
    from src.training.chat_batches import chat_validation

    root, base, dd = setup
    summary = run_finetune(root, "--data-dir", str(dd), "--max-steps", "6", "--lr", "3e-3",
                           "--run-dir", "runs/sft")
    run = root / "runs" / "sft"
    assert summary["step"] == 6 and summary["base_run"] == Path("runs/base")
    record = json.loads((run / "finetune.json").read_text())
    assert record["base_run"] == "runs/base" and record["data"]["source"] == "dailydialog"
    assert record["data"]["sha256"] and record["examples"]["train"] >= 60
    state = reader.read_state(reader.latest_checkpoint(run))
    assert state["finetune"] == record and state["base_val_loss"] == summary["base_val_loss"]
    assert summary["best_val_loss"] < summary["base_val_loss"]
    assert (run / "config.json").is_file() and (run / "metrics.jsonl").is_file()
    assert (run / "data_meta.json").read_text() == (base / "data_meta.json").read_text()

    # The fine-tuned model scores the validation assistant turns better than its base did.
    tok = BPETokenizer.load(run / "tokenizer.json")
    val = dailydialog_conversations(_dialogues(dd, "validation"), detokenize=True)
    examples = encode_examples(tok, val, 64)
    losses = {}
    for name, path in (("base", base), ("sft", run)):
        model, _, _ = reader.load_model(path)
        evaluate = chat_validation(model, examples, 256, torch.device("cpu"), None)
        losses[name] = evaluate()["val_loss"]
    assert losses["sft"] < losses["base"] - 0.05

    # chat.py without --run picks the fine-tuned run and says so (one line on stderr).
    import chat as chat_cli

    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "stdin", _Piped(b"Hello\n"))
    assert chat_cli.main(["--device", "cpu", "--max-tokens", "8"]) == 0
    err = capsys.readouterr().err
    said = err.splitlines()  # which run, then the warning that so short a run is barely trained
    assert said[0].startswith("loaded fine-tuned run runs/sft") and len(said) == 2, err
    # evaluate.py accepts it like any run.
    import evaluate as eval_cli

    assert eval_cli.main(["--run", "runs/sft", "--data-dir", str(dd), "--tasks", "dailydialog",
                          "--no-progress", "--device", "cpu"]) == 0


def _dialogues(dd: Path, split: str) -> list[list[str]]:
    from src.data.sources import read_dailydialog

    return read_dailydialog(dd, split)


class _Piped:
    def __init__(self, data: bytes):
        self.buffer = io.BytesIO(data)

    def isatty(self):
        return False


def test_resume_continues_bit_exactly(setup, tmp_path):
    root, base, dd = setup
    common = ["--from", str(base), "--data-dir", str(dd), "--max-steps", "6", "--speakers", "both"]
    run_finetune(root, *common, "--run-dir", str(tmp_path / "whole"))
    run_finetune(root, *common, "--run-dir", str(tmp_path / "split"), "--stop-at-step", "3")
    assert reader.read_state(reader.latest_checkpoint(tmp_path / "split"))["step"] == 3
    summary = run_finetune(root, "--run-dir", str(tmp_path / "split"), "--resume")
    assert summary["step"] == 6
    whole = reader.read_weights(reader.latest_checkpoint(tmp_path / "whole"))
    split = reader.read_weights(reader.latest_checkpoint(tmp_path / "split"))
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    with pytest.raises(UserError, match="--speakers second differs"):
        run_finetune(root, "--run-dir", str(tmp_path / "split"), "--resume", "--speakers", "second")


def test_jsonl_data_and_early_stopping(setup, tmp_path):
    root, base, _ = setup
    rng = random.Random(0)
    records = [msgs(("user", f"say {w}"), ("assistant", f"{w} {w}."))
               for w in (rng.choice(["cat", "dog", "bird"]) for _ in range(40))]
    data = write_jsonl(tmp_path / "chats.jsonl", records)
    # A learning rate this high makes validation worse at once: early stopping ends the run.
    summary = run_finetune(root, "--from", str(base), "--data", str(data), "--lr", "0.5",
                           "--max-steps", "30", "--eval-interval", "2", "--patience", "2",
                           "--run-dir", str(tmp_path / "run"))
    assert summary["end_reason"].startswith("early stop") and summary["step"] < 30
    record = json.loads((tmp_path / "run" / "finetune.json").read_text())
    assert record["data"]["path"] == str(data)
    assert record["data"]["validation"] == {"path": str(data), "last_conversations": 4}
    assert record["examples"] == {"train": 36, "validation": 4}


def test_default_base_is_the_newest_pretraining_run_and_train_resume_skips_sft(setup, tmp_path):
    from src.training.config import make_config
    from src.training.finetune import _newest_pretraining_run
    from src.training.trainer import default_run_dir

    root, base, _ = setup
    sft = root / "runs" / "base-sft-x"
    shutil.copytree(base, sft)
    (sft / reader.FINETUNE_FILE).write_text("{}")
    import time

    newest = time.time() + 60  # newer than any other run of this module
    os.utime(reader.latest_checkpoint(sft), (newest, newest))

    cwd = Path.cwd()
    os.chdir(root)
    try:
        assert _newest_pretraining_run() == Path("runs/base")
        assert reader.newest_run(Path("runs"), where=reader.is_finetuned) == Path("runs/base-sft-x")
        assert default_run_dir(make_config({"preset": "tiny"}), resume=True).name != "base-sft-x"
    finally:
        os.chdir(cwd)
        shutil.rmtree(sft)


def test_dailydialog_defaults_to_the_release_the_base_data_came_from(setup, tmp_path):
    from src.training.finetune import recorded_dailydialog_dir

    _, _, dd = setup
    train = dd / "dailydialog" / "train" / "dialogues_train.txt"
    inputs = {"train": [{"path": str(train)}]}
    meta = {"sources": {"dailydialog": {"origin": "local", "inputs": inputs}}}
    assert recorded_dailydialog_dir(meta) == str(dd / "dailydialog")
    meta["sources"]["dailydialog"]["inputs"]["train"][0]["path"] = str(tmp_path / "gone.txt")
    assert recorded_dailydialog_dir(meta) is None  # moved away: the Hub, as prepare_data
    assert recorded_dailydialog_dir({"sources": {"dailydialog": {"origin": "hub"}}}) is None


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, no run folder


def _bad_base_no_checkpoint(root: Path, tmp: Path) -> list[str]:
    (tmp / "empty-run").mkdir()
    return ["--from", str(tmp / "empty-run")]


def _bad_tokenizer(root: Path, tmp: Path) -> list[str]:
    copy = tmp / "other-run"
    shutil.copytree(root / "runs" / "base", copy)
    other = BPETokenizer.train(tiny_corpus(50, 9), 280)
    other.save(copy / "tokenizer.json")
    return ["--from", str(copy)]


@pytest.mark.parametrize("make_args, message", [
    (lambda root, tmp: ["--from", str(tmp / "nowhere")], "does not exist"),
    (_bad_base_no_checkpoint, "no complete checkpoint"),
    (_bad_tokenizer, "is not the tokenizer this checkpoint was trained with"),
    (lambda root, tmp: ["--data", str(write_jsonl(tmp / "e.jsonl", []))], "file is empty"),
    (lambda root, tmp: ["--data", str(write_jsonl(tmp / "m.jsonl", ['{"messages": 3}']))],
     r"m\.jsonl:1: expected an object"),
    (lambda root, tmp: ["--data-dir", str(tmp)], "no DailyDialog train file"),
])
def test_bad_input_is_one_line_and_leaves_no_run_folder(setup, tmp_path, make_args, message):
    root, base, dd = setup
    args = make_args(root, tmp_path)
    if "--from" not in args:
        args += ["--from", str(base)]
    if "--data" not in args and "--data-dir" not in args:
        args += ["--data-dir", str(dd)]
    before = sorted(p.name for p in (root / "runs").iterdir())
    with pytest.raises(UserError, match=message) as info:
        run_finetune(root, *args, "--run-dir", str(tmp_path / "new-run"))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "new-run").exists()
    assert sorted(p.name for p in (root / "runs").iterdir()) == before


def test_bad_input_exits_2_from_the_command_line(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "finetune.py"), "--from", "nowhere"],
                          cwd=tmp_path, capture_output=True, timeout=300)
    assert done.returncode == 2 and done.stderr.decode().count("\n") == 1
    assert b"nowhere does not exist" in done.stderr and not (tmp_path / "runs").exists()


def test_loop_stops_early_after_patience_evaluations_without_a_best(tmp_path):
    from src.model.gpt import GPT
    from src.training.config import make_config
    from src.training.loop import TrainLoop
    from src.training.optim import build_optimizers
    from src.training.presets import model_config

    torch.manual_seed(0)
    model = GPT(model_config("tiny", vocab_size=300))
    cfg = make_config(dict(preset="tiny", run_dir=str(tmp_path), max_steps=20, eval_interval=2,
                           warmup_steps=0, device="cpu", dtype="fp32", progress=False,
                           tensorboard=False, plot=False, early_stop_patience=2))
    examples = [(np.arange(10, dtype=np.int64), np.ones(10, dtype=bool))]
    losses = iter([3.0, 2.0, 2.5, 2.1, 1.0])
    loop = TrainLoop(cfg, model=model, raw_model=model, optimizers=build_optimizers(model, cfg),
                     batches=ChatBatches(examples, 64), evaluate=lambda: {"val_loss": next(losses)},
                     eval_tokens=10, device=torch.device("cpu"))
    reason = loop.run()
    assert reason.startswith("early stop at step 8") and loop.best_val == 2.0
    assert reader.read_state(reader.best_checkpoint(tmp_path))["step"] == 4
    assert reader.read_state(reader.latest_checkpoint(tmp_path))["evals_since_best"] == 2
