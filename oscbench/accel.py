"""How a run uses its device: bf16 autocast and channels_last inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oscbench.config import TrainerConfig


@dataclass
class Accel:
    """bf16 autocast (quantizers still compute in fp32) and channels_last inputs."""

    bf16: bool = False
    channels_last: bool = False

    @classmethod
    def resolve(cls, cfg: TrainerConfig, device: torch.device) -> Accel:
        cuda = device.type == "cuda"
        return cls(
            bf16=cfg.precision == "bf16" or (cfg.precision == "auto" and cuda),
            channels_last=cfg.channels_last == "always" or (cfg.channels_last == "auto" and cuda),
        )

    def autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return (
            x.contiguous(memory_format=torch.channels_last)
            if self.channels_last and x.dim() == 4
            else x
        )


def deterministic_cpu(compiled: bool) -> None:
    """Deterministic algorithms, without their debugging aid of filling every new tensor
    with NaN (an extra memory pass per allocation; results do not depend on it).

    `torch.use_deterministic_algorithms` also sets torch.compile's flag, for which it
    imports torch._inductor: 0.9 s of start-up on a 2-core CPU. An eager run needs only
    ATen's flag, which is all that function sets besides (torch 2.14, pinned)."""
    if compiled:
        torch.use_deterministic_algorithms(True)
    else:
        torch._C._set_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
