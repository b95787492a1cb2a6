"""`init_from=`: start a run from full-precision weights on disk (nothing is downloaded).

Accepts an oscbench run directory (its `model_final.pt`, else its `checkpoint.pt`), an
oscbench checkpoint file, or a plain state dict such as a timm weights file (`.pth`, `.pt`,
`.bin`, `.safetensors`). Tensors are matched by name and shape. With `init_strict` (the
default) every tensor of the model must be filled, except the classifier's when its shape
differs (another number of classes: it keeps its fresh initialisation); without it,
whatever matches is loaded. Either way the run says what was loaded and what was not.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from oscbench.records.checkpoint import CHECKPOINT, FINAL_MODEL
from oscbench.records.console import say
from oscbench.records.files import DamagedFile
from oscbench.records.runs import RESULTS
from oscbench.registry import ConfigError


def read_state_dict(path: Path, key: str = "init_from") -> dict[str, torch.Tensor]:
    """The state dict in `path`; errors name the setting it came from (`key`)."""
    if not path.exists():
        raise ConfigError(f"{key}={path}: no such file or directory")
    if path.is_dir():
        for name in (FINAL_MODEL, CHECKPOINT):
            if (path / name).exists():
                return read_state_dict(path / name, key)
        raise ConfigError(f"{key}={path}: a directory without {FINAL_MODEL} or {CHECKPOINT}")
    if path.suffix == ".json":
        head = f"{path.parent}, its run directory" if path.name == RESULTS else "a weights file"
        raise ConfigError(f"{key}={path} is a JSON file (a run's record), not weights; give {head}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=path.name != CHECKPOINT)
    except Exception as e:  # truncated, corrupt, or not a weights file at all
        first = (str(e).strip().splitlines() or [""])[0][:200]  # torch's advice is for pickles
        raise DamagedFile(
            f"{key}={path} cannot be read as PyTorch or safetensors weights "
            f"({type(e).__name__}: {first}); is it complete, and a weights file?"
        ) from None
    for wrapper in ("model", "state_dict", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if isinstance(state, dict) and any("weight_quantizer." in str(k) for k in state):
        raise ConfigError(
            f"{key}={path} holds a quantized model (a QAT run's, with its quantizers' state); "
            f"{key} takes full-precision weights: give an fp run (method=fp) or {key}=fp"
        )
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DamagedFile(
            f"{key}={path} holds a {type(state).__name__}, not a state dict of tensors; "
            "give a model's state_dict (or an oscbench run directory)"
        )
    return state


def _classifier(model: nn.Module) -> str | None:
    """The last Conv2d or Linear in module order (the layer a new number of classes changes)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return names[-1] if names else None


def _listed(keys: list[str], target: dict, head: str | None, most: int = 8) -> str:
    """The modules the tensors `keys` belong to, in model order, the classifier marked."""
    modules = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in target if k in set(keys)))
    names = [f"{m} (classifier)" if m == head else m for m in modules]
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def load_weights(model: nn.Module, path: Path, strict: bool) -> dict:
    """Copy matching tensors into `model` and say what was loaded; returns what was loaded,
    skipped (shape differs) and missing (not in the file)."""
    source = read_state_dict(path)
    target = model.state_dict()
    matched = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
    skipped = sorted(k for k in source if k not in matched and k in target)
    missing = sorted(k for k in target if k not in matched and k not in skipped)
    head = _classifier(model)
    fresh_head = [k for k in skipped if head and k.rsplit(".", 1)[0] == head]
    unfilled = [k for k in [*skipped, *missing] if k not in fresh_head]
    if not any(k.endswith("weight") for k in matched) or (strict and unfilled):
        hint = "; init_strict=false loads what matches" if matched else ""
        raise ConfigError(
            f"init_from={path} fills only {len(matched)} of the model's {len(target)} tensors "
            f"(not filled: {_listed(unfilled, target, head)}): is it a checkpoint of the same "
            f"model?{hint}"
        )
    model.load_state_dict(matched, strict=False)
    note = f"oscbench: init_from={path}: loaded {len(matched)} of {len(target)} tensors"
    if fresh_head:
        note += f"; kept fresh, shape differs: {_listed(fresh_head, target, head)}"
    if unfilled:
        note += f"; not filled: {_listed(unfilled, target, head)}"
    say(note)
    return {"from": str(path), "loaded": len(matched), "skipped": skipped, "missing": missing}
