"""`init_from=`: start a run from full-precision weights on disk (nothing is downloaded).

Accepts an oscbench run directory (its `model_final.pt`, else its `checkpoint.pt`), an
oscbench checkpoint file, or a plain state dict such as a timm weights file (`.pth`, `.pt`,
`.bin`, `.safetensors`). Tensors are matched by name and shape; the rest (a classifier
with another number of classes, quantizer or tracker state) is reported and skipped.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from oscbench.checkpoint import CHECKPOINT, FINAL_MODEL
from oscbench.registry import ConfigError


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise ConfigError(f"init_from={path}: no such file or directory")
    if path.is_dir():
        for name in (FINAL_MODEL, CHECKPOINT):
            if (path / name).exists():
                return read_state_dict(path / name)
        raise ConfigError(f"init_from={path}: a directory without {FINAL_MODEL} or {CHECKPOINT}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=path.name != CHECKPOINT)
    for key in ("model", "state_dict", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_weights(model: nn.Module, path: Path) -> dict:
    """Copy matching tensors into `model`; returns what was loaded, skipped and missing."""
    source = read_state_dict(path)
    target = model.state_dict()
    matched = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
    if not any(k.endswith("weight") for k in matched):
        raise ConfigError(
            f"init_from={path}: none of its weights fits this model (names or shapes differ); "
            "is it a checkpoint of the same model?"
        )
    model.load_state_dict(matched, strict=False)
    return {
        "from": str(path),
        "loaded": len(matched),
        "skipped": sorted(k for k in source if k not in matched and k in target),
        "missing": sorted(k for k in target if k not in matched),
    }
