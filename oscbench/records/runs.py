"""Run identity: which runs are the same, where a completed one is, and locks so that
parallel jobs never train the same run twice.

A run is identified by a fingerprint of its resolved config (the values that determine its
results), not by its directory. A full-precision run without policies does not depend on
the bit-widths, so `method=fp` at bits 2, 3 and 4 is one run, trained once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from oscbench.records.console import warn
from oscbench.records.files import DamagedFile, read_json

RESULTS = "results.json"
# labels and settings that do not change a run's results (`method` names the components,
# which are in the config themselves: quantizer, policy, ptq)
NOT_RESULTS = (
    "logger",
    "trainer.resume",
    "device",
    "jobs_per_gpu",
    "trainer.dist_timeout_s",
    "trainer.check_sync",
    "data_dir",
    "tune",
    "method",
    "init_strict",
    "export",
    "probe",  # measures the trained weights and leaves training as it is
)
FP_UNUSED = ("act_quantizer", "oscillation", "qkr")  # meaningless without quantized weights
BITS = ("bits", "act_bits", "first_last", "first_last_bits")
OPTIONAL = ("bn_fold",)  # left out while off (`enabled: false`), as in runs from before it
# options added to a component after runs with it existed: left out at the value that
# reproduces those runs, so that they are found again
NEUTRAL = {
    "policy.osci_reset.strength": 1.0,
    "policy.osci_reset.noise": 0.0,
    "trainer.milestones": [0.5, 0.75],
    "trainer.gamma": 0.1,
    "trainer.no_weight_decay": "none",
    "quantizer.levels": "uniform",  # PARQ's
    "quantizer.center": False,  # PARQ's
    "quantizer.optimal": False,  # PARQ's (LSBQ)
    "quantizer.optimal_rows": "reference",  # PARQ's (LSBQ optimal per channel)
}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def _drop(flat: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {
        k: v for k, v in flat.items() if not any(k == n or k.startswith(n + ".") for n in names)
    }


def fingerprint(config: dict) -> dict[str, Any]:
    """The resolved config's values that determine a run's results, flattened."""
    flat = _drop(_flat(config), NOT_RESULTS)
    flat = _drop(flat, tuple(k for k in OPTIONAL if not config.get(k, {}).get("enabled")))
    flat = {k: v for k, v in flat.items() if k not in NEUTRAL or v != NEUTRAL[k]}
    if config.get("quantizer", {}).get("name") == "none":
        flat = _drop(flat, FP_UNUSED)
        if trains_alone(config) and config.get("init_from") in (None, "fp"):
            flat.pop("init_from", None)
            flat.pop("trainer.finetune_lr", None)
            flat.pop("trainer.finetune_epochs", None)
        if trains_alone(config) and config.get("teacher") in (None, "fp"):
            flat = _drop(flat, ("teacher", "distill"))
        if bits_free(config):
            flat = _drop(flat, BITS)
    elif config.get("act_quantizer", {}).get("name") == "none":
        flat.pop("act_bits", None)  # activations stay in full precision
    return flat


def trains_alone(config: dict) -> bool:
    """A full-precision run without policies (fp, ptq) neither starts from nor distils the
    fp run: `init_from=fp` and `teacher=fp` apply to quantized runs and to FP runs with a
    policy (osc_reg, which Wenshoj et al. fine-tune from an FP model)."""
    return config["quantizer"]["name"] == "none" and not config.get("policy")


def bits_free(config: dict) -> bool:
    """A full-precision run without policies or rounding (`fp`) does not depend on the
    bit-widths: one run serves every bit-width of a sweep."""
    return (
        config["quantizer"]["name"] == "none" and not config.get("policy") and not config.get("ptq")
    )


def run_key(config: dict) -> str:
    """A short stable hash of the fingerprint."""
    text = json.dumps(fingerprint(config), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def scan_records(root: Path) -> Iterator[tuple[Path, dict]]:
    """Every results.json below `root` with its record; a file that cannot be read is
    reported (its path and why) and passed over."""
    for path in sorted(Path(root).rglob(RESULTS)):
        try:
            yield path, read_json(path)
        except DamagedFile as e:
            warn(f"{e}; passed over")
        except OSError as e:
            warn(f"cannot read {path} ({e.strerror or e}); passed over")


def find_completed(root: Path, key: str) -> Path | None:
    """The directory of a completed run with this key anywhere below `root`."""
    for path, record in scan_records(root):
        if record.get("status") == "completed" and record.get("key") == key:
            return path.parent
    return None


@contextmanager
def run_lock(root: Path, key: str) -> Iterator[None]:
    """Exclusive lock for one run key below `root` (advisory, fcntl; on a cluster the
    sweep directory must be on a filesystem with working locks)."""
    lock_dir = Path(root) / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{key}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
