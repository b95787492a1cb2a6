"""Run records: `results.json` written atomically in the run directory, mirrored to W&B
(`oscbench.records.wandb`). The local record is the source of truth: it says whether a run
completed, failed (with the error) or is still running, whatever a scheduler says."""

from __future__ import annotations

import platform
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

from oscbench.records.console import warn
from oscbench.records.files import DamagedFile, read_json, set_aside, write_json_atomic
from oscbench.records.interrupt import INTERRUPTS, signal_of
from oscbench.records.runs import RESULTS, run_key
from oscbench.records.wandb import (
    LoggerConfig,
    WandbMirror,
    count_histogram,
    flatten_epoch,
    run_tags,
)


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
