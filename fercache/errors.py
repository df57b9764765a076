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
