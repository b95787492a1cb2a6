"""Run records: `results.json` written atomically in the run directory, mirrored to W&B.

The local record is the source of truth (W&B is a mirror): it says whether a run
completed, failed (with the error) or is still running, whatever a scheduler says. A W&B
failure is reported once and never stops, stalls or changes the record: an online run
that cannot reach its server logs offline instead (upload later with `wandb sync`).
"""

from __future__ import annotations

import platform
import socket
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from oscbench.config import LoggerConfig, RunSpec
from oscbench.console import say, warn
from oscbench.files import DamagedFile, read_json, set_aside, write_json_atomic
from oscbench.interrupt import INTERRUPTS, signal_of
from oscbench.runs import RESULTS, run_key


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("oscbench", "torch", "torchvision", "timm", "hydra-core", "wandb", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine(device: str, processes: int = 1) -> dict[str, Any]:
    """Where the run's numbers came from: their last digits depend on the CPU's vector
    width, the thread count and the number of processes (the order in which sums are
    added up), and the GPU."""
    import torch

    out = {
        "device": device,
        "processes": processes,
        "cpu": _cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return out


def _cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_tags(config: dict, bits: str) -> list[str]:
    """W&B tags that make runs easy to filter: bit-widths, model, dataset, seed."""
    return [
        bits,
        str(config["model"]["name"]),
        str(config["dataset"]["name"]),
        f"seed{config.get('seed')}",
    ]


def count_histogram(counts: list[int]):  # noqa: ANN201
    """A wandb.Histogram of a bincount (bin k: weights that oscillated k times)."""
    import wandb

    return wandb.Histogram(np_histogram=(counts, list(range(len(counts) + 1))))


def flatten_epoch(record: dict) -> dict[str, float]:
    """An epoch record as flat W&B keys (`osc/share`, `osc_layer/<name>/share`, ...)."""
    flat = {k: v for k, v in record.items() if k != "osc"}
    osc = record.get("osc")
    if osc:
        for key in ("osc_share", "mean_freq", "crossings", "oscillations", "dq_dw"):
            flat[f"osc/{key}"] = osc[key]
        for name, layer in osc["layers"].items():
            for key in ("osc_share", "mean_freq", "crossings", "dq_dw"):
                flat[f"osc_layer/{name}/{key}"] = layer[key]
    return flat


class WandbMirror:
    """One W&B run through W&B's own client. Every call is guarded: the first failure is
    reported (once) and ends the mirroring; the run goes on with its local record."""

    def __init__(self, logger: LoggerConfig, run_dir: Path) -> None:
        self.logger = logger
        self.run_dir = run_dir
        self.run = None

    def start(
        self, config: dict, name: str, job_type: str, tags: list[str], resume_id: str | None
    ) -> dict | None:
        """Start (or, with `resume_id`, continue) the W&B run; returns what the record keeps
        of it, or None if W&B could not start at all."""
        args = (config, name, job_type, tags, resume_id)
        mode = self.logger.mode
        problem = self._unreachable() if mode == "online" else None
        if problem is None:
            problem = self._init(*args, mode)
            if problem is not None and mode != "online":
                warn(f"W&B could not start ({problem}); training goes on, results.json holds all")
                return None
        if problem is not None:  # online failed: offline instead
            offline_problem = self._init(*args, "offline")
            if offline_problem is not None:
                warn(
                    f"W&B could not start online ({problem}) nor offline ({offline_problem}); "
                    "training goes on without it"
                )
                return None
            mode = "offline"
        info = {"mode": mode, "id": self.run.id, "dir": str(Path(self.run.dir).parent)}
        if problem is not None:
            info["online_failed"] = problem
            warn(
                f"W&B online is unavailable ({problem}); logging offline instead: upload "
                f"later with `wandb sync {info['dir']}`"
            )
        return info

    def _unreachable(self) -> str | None:
        """Why the W&B server cannot be reached right now (a TCP connect with a short
        timeout, so a machine without network does not wait for W&B's own retries), or None."""
        import wandb

        try:
            url = urlparse(wandb.setup().settings.base_url)
        except Exception as e:  # W&B's own settings could not be read
            return f"{type(e).__name__}: {e}"
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname, port), self.logger.connect_timeout).close()
        except OSError as e:
            return f"cannot connect to {url.scheme}://{url.netloc}: {e}"
        return None

    def _init(self, config, name, job_type, tags, resume_id, mode) -> str | None:  # noqa: ANN001
        """Start the run in `mode`; None if it started, else what went wrong (W&B raises
        many kinds of exceptions: none of them may stop the run)."""
        import wandb

        try:
            self.run = wandb.init(
                project=self.logger.project,
                entity=self.logger.entity,
                group=self.logger.group,
                job_type=job_type,
                tags=[*self.logger.tags, *tags],
                name=name,
                config=config,
                dir=str(self.run_dir),
                mode=mode,
                reinit="finish_previous",
                id=resume_id,
                resume="allow" if resume_id else None,
                settings=wandb.Settings(
                    silent=True, console="off", init_timeout=self.logger.init_timeout
                ),
            )
        except Exception as e:
            return f"{type(e).__name__}: {e}".strip()
        return None

    def _guard(self, what: str, fn) -> None:  # noqa: ANN001
        if self.run is None:
            return
        try:
            fn(self.run)
        except Exception as e:
            warn(
                f"W&B failed to {what} ({type(e).__name__}: {e}); mirroring stops here, "
                "results.json goes on"
            )
            self.run = None

    def log(self, metrics: dict, step: int | None = None) -> None:
        self._guard("log", lambda run: run.log(metrics, step=step))

    def summarise(self, final: dict) -> None:
        scalars = {k: v for k, v in final.items() if not isinstance(v, (list, dict))}
        self._guard("write the summary", lambda run: run.summary.update(scalars))
        if "osc_count_hist" in final:
            self.log({"osc/count_per_weight": count_histogram(final["osc_count_hist"])})

    def finish(self, ok: bool) -> None:
        self._guard("finish", lambda run: run.finish(exit_code=0 if ok else 1))
        self.run = None


class Recorder:
    """Context manager around one run: keeps `results.json` current after every epoch,
    mirrors to W&B when `logger.name == "wandb"`, and always finishes the W&B run (so a
    failed job in a sequential multirun cannot swallow the next one)."""

    def __init__(
        self,
        run_dir: Path,
        config: dict,
        logger: LoggerConfig,
        labels: dict[str, str],
        name: str,
        machine_info: dict,
        resume: dict | None = None,
        writes: bool = True,
    ) -> None:
        """`labels`: what ran (`method`, `bits`: e.g. lsq+dampen, w2a32); `name`: the run's
        name in W&B. `resume`: the checkpoint a resumed run continues from; its epochs, its
        wall time so far and the W&B run of the earlier attempt carry on. `writes`: false
        on every process of a multi-process run but rank 0's, which keep the record in
        memory only (no file, no W&B)."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RESULTS
        self.logger = logger
        self.labels = labels
        self.start = time.time() - (resume["elapsed_s"] if resume else 0.0)
        self.writes = writes
        previous = self._previous() if writes else {}
        history = list(resume["history"]) if resume else []
        self.data: dict[str, Any] = {
            "status": "running",
            **labels,
            "name": name,
            "key": run_key(config),
            "run_dir": str(self.run_dir.resolve()),
            "command": " ".join(sys.argv),
            "config": config,
            "history": history,
            "resumed_at_epoch": len(history) if resume else None,
            "attempts": previous.get("attempts", 1) + 1 if resume else 1,
            "final": {},
            "versions": versions(),
            "machine": machine_info,
            "wall_time_s": 0.0,
        }
        self.wandb_id = previous.get("wandb", {}).get("id") if resume else None
        self.mirror = (
            WandbMirror(logger, self.run_dir) if writes and logger.name == "wandb" else None
        )

    def _previous(self) -> dict:
        """The record already in the run directory; a damaged one is set aside and said so."""
        if not self.path.exists():
            return {}
        try:
            return read_json(self.path)
        except (DamagedFile, OSError) as e:
            aside = set_aside(self.path)
            warn(f"{e}; kept as {aside} and replaced by this run's record")
            return {}

    def __enter__(self) -> Recorder:
        self._save()
        if self.mirror is not None:
            cfg = self.data["config"]
            info = self.mirror.start(
                cfg,
                self.data["name"],
                self.labels["method"],
                run_tags(cfg, self.labels["bits"]),
                self.wandb_id,
            )
            if info is not None:
                self.data["wandb"] = info
                self._save()
        return self

    def log_epoch(self, record: dict) -> None:
        self.data["history"].append(record)
        self._save()
        if self.mirror is not None:
            metrics = flatten_epoch(record)
            if record.get("osc"):
                metrics["osc/count_hist"] = count_histogram(record["osc"]["count_hist"])
            self.mirror.log(metrics, step=record["epoch"])

    def finish(self, final: dict) -> None:
        """Record the final metrics (W&B: in the summary, plus the per-weight oscillation
        count histogram)."""
        self.data["final"] = final
        self.data["status"] = "completed"
        self._save()
        if self.mirror is not None:
            self.mirror.summarise(final)

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if isinstance(exc, INTERRUPTS):  # from outside: not the run's failure
            epoch = len(self.data["history"])
            self.data["status"] = "interrupted"
            self.data["error"] = f"interrupted by {signal_of(exc).name} after epoch {epoch}"
            self._save()
            exc.record, exc.epoch = self.path, epoch  # for the line the command prints
        elif exc is not None:
            self.data["status"] = "failed"
            self.data["error"] = "".join(traceback.format_exception(exc_type, exc, tb))
            self._save()
        if self.mirror is not None:
            self.mirror.finish(ok=exc is None)

    @property
    def elapsed(self) -> float:
        """Wall time of the run so far, every attempt up to the checkpoint it resumed from."""
        return time.time() - self.start

    def _save(self) -> None:
        self.data["wall_time_s"] = self.elapsed
        if self.writes:
            write_json_atomic(self.path, self.data)


def load_results(run_dir: Path) -> dict:
    return read_json(Path(run_dir) / RESULTS)


def print_summary(spec: RunSpec, results: dict, path: Path) -> None:
    """The end-of-run summary: accuracy, oscillation, where the record and W&B files are."""
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
