"""The training objective: cross-entropy with the labels (with label smoothing) and
knowledge distillation from a frozen full-precision teacher.

Forms (`distill.loss`):
- `soft` (AOQ, muzenc/AOQ at 79f36d2a, `AO_QAT/resnet_imagenet/train.py`: `criterion_kd =
  KD_loss.DistributionLoss()`, the loss is that term alone): the soft cross-entropy
  -sum_c softmax(t/T)_c log softmax(s/T)_c, averaged over the batch, no label term;
- `soft+hard` (OFQ, nbasyl/OFQ at e1c8d1d6, `src/quantization/utils.py:
  KDLossSoftandHard`): the same soft term on the student's distillation head (DeiT's
  `dist_token` head, where the model has one; else the class head) plus the cross-entropy
  of the class head with the labels, 1:1;
- `none`: the cross-entropy with the labels only.
Both references use T = 1 and do not multiply the soft term by T^2 (Hinton et al. do):
`t_squared: false` follows them, `true` is Hinton's scaling. `weight` multiplies the soft
term (both references: 1). Label smoothing applies to the label term.

The teacher is frozen (no gradients), always in eval mode, runs under `no_grad` and under the
student's autocast, on the same (augmented) batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from oscbench.models.pretrained import read_state_dict
from oscbench.registry import ConfigError, check

FORMS = ("none", "soft", "soft+hard")


@dataclass
class DistillConfig:
    loss: str  # none | soft (AOQ) | soft+hard (OFQ)
    temperature: float  # T (AOQ, OFQ: 1)
    weight: float  # the soft term's factor (AOQ, OFQ: 1)
    t_squared: bool  # multiply the soft term by T^2 (Hinton et al.); false: AOQ's, OFQ's
    arch: str | None  # the teacher's architecture: null = the student's model; or a timm name

    def __post_init__(self) -> None:
        check(self.loss in FORMS, "loss", self.loss, ", ".join(FORMS))
        check(self.temperature > 0, "temperature", self.temperature, "a number > 0")
        check(self.weight >= 0, "weight", self.weight, "a number >= 0")


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """-sum_c softmax(teacher/T)_c log softmax(student/T)_c, averaged over the batch."""
    target = F.softmax(teacher.float() / t, dim=1)
    return -(target * F.log_softmax(student.float() / t, dim=1)).sum(1).mean()


def prediction(out: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The logits a model's output predicts with: a distilled DeiT in training returns
    (class head, distillation head), and predicts with their mean (timm's eval output)."""
    return (out[0] + out[1]) / 2 if isinstance(out, tuple) else out


class Objective:
    """`objective(out, x, y)`: the loss of the student's output `out` on inputs `x` with
    labels `y`; `teacher_logits(x)` what the teacher predicts."""

    def __init__(
        self, cfg: DistillConfig | None, label_smoothing: float, teacher: nn.Module | None
    ) -> None:
        self.cfg, self.smoothing, self.teacher = cfg, label_smoothing, teacher

    @property
    def distills(self) -> bool:
        return self.teacher is not None

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        self.teacher.eval()
        return prediction(self.teacher(x)).float()

    def __call__(self, out: torch.Tensor | tuple, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cls_head, dist_head = out if isinstance(out, tuple) else (out, out)
        if not self.distills:
            return F.cross_entropy(prediction(out).float(), y, label_smoothing=self.smoothing)
        cfg = self.cfg
        t = cfg.temperature
        soft = soft_cross_entropy(dist_head, self.teacher_logits(x), t)
        soft = cfg.weight * (t * t if cfg.t_squared else 1.0) * soft
        if cfg.loss == "soft":
            return soft
        return soft + F.cross_entropy(cls_head.float(), y, label_smoothing=self.smoothing)


def build_teacher(
    cfg: DistillConfig,
    path: Path,
    architecture: Callable[[], nn.Module],
    classes: int,
    channels: int,
    device: torch.device,
) -> nn.Module:
    """The teacher: a fresh model of the student's `architecture` (or `cfg.arch`, a timm
    model for `classes` and `channels`) filled, every tensor, from `path` (a run directory,
    an oscbench checkpoint or a weights file), frozen, in eval mode, on `device`."""
    if cfg.arch is None:
        teacher = architecture()
    else:
        import timm

        try:
            teacher = timm.create_model(cfg.arch, num_classes=classes, in_chans=channels)
        except RuntimeError as e:
            raise ConfigError(f"distill.arch={cfg.arch}: {e}; give a timm model name") from None
    state = read_state_dict(path, "teacher")
    target = teacher.state_dict()
    fits = {k: v for k, v in state.items() if k in target and target[k].shape == v.shape}
    missing = [k for k in target if k not in fits]
    if missing:
        raise ConfigError(
            f"teacher={path} does not fill the teacher ({cfg.arch or 'the student model'}): "
            f"{len(missing)} of its {len(target)} tensors missing or of another shape "
            f"({', '.join(missing[:4])}); give the fp run of this model, or set distill.arch"
        )
    teacher.load_state_dict(fits)
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


CROSS_ENTROPY = Objective(None, 0.0, None)


@torch.no_grad()
def kl_to_teacher(
    student: nn.Module, objective: Objective, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> float:
    """Mean KL(teacher || student) over `batches` of (x, y), both in eval mode, at T = 1."""
    student.eval()
    total, n = 0.0, 0
    for x, _ in batches:
        t = F.log_softmax(objective.teacher_logits(x), dim=1)
        s = F.log_softmax(prediction(student(x)).float(), dim=1)
        total += F.kl_div(s, t, log_target=True, reduction="sum").item()
        n += len(x)
    return total / n
