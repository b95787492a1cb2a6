"""What a run prints (a line per epoch here; the summary with the record, in
oscbench/records/record.py). Printing never changes a record: when the reader of stdout goes away
(`... | head -1`), printing stops quietly."""

from __future__ import annotations

import os
import sys
from typing import TextIO


def say(text: str, stream: TextIO | None = None) -> None:
    """Print `text` (to stdout unless told otherwise) and flush; in a run of several
    processes, on rank 0 only (torchrun's RANK). If the other end of the pipe is closed,
    point the stream at /dev/null, so that neither this print nor the interpreter's last
    flush raises, and go on."""
    if os.environ.get("RANK", "0") != "0":
        return
    stream = stream or sys.stdout
    try:
        print(text, file=stream, flush=True)
    except (BrokenPipeError, ValueError):  # ValueError: the stream was closed
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError):
            pass


class ClosedSafe:
    """A text stream (stdout) that, once its reader has gone (a closed pipe: `--help | head
    -1`), is pointed at /dev/null instead of raising: printing never stops a program."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def _gone(self) -> None:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
        except (OSError, ValueError):
            pass

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (BrokenPipeError, ValueError):
            self._gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (BrokenPipeError, ValueError):
            self._gone()

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._stream, name)


def warn(text: str) -> None:
    say(f"oscbench: {text}", sys.stderr)


def epoch_line(record: dict, epochs: int, seconds: float) -> str:
    """One line for a finished epoch: what a cluster log shows of a run's progress."""
    line = (
        f"epoch {record['epoch']:>{len(str(epochs))}}/{epochs}  "
        f"loss {record['train_loss']:.4f}  train {record['train_acc']:.2f} %"
    )
    for split in ("val", "test"):  # the splits a record may hold per epoch
        if f"{split}_acc" in record:
            line += f"  {split} {record[f'{split}_acc']:.2f} %"
    if "osc" in record:
        osc = record["osc"]
        line += f"  oscillating {100 * osc['osc_share']:.2f} %  dQ/dw {osc['dq_dw']:.2f}"
    return line + f"  ({seconds:.1f} s)"
