"""How every command-line entry point reports a user's mistake.

Code anywhere raises :class:`UserError` with a one-line message naming the file or value
and what is wrong; :func:`run_cli` turns it into ``error: <message>`` on stderr and a
non-zero exit, with no traceback. Programming errors still show their traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line (exit code 2)."""


EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def run_cli(main: Callable[[], int | None]) -> None:
    """Run ``main`` and exit: 0 (or its return value) on success, 2 on :class:`UserError`,
    130 on Ctrl-C (``interrupted``, followed by the KeyboardInterrupt's message if it has one:
    code that catches Ctrl-C re-raises it saying what was left behind). A broken pipe (e.g.
    ``| head``) exits quietly."""
    try:
        code = main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt as exc:  # raised with a message: what was and was not saved
        print(f"interrupted: {exc}" if str(exc) else "interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(0)
    sys.exit(code or 0)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` that shows each option's default once: appended as ``(default: X)`` unless
    the help text already speaks of the default, or there is none to show (None, off, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, [], argparse.SUPPRESS)
        if shown and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text
