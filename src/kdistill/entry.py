"""How a kdistill command runs: argument parsing, logging, and the one place user mistakes are caught.

Both ``kdistill <command>`` (:mod:`kdistill.cli`) and a command module run as ``python -m kdistill.<module>``
(:func:`module_main`) go through :func:`run_command`: a :class:`~kdistill.errors.UserError` (and a
``FileNotFoundError``) is printed as one line ``<prog>: error: <message>`` with exit status 2; anything else
is a bug and keeps its traceback. ``--debug`` or ``KDISTILL_DEBUG=1`` keeps the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from kdistill.errors import UserError

__all__ = ["LOG_FORMAT", "debug_requested", "module_main", "run_command"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def debug_requested() -> bool:
    """KDISTILL_DEBUG=1 (or true/yes): user errors keep their traceback."""
    return os.environ.get("KDISTILL_DEBUG", "").lower() in ("1", "true", "yes")


def run_command(prog: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                debug: bool = False) -> int:
    """``run(args)``, with a user mistake printed as ``"<prog>: error: <message>"`` (exit status 2) unless
    ``debug`` or :func:`debug_requested`."""
    try:
        return run(args)
    except (UserError, FileNotFoundError) as exc:  # user mistakes: one line; anything else is a bug (traceback)
        if debug or debug_requested():
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


def module_main(prog: str, description: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                run: Callable[[argparse.Namespace], int], argv: Sequence[str] | None = None) -> int:
    """Entry point of a command module run as `python -m kdistill.<module>` (same arguments as its subcommand)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    return run_command(prog, run, args)
