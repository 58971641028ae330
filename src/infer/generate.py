"""Sample text from a trained model.

    python src/infer/generate.py --prompt "The history of"            # newest run under runs/
    python src/infer/generate.py --run runs/small --prompt-file p.txt --max-new-tokens 500
    python src/infer/generate.py --prompt "Once" --num-samples 4 --seed 1 --stop "\\n\\n"

The text goes to stdout: the prompt, then the continuation as it is generated (whole
characters only). With ``--num-samples N > 1`` the N samples are drawn as one batch and
printed one after another when done, each under a ``--- sample i/N ---`` line. Notices
(such as the context window sliding) go to stderr.

Generation ends at ``<|endoftext|>`` (the end of a document), at a ``--stop`` string (not
printed; ``\\n`` and ``\\t`` are understood), or after ``--max-new-tokens``. The chat
markers (``<|user|>``, ``<|assistant|>``) and WikiText's ``<unk>`` placeholder are never
sampled, so never printed; ``--show-special`` lets the model write them, as it learned to.
Text longer than the model's context keeps going: the window slides forward, forgetting the
oldest quarter of the context (said once on stderr). The same ``--seed`` and flags give the same
text. The prompt is encoded as plain text: ``<|endoftext|>`` typed in it is just text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root


from src.checkpoint import (
    barely_trained,
    checkpoint_from_args,
    describe_loaded,
    is_finetuned,
    load_model,
    newest_run,
)
from src.infer.sampling import (
    TEXT_DEFAULTS,
    UNKNOWN_WORD,
    SamplingSettings,
    generate,
    hidden_special_ids,
    rename_setting_in_error,
)
from src.utils.cli import UserError, run_cli
from src.utils.device import make_generator, pick_device
from src.utils.terminal import printable


def unescape(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` in a command-line string, so ``--stop '\\n'`` works."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def read_prompt_file(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--prompt-file {path}: no such file")
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"--prompt-file {path}: not UTF-8 text (byte {exc.start})") from None


def add_loading_args(parser: argparse.ArgumentParser) -> None:
    """--run / --checkpoint / --device / --verify, shared with chat.py."""
    parser.add_argument("--run", help="a run directory (default: the newest run under runs/)")
    parser.add_argument("--checkpoint", help="which checkpoint of the run: best (default: lowest "
                        "validation loss), latest, a step number, or a checkpoint folder")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA, else Apple MPS, else CPU), cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--verify", action="store_true",
                        help="check the SHA-256 of the checkpoint's files against its state.json "
                             "before loading (sizes and formats are always checked)")


def load_model_from_args(args: argparse.Namespace, *, prefer_finetuned: bool = False):
    """(model, tokenizer, info) from --run/--checkpoint (default: the newest run's best
    checkpoint; a damaged one is skipped for the newest intact one) on --device; safetensors
    only; SHA-256s checked with --verify. ``prefer_finetuned`` (chat.py): without --run, the
    newest fine-tuned run when there is one, as a chat model is what a chat wants. Says on
    stderr which run and checkpoint it loaded (one line), and warns when that run is barely
    trained: without --run the newest run is taken, which may be a two-step test run."""
    run = args.run
    if run is None and prefer_finetuned and not _is_checkpoint_path(args.checkpoint):
        run = newest_run(Path("runs"), where=is_finetuned)
    ckpt = checkpoint_from_args(run, args.checkpoint, verify=getattr(args, "verify", False))
    model, tokenizer, info = load_model(ckpt, device=pick_device(args.device))
    print(describe_loaded(info), file=sys.stderr, flush=True)
    warning = barely_trained(info)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return model, tokenizer, info


def _is_checkpoint_path(checkpoint: str | None) -> bool:
    """Whether --checkpoint names a folder (rather than best, latest or a step)."""
    return bool(checkpoint) and not (checkpoint in ("best", "latest") or checkpoint.isdigit())


def settings_from_args(
    args: argparse.Namespace, max_new_tokens: int, max_tokens_flag: str = "--max-new-tokens"
) -> SamplingSettings:
    """The sampling settings of the command line; a bad value is a UserError naming its flag."""
    try:
        return SamplingSettings(
            max_new_tokens=max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            greedy=getattr(args, "greedy", False),
        )
    except ValueError as exc:

        def flag(field: str) -> str:
            return max_tokens_flag if field == "max_new_tokens" else "--" + field.replace("_", "-")

        raise UserError(rename_setting_in_error(exc, flag)) from None


def add_sampling_args(parser: argparse.ArgumentParser, defaults: SamplingSettings) -> None:
    """The sampling flags, shared with chat.py (``defaults``: TEXT_DEFAULTS or CHAT_DEFAULTS)."""
    parser.add_argument(
        "--temperature",
        type=float,
        default=defaults.temperature,
        help=f"randomness; 0 = greedy (default {defaults.temperature})",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=defaults.top_k or 0,
        help=f"sample among the K most likely tokens (default {defaults.top_k or 0}; 0 = off)",
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=defaults.top_p,
        help=f"nucleus: the most likely tokens covering P (default {defaults.top_p})",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=defaults.repetition_penalty,
        help=f"> 1 discourages tokens already in the text (default {defaults.repetition_penalty}; "
        "1 = off)",
    )
    parser.add_argument("--seed", type=int, default=None, help="for reproducible output")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Sample text from a trained model.",
        epilog="Example: python src/infer/generate.py --prompt 'The history of' --seed 0",
    )
    add_loading_args(parser)
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="the text to continue (default: start a new document)")
    prompt.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    parser.add_argument("--max-new-tokens", type=int, default=TEXT_DEFAULTS.max_new_tokens,
                        help=f"(default {TEXT_DEFAULTS.max_new_tokens})")
    add_sampling_args(parser, TEXT_DEFAULTS)
    parser.add_argument("--greedy", action="store_true", help="always the most likely token")
    parser.add_argument("--num-samples", type=int, default=1, help="samples drawn as one batch")
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop at this text (repeatable; \\n and \\t understood)",
    )
    parser.add_argument("--no-echo", action="store_true", help="print only the continuation")
    parser.add_argument("--show-special", action="store_true",
                        help="let the model write chat markers and <unk> (hidden by default)")
    args = parser.parse_args(argv)

    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    settings = settings_from_args(args, args.max_new_tokens)
    stops = [unescape(s) for s in args.stop]
    if any(not s for s in stops):
        raise UserError("--stop needs a non-empty text")
    text = read_prompt_file(args.prompt_file) if args.prompt_file else (args.prompt or "")

    model, tokenizer, _info = load_model_from_args(args)
    device = next(model.parameters()).device
    # A document starts after an <|endoftext|>, as in training; the prompt is plain text.
    prompt_ids = [tokenizer.eot_id, *tokenizer.encode(text)]

    def notice(message: str) -> None:
        print(f"note: {message}", file=sys.stderr, flush=True)

    out = sys.stdout
    # On a terminal, control characters a model may emit (ESC sequences) are not printed.
    shown = printable if out.isatty() else str
    stream = args.num_samples == 1
    if stream and not args.no_echo:
        out.write(text)
        out.flush()

    def on_text(row: int, piece: str) -> None:
        out.write(shown(piece))
        out.flush()

    completions = generate(
        model,
        tokenizer,
        prompt_ids,
        settings,
        num_samples=args.num_samples,
        stop_ids=[tokenizer.eot_id],
        stop_strings=stops,
        generator=make_generator(args.seed, device),
        on_context_full="slide",
        on_text=on_text if stream else None,
        notice=notice,
        banned_ids=() if args.show_special else hidden_special_ids(tokenizer),
        banned_text=None if args.show_special else UNKNOWN_WORD,
    )
    if stream:
        out.write("\n")
    else:
        for i, c in enumerate(completions, 1):
            out.write(f"--- sample {i}/{args.num_samples} ---\n")
            out.write(("" if args.no_echo else text) + shown(c.text) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    run_cli(main)
