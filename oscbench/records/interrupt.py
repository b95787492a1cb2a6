"""Ending a run from outside: Ctrl-C (SIGINT) and SIGTERM (what `kill` and SLURM send, SLURM
before its SIGKILL at a time limit). Both end a run as an interruption, not a failure: its
record says `interrupted` and when, the command prints one line and exits with the shell's
code for the signal (130, 143), and the same command resumes the run from its last
checkpoint. Python raises KeyboardInterrupt on SIGINT; `install` makes SIGTERM raise
`Terminated` likewise, in the main thread.

In a job of Hydra's submitit launchers, submitit's own signal (SIGUSR2: the job preempted,
or its time limit near) requeues the job and exits from wherever the run is, which would
leave its record `failed`; `defer_submitit` makes that signal end the run as an
interruption first (`Preempted`), then hands it to submitit."""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, as KeyboardInterrupt: no `except Exception` of a
    library in between swallows it)."""


class Preempted(BaseException):
    """submitit's signal arrived; `hand_over` then runs submitit's handler of it, which
    requeues the job and exits (or, past its requeues for time limits, ends the job)."""

    def __init__(self, signum: int, handler: Callable[[int, FrameType | None], None]) -> None:
        super().__init__(signum)
        self.signum, self.handler = signum, handler

    def hand_over(self) -> None:
        self.handler(self.signum, None)


INTERRUPTS = (KeyboardInterrupt, Terminated, Preempted)


def _terminate(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the record short
    raise Terminated()


def install() -> None:
    """SIGTERM raises `Terminated` from now on (in the main thread, between operations)."""
    signal.signal(signal.SIGTERM, _terminate)


def defer_submitit() -> None:
    """In a submitit job (its handler set for SIGUSR1 or SIGUSR2, `checkpoint_and_try_requeue`),
    that signal raises `Preempted` from now on, in the main thread; once, as SIGTERM's."""
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        handler = signal.getsignal(sig)
        if getattr(handler, "__name__", None) == "checkpoint_and_try_requeue":

            def preempt(signum: int, frame: FrameType | None, handler=handler) -> None:
                signal.signal(signum, signal.SIG_IGN)
                raise Preempted(signum, handler)

            signal.signal(sig, preempt)


def signal_of(exc: BaseException) -> signal.Signals:
    if isinstance(exc, Preempted):
        return signal.Signals(exc.signum)
    return signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT


def said(exc: BaseException, why: str = "") -> str:
    """`interrupted by SIG<why>; <record> says so after epoch k`: what the command prints
    (`why` after the signal's name; the record's part once the recorder has saved it)."""
    where = getattr(exc, "record", None)
    record = f"; {where} says so after epoch {exc.epoch}" if where else ""
    return f"interrupted by {signal_of(exc).name}{why}{record}"
