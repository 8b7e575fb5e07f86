"""How the command line reports a failure: one line naming the thing and the fix, no traceback.

Exit codes: 2 for a usage error (a wrong flag or value: argparse's own code), 1 for a job that failed
(missing or wrong data, unusable weights, an offline download, ...). `--debug` shows the traceback.
"""
from __future__ import annotations

import logging
import sys
from typing import Callable

log = logging.getLogger(__name__)

EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(ValueError):
    """The command line asks for something impossible (exit 2)."""


def one_line(exc: BaseException) -> str:
    """The message of an exception as one line (the first non-empty line; KeyError unquoted)."""
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    elif isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in str(exc):
        text = f"{exc.filename}: no such file or folder"
    else:
        text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def exit_code(exc: BaseException) -> int:
    return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILED


def run_reporting_errors(job: Callable[[], int], debug: bool = False, prog: str = "detrkit") -> int:
    """Run `job`; on an exception print `prog: error: <one line>` to stderr and return its exit code.
    With debug the exception propagates (its traceback shows). Ctrl-C ends with 130 and no traceback."""
    try:
        return int(job() or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - the point: people get a sentence, not a traceback
        if debug:
            raise
        log.debug("traceback", exc_info=True)
        hint = "" if isinstance(e, (ValueError, OSError, KeyError)) else f" ({type(e).__name__}; --debug shows where)"
        print(f"{prog}: error: {one_line(e)}{hint}", file=sys.stderr)
        return exit_code(e)
