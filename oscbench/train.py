"""The training loop: optimizer, schedule, policy hooks, tracking, eval, BN re-estimation."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from oscbench.checkpoint import rng_state, set_rng_state
from oscbench.config import TrainerConfig
from oscbench.data import Data
from oscbench.oscillation import model_stats, update_trackers
from oscbench.oscillation.policy import Policy
from oscbench.quant import quantizer_parameters


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


def build_optimizer(model: nn.Module, cfg: TrainerConfig) -> torch.optim.Optimizer:
    """Model weights in one group (with weight decay), quantizer parameters in their own
    group with `quant_lr` and no weight decay."""
    qparams = quantizer_parameters(model)
    qids = {id(p) for p in qparams}
    groups = [
        {
            "params": [p for p in model.parameters() if id(p) not in qids],
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
        }
    ]
    if qparams:
        groups.append({"params": qparams, "lr": cfg.quant_lr, "weight_decay": 0.0})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def cosine_with_warmup(
    opt: torch.optim.Optimizer, total: int, warmup: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (per step)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@dataclass
class Accel:
    """How the loop runs on its device: bf16 autocast and channels_last inputs."""

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


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Data, batch_size: int, accel: Accel | None = None
) -> dict[str, float]:
    """Test loss and accuracy (%) in eval mode."""
    accel = accel or Accel()
    model.eval()
    loss = torch.zeros((), device=data.device)
    correct = torch.zeros((), device=data.device, dtype=torch.long)
    n = 0
    for x, y in data.test_batches(batch_size):
        with accel.autocast(data.device):
            logits = model(accel.input(x))
        loss += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        n += len(y)
    return {"loss": loss.item() / n, "acc": 100.0 * correct.item() / n}


@torch.no_grad()
def reestimate_bn(model: nn.Module, data: Data, batches: int, batch_size: int) -> None:
    """Recompute BN running statistics as a plain average over training batches of the
    final (quantized) model (Nagel et al. 2022, Sec. 5). Trackers are not updated."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or batches == 0:
        return
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    model.train()
    for i, (x, _) in enumerate(data.train_batches(epoch=-1, batch_size=batch_size)):
        if i == batches:
            break
        model(x)
    for bn, mom in zip(bns, saved, strict=True):
        bn.momentum = mom


def train_step(
    model: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    opt: torch.optim.Optimizer,
    policies: list[Policy],
    accel: Accel,
    step: int,
    total: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One optimizer step: policies' on_step_start -> forward, task loss + policies' extra
    losses -> backward -> after_backward -> optimizer step -> policies' on_step_end ->
    tracker update (so the trackers see weights as the policies leave them, frozen ones at
    their frozen codes, as in Nagel et al.'s code). Returns the detached task loss, extra
    loss (or None) and the outputs."""
    for p in policies:
        p.on_step_start(step, total)
    with accel.autocast(x.device):
        logits = forward(accel.input(x))
        loss = loss_fn(logits.float(), y)
        extras = [t for p in policies if (t := p.extra_loss(model)) is not None]
    extra = sum(extras) if extras else None
    opt.zero_grad(set_to_none=True)
    (loss + extra if extra is not None else loss).backward()
    for p in policies:
        p.after_backward(model)
    opt.step()
    for p in policies:
        p.on_step_end(model)
    update_trackers(model)
    return loss.detach(), None if extra is None else extra.detach(), logits.detach()


def train(
    model: nn.Module,
    data: Data,
    cfg: TrainerConfig,
    policies: list[Policy],
    osc_threshold: float,
    on_epoch: Callable[[dict], None],
    resume: dict | None = None,
    save: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train for `cfg.epochs` plus any policy's extra epochs (run at the policy's constant
    `phase_lr`); after each epoch `save(state)` a checkpoint, then `on_epoch(record)`.
    With `resume` (a checkpoint), continue after its epoch. Returns the whole history.
    Each optimizer step is `train_step`, then the schedule's step."""
    steps_per_epoch = data.steps_per_epoch(cfg.batch_size)
    main_steps = cfg.epochs * steps_per_epoch
    extra_epochs = sum(p.extra_epochs for p in policies)
    total = main_steps + extra_epochs * steps_per_epoch
    phase_lr = next((p.phase_lr for p in policies if p.phase_lr is not None), None)
    device = data.device
    accel = Accel.resolve(cfg, device)
    if accel.channels_last:
        model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if cfg.compile else model
    opt = build_optimizer(model, cfg)
    sched = cosine_with_warmup(opt, main_steps, round(cfg.warmup_fraction * main_steps))
    for p in policies:
        p.setup(model, total, steps_per_epoch)
    history: list[dict] = []
    step = start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        for p, state in zip(policies, resume["policies"], strict=True):
            p.load_state_dict(state)
        set_rng_state(resume["rng"])
        history, step, start = list(resume["history"]), resume["step"], resume["epoch"]
    epochs = cfg.epochs + extra_epochs
    for epoch in range(start, epochs):
        model.train()
        loss_sum = torch.zeros((), device=device)
        extra_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        if epoch >= cfg.epochs and phase_lr is not None:
            for group in opt.param_groups:
                group["lr"] = phase_lr
        lr = opt.param_groups[0]["lr"]
        for x, y in data.train_batches(epoch, cfg.batch_size):
            loss, extra, logits = train_step(
                model, forward, x, y, opt, policies, accel, step, total
            )
            if step + 1 < main_steps:
                sched.step()
            with torch.no_grad():
                loss_sum += loss * len(y)
                if extra is not None:
                    extra_sum += extra * len(y)
                correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            step += 1
        if not torch.isfinite(loss_sum):  # checked once an epoch: no host sync per step
            raise FloatingPointError(
                f"training diverged: the loss is {loss_sum.item()} in epoch {epoch + 1} "
                f"(trainer.lr={cfg.lr}); lower the learning rate"
            )
        val = evaluate(model, data, cfg.eval_batch_size, accel)
        record = {
            "epoch": epoch + 1,
            "step": step,
            "lr": lr,
            "train_loss": loss_sum.item() / seen,
            "train_acc": 100.0 * correct.item() / seen,
            "val_loss": val["loss"],
            "val_acc": val["acc"],
        }
        if policies:
            record["extra_loss"] = extra_sum.item() / seen
            for p in policies:
                record.update(p.metrics())
        osc = model_stats(model, osc_threshold)
        if osc is not None:
            record["osc"] = osc
        history.append(record)
        if save is not None:
            save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "policies": [p.state_dict() for p in policies],
                    "rng": rng_state(),
                    "epoch": epoch + 1,
                    "step": step,
                    "history": history,
                }
            )
        on_epoch(record)
    return history
