"""Per-epoch checkpoints, written atomically, and what a resume restores from them.

A checkpoint holds the model (with quantizer, tracker and policy buffers), optimizer,
scheduler, the policies' own state, RNG states, epoch, step and history, plus a
fingerprint of the configuration so that a run directory never resumes a different run.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oscbench.records.files import DamagedFile, write_atomic
from oscbench.records.runs import fingerprint
from oscbench.registry import ConfigError

CHECKPOINT = "checkpoint.pt"
FINAL_MODEL = "model_final.pt"
CHECKPOINT_KEYS = (
    "model",
    "optimizer",
    "policies",
    "tracker",
    "ema",
    "rng",
    "epoch",
    "step",
    "history",
)


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same directory, then rename over `path`."""
    write_atomic(path, lambda f: torch.save(obj, f))


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_for_resume(run_dir: Path, config: dict) -> dict | None:
    """The run directory's checkpoint, if any; refuses one of another configuration, and
    one that is damaged (saying which file and what to do)."""
    path = run_dir / CHECKPOINT
    if not path.exists():
        return None
    fix = (
        "remove it to train this run from the start, or start over with "
        "trainer.resume=never (which replaces it)"
    )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, corrupt or foreign: torch raises many kinds
        raise DamagedFile(f"{path} is damaged ({type(e).__name__}: {e}); {fix}") from None
    needed = (*CHECKPOINT_KEYS, "fingerprint", "elapsed_s")
    missing = [k for k in needed if k not in ckpt] if isinstance(ckpt, dict) else list(needed)
    if missing:
        raise DamagedFile(f"{path} is not an oscbench checkpoint (no {', '.join(missing)}); {fix}")
    mine, theirs = fingerprint(config), ckpt["fingerprint"]
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
        shown = ", ".join(f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in diff[:5])
        raise ConfigError(
            f"{path} was written by another configuration ({shown}); "
            "start over there with trainer.resume=never, or choose another hydra.run.dir"
        )
    return ckpt
