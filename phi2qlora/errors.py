"""Bad input and failed runs, told as one line: what and where, and what to do."""

from __future__ import annotations

import sys
from pathlib import Path


class InputError(Exception):
    """Bad input from the user (a file, a recipe, a flag): the message says where and what
    to do. Scripts print it without a traceback and exit with status 2."""


def exit_on_input_error(main):
    """Run `main()`; turn an InputError into one line on stderr and exit status 2 (a
    RunFault, a run that failed: 1)."""
    try:
        return main()
    except InputError as e:
        prog = Path(sys.argv[0]).stem
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(getattr(e, "exit_status", 2)) from None


class RunFault(InputError):
    """Training went wrong in a way the recipe can fix (a NaN, out of memory): printed as
    one message, like bad input, with exit status 1."""

    exit_status = 1

