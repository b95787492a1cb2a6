"""The CPU's stand-in for `torch.cuda.set_sync_debug_mode("error")` (bench/gpu_check.py
runs that on a GPU): a dispatch mode that notes every op which, on a CUDA tensor, makes
the host wait for the device, each with the oscbench line that called it."""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# On CUDA each of these reads a device value on the host: a scalar (`.item()`, `bool(t)`,
# `if t:`), a result whose size depends on the data (nonzero, masked_select, boolean
# indexing, unique), or bincount's length (its maximum, read even with `minlength`).
SYNCING = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.bincount.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}
PACKETS = {op.overloadpacket for op in SYNCING}  # every overload of each


def _boolean_index(func, args: tuple) -> bool:  # noqa: ANN001
    """x[mask] and x[mask] = y: on CUDA the mask's nonzero elements are counted on the host
    (the CPU does it inside one kernel, so no nonzero op shows)."""
    if func.overloadpacket not in (aten.index, aten.index_put, aten.index_put_):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices)


class HostSyncs(TorchDispatchMode):
    """`found`: (op, the innermost oscbench frame that called it) for each syncing op."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func.overloadpacket in PACKETS or _boolean_index(func, args):
            frames = [f for f in traceback.extract_stack() if "/oscbench/" in f.filename]
            last = frames[-1] if frames else None
            where = f"{last.filename.split('/oscbench/')[-1]}:{last.lineno}" if last else "?"
            self.found.append((str(func.overloadpacket), where))
        return func(*args, **(kwargs or {}))
