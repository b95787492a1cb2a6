"""The W&B mirror of a run's record (`logger:`): a failure is reported once and never stops,
stalls or changes the record; an online run that cannot reach its server logs offline
(upload later with `wandb sync`)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from oscbench.records.console import warn
from oscbench.registry import check

# logger.mode, and W&B's older names for two of them (WANDB_MODE=dryrun, run)
WANDB_MODES = {
    "offline": "offline",
    "online": "online",
    "disabled": "disabled",
    "dryrun": "offline",
    "run": "online",
}


@dataclass
class LoggerConfig:
    name: str  # wandb | none
    mode: str  # offline (no account needed) | online | disabled; default: $WANDB_MODE, else offline
    project: str
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    connect_timeout: float = 5.0  # online: seconds to reach the server before logging offline
    init_timeout: float = 30.0  # seconds W&B's client may take to start a run

    def __post_init__(self) -> None:
        check(self.name in ("wandb", "none"), "name", self.name, "wandb, none")
        check(
            self.mode in WANDB_MODES,
            "mode",
            self.mode,
            "offline, online, disabled (or W&B's dryrun, run; also read from $WANDB_MODE)",
        )
        self.mode = WANDB_MODES[self.mode]
        check(self.connect_timeout > 0, "connect_timeout", self.connect_timeout, "> 0")
        check(self.init_timeout > 0, "init_timeout", self.init_timeout, "> 0")


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
