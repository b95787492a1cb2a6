"""Run records: `results.json` written atomically in the run directory, mirrored to W&B.

The local record is the source of truth (W&B is a mirror): it says whether a run
completed, failed (with the error) or is still running, whatever a scheduler says.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

from oscbench.config import LoggerConfig
from oscbench.runs import RESULTS, run_key


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file in the same directory, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("oscbench", "torch", "torchvision", "timm", "hydra-core", "wandb", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def run_tags(config: dict) -> list[str]:
    """W&B tags that make runs easy to filter: bit-widths, model, dataset, seed."""
    return [
        f"w{config.get('bits')}a{config.get('act_bits')}",
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
        for key in ("osc_share", "mean_freq", "crossings", "oscillations"):
            flat[f"osc/{key}"] = osc[key]
        for name, layer in osc["layers"].items():
            for key in ("osc_share", "mean_freq", "crossings"):
                flat[f"osc_layer/{name}/{key}"] = layer[key]
    return flat


class Recorder:
    """Context manager around one run: keeps `results.json` current after every epoch,
    mirrors to W&B when `logger.name == "wandb"`, and always finishes the W&B run (so a
    failed job in a sequential multirun cannot swallow the next one)."""

    def __init__(
        self,
        run_dir: Path,
        config: dict,
        logger: LoggerConfig,
        name: str,
        history: list[dict] | None = None,
    ) -> None:
        """`history`: epochs restored from a checkpoint (a resumed run); the W&B run of
        the earlier attempt, if recorded, is continued."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RESULTS
        self.logger = logger
        self.name = name
        self.start = time.time()
        previous = json.loads(self.path.read_text()) if history and self.path.exists() else {}
        self.wandb_id = previous.get("wandb", {}).get("id")
        self.data: dict[str, Any] = {
            "status": "running",
            "name": name,
            "key": run_key(config),
            "run_dir": str(self.run_dir.resolve()),
            "command": " ".join(sys.argv),
            "config": config,
            "history": list(history or []),
            "resumed_at_epoch": len(history) if history else None,
            "final": {},
            "versions": versions(),
            "wall_time_s": 0.0,
        }
        self.wandb_run = None

    def __enter__(self) -> Recorder:
        self._save()
        if self.logger.name == "wandb":
            self._init_wandb()
        return self

    def _init_wandb(self) -> None:
        import wandb

        cfg = self.data["config"]
        self.wandb_run = wandb.init(
            project=self.logger.project,
            entity=self.logger.entity,
            group=self.logger.group,
            job_type=cfg.get("method", {}).get("name"),
            tags=[*self.logger.tags, *run_tags(cfg)],
            name=self.name,
            config=cfg,
            dir=str(self.run_dir),
            mode=self.logger.mode,
            reinit="finish_previous",
            id=self.wandb_id,
            resume="allow" if self.wandb_id else None,
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.data["wandb"] = {
            "mode": self.logger.mode,
            "id": self.wandb_run.id,
            "dir": str(Path(self.wandb_run.dir).parent),
        }
        self._save()

    def log_epoch(self, record: dict) -> None:
        self.data["history"].append(record)
        self._save()
        if self.wandb_run is not None:
            metrics = flatten_epoch(record)
            if record.get("osc"):
                metrics["osc/count_hist"] = count_histogram(record["osc"]["count_hist"])
            self.wandb_run.log(metrics, step=record["epoch"])

    def finish(self, final: dict) -> None:
        """Record the final metrics (W&B: in the summary, plus the per-weight oscillation
        count histogram)."""
        self.data["final"] = final
        self.data["status"] = "completed"
        self._save()
        if self.wandb_run is not None:
            self.wandb_run.summary.update(
                {k: v for k, v in final.items() if not isinstance(v, (list, dict))}
            )
            if "osc_count_hist" in final:
                hist = count_histogram(final["osc_count_hist"])
                self.wandb_run.log({"osc/count_per_weight": hist})

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if exc is not None:
            self.data["status"] = "failed"
            self.data["error"] = "".join(traceback.format_exception(exc_type, exc, tb))
            self._save()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=0 if exc is None else 1)
            self.wandb_run = None

    def _save(self) -> None:
        self.data["wall_time_s"] = time.time() - self.start
        write_json_atomic(self.path, self.data)


def load_results(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / RESULTS).read_text())
