"""Per-epoch checkpoints, written atomically, and what a resume restores from them.

A checkpoint holds the model (with quantizer, tracker and policy buffers), optimizer,
scheduler, the policies' own state, RNG states, epoch, step and history, plus a
fingerprint of the configuration so that a run directory never resumes a different run.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oscbench.registry import ConfigError
from oscbench.runs import fingerprint

CHECKPOINT = "checkpoint.pt"
FINAL_MODEL = "model_final.pt"


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same directory, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    """The run directory's checkpoint, if any; refuses one of another configuration."""
    path = run_dir / CHECKPOINT
    if not path.exists():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    mine, theirs = fingerprint(config), ckpt["fingerprint"]
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
        shown = ", ".join(f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in diff[:5])
        raise ConfigError(
            f"{path} was written by another configuration ({shown}); "
            "start over there with trainer.resume=never, or choose another hydra.run.dir"
        )
    return ckpt
