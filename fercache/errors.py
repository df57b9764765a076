"""User-facing failures and warnings.

A `UserError` is something the user can fix (a missing file, a bad CSV row, a mismatched cache);
the CLI prints its message as one line and exits with code 2 instead of showing a traceback.
"""

from __future__ import annotations

import warnings


class UserError(Exception):
    """A problem with the user's input; the message says what and where, in one line."""


class FERCacheWarning(UserWarning):
    """Something was skipped or converted; the run goes on."""


def warn(message: str) -> None:
    """Warn once per call site and message (the CLI prints these as one line on stderr)."""
    warnings.warn(message, FERCacheWarning, stacklevel=2)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run to paragraphs)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def at_least_one(**options: int | None) -> None:
    """Counts such as `batch_size=0` are user errors, named as on the command line (`--batch-size`)."""
    for name, value in options.items():
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
