"""How a run uses its device: bf16 autocast and channels_last inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oscbench.training.config import TrainerConfig


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


def compile_refused(device: torch.device) -> str | None:
    """Why `trainer.compile` must not train on `device` with this torch, or None.

    torch 2.14's Inductor generates wrong AVX2 kernels for the backward pass of BatchNorm,
    ReLU, average pooling and a Linear layer in a row, the tail of most CNNs (cnn_small's,
    ResNets', MobileNets'): measured under ATEN_CPU_CAPABILITY=avx2, the input gradient of
    that chain came out inf (eager: finite), and a compiled LSQ run of cnn_small had NaN
    weights after its first step. Its AVX-512 and unvectorised kernels are right, and so
    are torch 2.13.0's AVX2 ones."""
    capability = torch.backends.cpu.get_cpu_capability()
    if device.type == "cpu" and torch.__version__.startswith("2.14.") and capability == "AVX2":
        return (
            f"trainer.compile=true on this CPU's AVX2 code with torch {torch.__version__}: "
            "its compiler computes wrong gradients for BatchNorm -> ReLU -> pooling -> "
            "Linear (NaN weights after one step); use trainer.compile=false (eager), or "
            "torch 2.13, or a GPU (device=cuda)"
        )
    return None


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
