"""What a run prints: a line per epoch and the summary at the end. Printing never changes
a record: when the reader of stdout goes away (`... | head -1`), printing stops quietly."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from oscbench.config import RunSpec


def say(text: str, stream: TextIO | None = None) -> None:
    """Print `text` (to stdout unless told otherwise) and flush. If the other end of the
    pipe is closed, point the stream at /dev/null, so that neither this print nor the
    interpreter's last flush raises, and go on."""
    stream = stream or sys.stdout
    try:
        print(text, file=stream, flush=True)
    except (BrokenPipeError, ValueError):  # ValueError: the stream was closed
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError):
            pass


def warn(text: str) -> None:
    say(f"oscbench: {text}", sys.stderr)


def epoch_line(record: dict, epochs: int, seconds: float) -> str:
    """One line for a finished epoch: what a cluster log shows of a run's progress."""
    line = (
        f"epoch {record['epoch']:>{len(str(epochs))}}/{epochs}  "
        f"loss {record['train_loss']:.4f}  train {record['train_acc']:.2f} %  "
        f"val {record['val_acc']:.2f} %"
    )
    if "osc" in record:
        line += f"  oscillating {100 * record['osc']['osc_share']:.2f} %"
    return line + f"  ({seconds:.1f} s)"


def print_summary(spec: RunSpec, results: dict, path: Path) -> None:
    """The end-of-run summary: accuracy, oscillation, where the record and W&B files are."""
    final, history = results["final"], results["history"]
    if spec.ptq:
        acc = (
            f"{final[f'acc@{spec.bits}bit']:.2f} %  (weights rounded to {spec.bits} bits; "
            f"full precision: {final['acc_bn']:.2f} %)"
        )
    else:
        acc = f"{final['acc']:.2f} %  (after BN re-estimation: {final['acc_bn']:.2f} %)"
    rows = [("test accuracy", acc)]
    if "osc_share" in final:
        rows += [
            (
                "oscillating weights",
                f"{100 * final['osc_share']:.2f} %  (frequency > "
                f"{spec.oscillation.threshold}, {final['tracked_weights']:,} tracked weights)",
            ),
            (
                "crossings",
                f"{final['crossings_last_epoch']:,} in the last epoch, "
                f"{final['crossings_total']:,} in all",
            ),
        ]
    else:
        rows.append(("oscillation", "not tracked (no quantized weights)"))
    ptq = [f"{k[4:-3]} bit {v:.2f} %" for k, v in final.items() if k.startswith("acc@")]
    if ptq:
        rows.append(("rounded weights", ", ".join(ptq)))
    for key, value in final.items():
        if key.endswith("frozen_share"):
            rows.append((f"frozen ({key.split('/')[0]})", f"{100 * value:.2f} % of weights"))
    if "init" in final:
        rows.append(
            (
                "started from",
                f"{final['init']['from']} ({final['init']['acc']:.2f} % before quantization)",
            )
        )
    if results.get("resumed_at_epoch"):
        rows.append(
            (
                "resumed",
                f"after epoch {results['resumed_at_epoch']} (attempt {results['attempts']}; "
                "the wall time counts every attempt up to the checkpoint it resumed from)",
            )
        )
    rows.append(("record", str(path)))
    if "wandb" in results:
        w = results["wandb"]
        hint = f"  (upload: wandb sync {w['dir']})" if w["mode"] == "offline" else ""
        rows.append((f"W&B ({w['mode']})", w["dir"] + hint))
    epochs = f"{spec.trainer.epochs} epochs"
    extra = len(history) - spec.trainer.epochs
    if extra > 0:
        phases = [p.name for p in spec.policies if getattr(p.options, "extra_epochs", 0)]
        epochs += f" + {extra} of {', '.join(phases)}"
    head = (
        f"oscbench: {spec.method} {spec.bits_label.upper()}, {spec.model.name} on "
        f"{spec.dataset.name}, {epochs} in {final['wall_time_s']:.1f} s"
    )
    say("\n".join([head] + [f"  {k:<20} {v}" for k, v in rows]))
