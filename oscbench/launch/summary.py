"""What a run prints at its end: accuracy, oscillation, where the record and W&B files are."""

from __future__ import annotations

from pathlib import Path

from oscbench.launch.config import RunSpec
from oscbench.records.console import say
from oscbench.records.record import load_results
from oscbench.records.runs import RESULTS


def show_completed(spec: RunSpec, done: Path, why: str) -> dict:
    """A completed run found again, where nothing is trained: where it is and why (`why`),
    then its summary, as at its end. Returns its record."""
    say(f"oscbench: {done} already holds this completed run ({why})")
    record = load_results(done)
    print_summary(spec, record, done / RESULTS)
    return record


def print_summary(spec: RunSpec, results: dict, path: Path) -> None:
    """The end-of-run summary of `results` (the record at `path`)."""
    final, history = results["final"], results["history"]
    rows = []
    for name, pre in (("validation accuracy", "val_"), ("test accuracy", "")):
        if f"{pre}acc_bn" not in final:
            continue
        if spec.ptq:
            acc = (
                f"{final[f'{pre}acc@{spec.bits}bit']:.2f} %  (weights rounded to {spec.bits} "
                f"bits; full precision: {final[f'{pre}acc_bn']:.2f} %)"
            )
        else:
            bn = final[f"{pre}acc_bn"]
            acc = f"{final[f'{pre}acc']:.2f} %  (after BN re-estimation: {bn:.2f} %)"
        rows.append((name, acc))
        if f"ema_{pre}acc_bn" in final:
            ema = f"{final[f'ema_{pre}acc_bn']:.2f} % (after BN re-estimation)"
            rows.append((f"{name.split()[0]}, EMA weights", ema))
    if "test accuracy" not in dict(rows):
        rows.append(("test accuracy", "not evaluated (trainer.test=never)"))
    if "kl_to_teacher" in final:
        rows.append(("teacher", f"{final['teacher']} (KL from it: {final['kl_to_teacher']:.4f})"))
    if "osc_share" in final:
        rows += [
            (
                "oscillating weights",
                f"{100 * final['osc_share']:.2f} %  (frequency > "
                f"{spec.oscillation.threshold}, {final['tracked_weights']:,} tracked weights)",
            ),
            *(
                [
                    (
                        "stuck weights",
                        f"{100 * final['stuck_share']:.2f} %  (never left their level "
                        "in the last epoch)",
                    )
                ]
                if "stuck_share" in final
                else []
            ),
            (
                "crossings",
                f"{final['crossings_last_epoch']:,} in the last epoch, "
                f"{final['crossings_total']:,} in all",
            ),
            (
                "d_Q / d_w",
                f"{final['dq_dw']:.2f} over training, {final['dq_dw_last_epoch']:.2f} in the "
                "last epoch (quantized over latent movement)",
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
        init = final["init"]
        split = "test" if "acc" in init else "validation"
        acc = init.get("acc", init.get("val_acc"))
        rows.append(("started from", f"{init['from']} ({acc:.2f} % {split}, before quantization)"))
        pre = "" if "acc" in init else "val_"
        if f"{pre}ptq_acc" in init:
            gap = final.get(f"{pre}ptq_gap_recovered")
            share = f"; QAT recovered {100 * gap:.1f} % of the gap" if gap is not None else ""
            rows.append(("PTQ", f"{init[f'{pre}ptq_acc']:.2f} % {split}{share}"))
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
    t = spec.as_trained().trainer  # a completed run found again: its spec as composed
    epochs = f"{t.epochs} epochs"
    extra = len(history) - t.epochs
    if extra > 0:
        scale = t.extra_lr_scale
        at = f" at lr {scale * t.lr:g}" if scale is not None else ""
        epochs += f" + {extra} extra" + at
    head = (
        f"oscbench: {spec.method} {spec.bits_label.upper()}, {spec.model.name} on "
        f"{spec.dataset.name}, {epochs} in {final['wall_time_s']:.1f} s"
    )
    say("\n".join([head] + [f"  {k:<20} {v}" for k, v in rows]))
