"""src/infer/generate.py, the command line, on a tiny trained run.

Most tests call ``main`` in this process (fast); two run the script as a user would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.infer.generate import main, unescape
from src.utils.cli import UserError
from tests.fixtures import make_tiny_run

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "src" / "infer" / "generate.py"
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_thread in conftest.py


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def shared_tiny_run(tmp_path_factory) -> Path:
    """One tiny trained run for all of this session's generation and chat tests."""
    base = tmp_path_factory.getbasetemp() / "infer-tiny-run"
    if not (base / "run" / "checkpoints" / "latest").is_file():
        make_tiny_run(base, steps=6)
    return base / "run"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return shared_tiny_run(tmp_path_factory)


def gen(capsys, run_dir, *args):
    assert main(["--run", str(run_dir), "--device", "cpu", *args]) == 0
    out = capsys.readouterr()
    return out.out, out.err


def test_same_seed_same_text(capsys, run_dir):
    args = ["--prompt", "The cat", "--max-new-tokens", "30", "--temperature", "1.0"]
    a, _ = gen(capsys, run_dir, *args, "--seed", "5")
    b, _ = gen(capsys, run_dir, *args, "--seed", "5")
    c, _ = gen(capsys, run_dir, *args, "--seed", "6")
    assert a == b and a != c
    assert a.startswith("The cat") and len(a) > len("The cat\n")


def test_greedy_is_temperature_zero_and_ignores_the_seed(capsys, run_dir):
    a, _ = gen(
        capsys, run_dir, "--prompt", "A dog", "--greedy", "--seed", "1", "--max-new-tokens", "20"
    )
    b, _ = gen(
        capsys,
        run_dir,
        "--prompt",
        "A dog",
        "--temperature",
        "0",
        "--seed",
        "2",
        "--max-new-tokens",
        "20",
    )
    assert a == b


def test_num_samples_and_no_echo(capsys, run_dir):
    out, _ = gen(
        capsys,
        run_dir,
        "--prompt",
        "She",
        "--num-samples",
        "3",
        "--seed",
        "0",
        "--max-new-tokens",
        "12",
        "--no-echo",
    )
    parts = out.split("--- sample ")
    assert [p[:4] for p in parts[1:]] == ["1/3 ", "2/3 ", "3/3 "]
    assert not any(p.split("\n", 1)[1].startswith("She") for p in parts[1:])


def test_stop_string_cuts_the_output(capsys, run_dir):
    greedy = ["--prompt", "The teacher", "--greedy", "--max-new-tokens", "40", "--no-echo"]
    full, _ = gen(capsys, run_dir, *greedy)
    full = full[:-1]  # the final newline
    stop = full[6:9]
    assert len(stop) == 3
    cut, _ = gen(capsys, run_dir, *greedy, "--stop", stop)
    assert cut == full[: full.find(stop)] + "\n"


def test_prompt_longer_than_the_context_slides(capsys, run_dir):
    prompt = "the cat sees the ball. " * 60  # far more than the tiny preset's 64 tokens
    out, err = gen(capsys, run_dir, "--prompt", prompt, "--max-new-tokens", "40", "--seed", "0")
    assert out.startswith(prompt) and len(out) > len(prompt) + 1
    assert "keeping its last 64" in err and "sliding" in err


@pytest.mark.parametrize(
    "args, words",
    [
        (["--top-p", "2"], ["--top-p must be in (0, 1]"]),
        (["--temperature", "-1"], ["--temperature"]),
        (["--max-new-tokens", "0"], ["--max-new-tokens"]),
        (["--num-samples", "0"], ["--num-samples"]),
        (["--stop", ""], ["--stop"]),
        (["--prompt-file", "/nonexistent/p.txt"], ["/nonexistent/p.txt", "no such file"]),
    ],
)
def test_bad_values_are_one_line_errors(run_dir, args, words):
    with pytest.raises(UserError) as exc:
        main(["--run", str(run_dir), *args])
    for w in words:
        assert w in str(exc.value)


def test_prompt_file_must_be_utf8(tmp_path, run_dir, capsys):
    bad = tmp_path / "p.txt"
    bad.write_bytes(b"caf\xe9")
    with pytest.raises(UserError, match="p.txt: not UTF-8"):
        main(["--run", str(run_dir), "--prompt-file", str(bad)])
    good = tmp_path / "q.txt"
    good.write_text("Un café", encoding="utf-8")
    out, _ = gen(
        capsys, run_dir, "--prompt-file", str(good), "--max-new-tokens", "5", "--seed", "0"
    )
    assert out.startswith("Un café")


def test_says_which_run_it_loaded_and_warns_when_barely_trained(capsys, run_dir):
    out, err = gen(capsys, run_dir, "--prompt", "The cat", "--max-new-tokens", "3", "--seed", "0")
    loaded, warning = err.splitlines()[:2]
    assert loaded.startswith(f"loaded {run_dir}, checkpoint step_0000006 (step 6, val loss ")
    assert warning == f"warning: {run_dir} trained only 6 steps: expect gibberish"
    assert "loaded" not in out  # stdout holds only the text


@pytest.mark.parametrize("device", ["banana", "mps"])
def test_bad_or_absent_device_is_one_line(run_dir, device):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(UserError, match=f"--device {device}: "):
        main(["--run", str(run_dir), "--device", device, "--prompt", "x"])


@pytest.fixture(scope="module")
def babbling_run(run_dir, tmp_path_factory):
    """The tiny run with its final norm zeroed: every token is equally likely, so sampling
    reaches the chat markers quickly unless they are hidden."""
    from src.checkpoint import latest_checkpoint, read_weights, write_weights

    run = tmp_path_factory.mktemp("babble") / "run"
    shutil.copytree(run_dir, run)
    ckpt = latest_checkpoint(run)
    weights = read_weights(ckpt)
    weights["norm.weight"] = torch.zeros_like(weights["norm.weight"])
    write_weights(ckpt, weights)
    return run


def test_plain_generation_never_prints_special_tokens(capsys, babbling_run):
    args = ["--prompt", "The cat", "--max-new-tokens", "300", "--seed", "0", "--no-echo"]
    shown, _ = gen(capsys, babbling_run, *args, "--show-special")
    assert "<|user|>" in shown or "<|assistant|>" in shown  # what the model writes when let
    hidden, _ = gen(capsys, babbling_run, *args)
    assert "<|" not in hidden and len(hidden) > 50


def test_unk_is_never_written_whatever_its_pieces(babbling_run):
    from src.checkpoint import load_model
    from src.infer.sampling import UNKNOWN_WORD, SamplingSettings, TextBan, generate

    model, tok, _ = load_model(babbling_run)
    # A model that spells "<unk>" byte by byte, over and over: after "<" it all but surely
    # writes "u", after "u" "n", ... (the byte tokens' ids are the byte values).
    following = {ord(a): ord(b) for a, b in zip("<unk>", "unk><")}

    def spell(_model, args, logits):
        nxt = torch.tensor([[following.get(i, ord("<")) for i in row] for row in args[0].tolist()])
        return logits + 30.0 * torch.nn.functional.one_hot(nxt, logits.size(-1))

    model.register_forward_hook(spell)
    settings = SamplingSettings(max_new_tokens=40, temperature=1.0)
    free, = generate(model, tok, [tok.eot_id], settings, generator=torch.Generator().manual_seed(0))
    assert free.text.startswith("<unk><unk>")  # what it writes when let
    kept_out, = generate(model, tok, [tok.eot_id], settings, generator=torch.Generator().manual_seed(0),
                         banned_text=UNKNOWN_WORD)
    assert "<unk" not in kept_out.text and kept_out.text.startswith("<un")  # only "<unk" is kept out
    # The mask: after "<un" exactly the tokens that complete "<unk" are banned.
    ban = TextBan(tok, UNKNOWN_WORD, model.config.vocab_size)
    after_un, after_u = (ban(torch.tensor([tok.encode(text)]))[0] for text in ("a <un", "a <u"))
    assert after_un[ord("k")] and not after_un[ord("s")] and not after_u[ord("k")]


def test_unescape():
    assert unescape(r"a\nb\tc\\n") == "a\nb\tc\\n"
    assert unescape("\\") == "\\"


@pytest.mark.slow
def test_script_end_to_end(run_dir, tmp_path):
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--run",
        str(run_dir),
        "--prompt",
        "My friend",
        "--seed",
        "3",
        "--max-new-tokens",
        "20",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ONE_THREAD_ENV)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("My friend") and done.stdout.endswith("\n")
    # No trained run: one line saying how to train one, exit 2, no traceback.
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--prompt", "x"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=ONE_THREAD_ENV,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "python train.py" in done.stderr
