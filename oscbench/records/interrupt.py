"""Ending a run from outside: Ctrl-C (SIGINT) and SIGTERM (what `kill` and SLURM send, SLURM
before its SIGKILL at a time limit). Both end a run as an interruption, not a failure: its
record says `interrupted` and when, the command prints one line and exits with the shell's
code for the signal (130, 143), and the same command resumes the run from its last
checkpoint. Python raises KeyboardInterrupt on SIGINT; `install` makes SIGTERM raise
`Terminated` likewise, in the main thread."""

from __future__ import annotations

import signal
from types import FrameType


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, as KeyboardInterrupt: no `except Exception` of a
    library in between swallows it)."""


INTERRUPTS = (KeyboardInterrupt, Terminated)


def _terminate(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the record short
    raise Terminated()


def install() -> None:
    """SIGTERM raises `Terminated` from now on (in the main thread, between operations)."""
    signal.signal(signal.SIGTERM, _terminate)


def signal_of(exc: BaseException) -> signal.Signals:
    return signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
