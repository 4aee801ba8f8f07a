"""User-facing errors.

Every mistake a user can make (bad name, bad file, bad data, bad option) raises a subclass of
:class:`MobileQuantError`. The CLI turns it into one line on stderr and a non-zero exit code, with no
traceback; anything else is a bug and keeps its traceback.

A stop (Ctrl-C, SIGTERM) is not an error: the CLI's signal handlers raise ``KeyboardInterrupt`` /
:class:`Terminated` and also record the signal (:func:`note_stop`), because a library may catch and drop
the exception (jax's garbage-collection callback prints "Exception ignored" and carries on).
:func:`raise_if_stopped`, called before a finished file is renamed into place, raises it again, so a
stopped command never replaces an output file; the CLI exits 130 / 143 when a stop was recorded even if
the command returned.
"""

from __future__ import annotations

import difflib
import signal
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


class Terminated(KeyboardInterrupt):
    """Raised by the CLI's SIGTERM handler. Not an ``Exception``, so nothing on the way swallows it and the
    cleanup a failed job runs (temporary files, an output folder the job created) runs for a killed job too;
    a KeyboardInterrupt, so libraries treat it as the stop Ctrl-C is (torch's DataLoader workers exit
    quietly)."""


_stop_signal: int | None = None  # the SIGINT / SIGTERM received while the CLI runs a command, if any


def note_stop(signum: int | None) -> None:
    """Record (``None``: forget) the stop signal received; only the CLI's signal handlers call this."""
    global _stop_signal
    _stop_signal = signum


def stop_signal() -> int | None:
    """The stop signal recorded by :func:`note_stop` since the command began, or None."""
    return _stop_signal


def raise_if_stopped() -> None:
    """Raise the stop again (:class:`Terminated` for SIGTERM, else ``KeyboardInterrupt``) when one was
    recorded: the exception the handler raised may have been swallowed by a library on the way."""
    if _stop_signal is not None:
        raise Terminated() if _stop_signal == signal.SIGTERM else KeyboardInterrupt()
