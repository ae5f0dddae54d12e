"""The one exception type for mistakes a user can make, and the wrapper scripts use to report it.

References: none (project plumbing); the rule it serves is in docs/training.md ("Errors").

A `UserError` carries one sentence naming what was wrong (the file, flag or key) and what was
expected. Scripts wrap their `main` in `run_cli`, which prints that sentence and exits with
status 2, no traceback.
"""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem caused by the user's input (bad path, file, flag, checkpoint), not a bug."""


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a script's `main`, turning a UserError into `error: <sentence>` and exit status 2."""
    try:
        code = main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
