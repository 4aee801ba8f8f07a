"""User-facing errors.

Every mistake a user can make (bad name, bad file, bad data, bad option) raises a subclass of
:class:`MobileQuantError`. The CLI turns it into one line on stderr and a non-zero exit code, with no
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MobileQuantError(Exception):
    """Base class of errors caused by user input. ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class UsageError(MobileQuantError):
    """A wrong option, name or value (exit 2)."""


class InputError(MobileQuantError):
    """A file or data set that cannot be used as given (exit 2)."""


class CheckFailed(MobileQuantError):
    """A verification or gate check failed (exit 1)."""

    exit_code = 1


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """`` (did you mean 'a', 'b'?)`` for the closest choices, or ``""`` when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    if not close:
        return ""
    return " (did you mean " + ", ".join(repr(c) for c in close) + "?)"
