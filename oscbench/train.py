"""The training loop: optimizer, schedule, policy hooks, tracking, per-epoch evaluation."""

from __future__ import annotations

import copy
import functools
import itertools
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from oscbench.accel import Accel
from oscbench.checkpoint import CHECKPOINT, rng_state, set_rng_state
from oscbench.config import TrainerConfig
from oscbench.data.base import Data
from oscbench.evaluation import evaluate
from oscbench.files import DamagedFile
from oscbench.oscillation.policy import Policy, Schedule
from oscbench.oscillation.tracker import OscillationTracker
from oscbench.quant.modules import quantized_layers, quantizer_parameters

PROBE_STREAM = 1 << 20  # batches of Policy.on_epoch_start's probes: epochs apart from training's


def build_optimizer(model: nn.Module, cfg: TrainerConfig) -> torch.optim.Optimizer:
    """Named parameter groups (policies address them by name): "other" (every parameter
    that is neither a quantized layer's weight nor a quantizer's) and "latent" (the
    quantized layers' weights), both at `lr` with weight decay, and "quantizer" at
    `quant_lr` without. Empty groups are left out."""
    qparams = quantizer_parameters(model)
    latent = [layer.weight for _, layer in quantized_layers(model)]
    taken = {id(p) for p in qparams} | {id(p) for p in latent}
    groups = [
        {
            "name": "other",
            "params": [p for p in model.parameters() if id(p) not in taken],
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
        },
        {"name": "latent", "params": latent, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"name": "quantizer", "params": qparams, "lr": cfg.quant_lr, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
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


def train_step(
    model: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    opt: torch.optim.Optimizer,
    policies: list[Policy],
    tracker: OscillationTracker | None,
    accel: Accel,
    step: int,
    total: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One optimizer step: policies' on_step_start -> forward, task loss + policies' extra
    losses -> backward -> after_backward -> optimizer step (inside the policies'
    optimizer_step wrappers, the first policy's outermost) -> policies' on_step_end ->
    weight quantizers' after_step -> tracker update (so the tracker sees weights as the
    policies leave them, frozen ones at their frozen codes, as in Nagel et al.'s code, and
    the codes the next forward uses). Returns the detached task loss, extra loss (or None)
    and the outputs."""
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
    step_fn = opt.step
    for p in reversed(policies):
        step_fn = _wrapped(p, opt, step_fn)
    step_fn()
    for p in policies:
        p.on_step_end(model)
    for _, layer in quantized_layers(model):
        layer.weight_quantizer.after_step(layer.weight)
    if tracker is not None:
        tracker.update()
    return loss.detach(), None if extra is None else extra.detach(), logits.detach()


def _wrapped(policy: Policy, opt: torch.optim.Optimizer, inner: Callable) -> Callable[[], None]:
    return lambda: policy.optimizer_step(opt, inner)


def probe_steps(
    n: int,
    policy: Policy,
    *,
    model: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    opt: torch.optim.Optimizer,
    data: Data,
    cfg: TrainerConfig,
    accel: Accel,
    epoch: int,
    step: int,
    total: int,
) -> Iterator[int]:
    """`Policy.on_epoch_start`'s probe: n training steps with `policy` alone, on batches of
    a stream of their own (seeded by the epoch, apart from the training epochs'), yielding
    the probe step's index after each; then model, optimizer, the policy's state and the
    random state are restored, also if the caller stops early."""
    saved = [copy.deepcopy(x.state_dict()) for x in (model, opt, policy)]
    rng = rng_state()
    batches = itertools.chain.from_iterable(
        data.train_batches(PROBE_STREAM + epoch * 1024 + k, cfg.batch_size)
        for k in itertools.count()
    )
    try:
        for i, (x, y) in zip(range(n), batches, strict=False):
            train_step(model, forward, x, y, opt, [policy], None, accel, step, total)
            yield i
    finally:
        for x, state in zip((model, opt, policy), saved, strict=True):
            x.load_state_dict(state)
        set_rng_state(rng)


def schedule(data: Data, cfg: TrainerConfig) -> Schedule:
    """The run's optimizer steps: the main epochs, then `cfg.extra_epochs`."""
    per_epoch = data.steps_per_epoch(cfg.batch_size)
    main = cfg.epochs * per_epoch
    return Schedule(total=main + cfg.extra_epochs * per_epoch, main=main, per_epoch=per_epoch)


def train(
    model: nn.Module,
    data: Data,
    cfg: TrainerConfig,
    policies: list[Policy],
    tracker: OscillationTracker | None,
    osc_threshold: float,
    on_epoch: Callable[[dict], None],
    resume: dict | None = None,
    save: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train for `cfg.epochs`, then `cfg.extra_epochs` at the constant `cfg.extra_lr` (or
    where the schedule ended); after each epoch `save(state)` a checkpoint, then
    `on_epoch(record)`. With `resume` (a checkpoint), continue after its epoch. Returns the
    whole history. Each optimizer step is `train_step`, then the schedule's step."""
    steps = schedule(data, cfg)
    device = data.device
    accel = Accel.resolve(cfg, device)
    if accel.channels_last:
        model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if cfg.compile else model
    opt = build_optimizer(model, cfg)
    sched = cosine_with_warmup(opt, steps.main, round(cfg.warmup_fraction * steps.main))
    history: list[dict] = []
    step = start = 0
    if resume is not None:
        try:
            model.load_state_dict(resume["model"])
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
            for p, state in zip(policies, resume["policies"], strict=True):
                p.load_state_dict(state)
            if tracker is not None:
                tracker.load_state_dict(resume["tracker"])
        except (RuntimeError, ValueError, KeyError) as e:  # e.g. from an older oscbench
            raise DamagedFile(
                f"the run directory's {CHECKPOINT} does not fit this run ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:300]}); remove it to train this run from the start, "
                "or start over with trainer.resume=never"
            ) from None
        set_rng_state(resume["rng"])
        history, step, start = list(resume["history"]), resume["step"], resume["epoch"]
    epochs = cfg.epochs + cfg.extra_epochs
    for epoch in range(start, epochs):
        model.train()
        loss_sum = torch.zeros((), device=device)
        extra_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        if epoch >= cfg.epochs and cfg.extra_lr is not None:
            for group in opt.param_groups:
                group["lr"] = cfg.extra_lr
        lr = opt.param_groups[0]["lr"]
        probe = functools.partial(
            probe_steps,
            model=model,
            forward=forward,
            opt=opt,
            data=data,
            cfg=cfg,
            accel=accel,
            epoch=epoch,
            step=step,
            total=steps.total,
        )
        for p in policies:
            p.on_epoch_start(epoch, probe)
        for x, y in data.train_batches(epoch, cfg.batch_size):
            loss, extra, logits = train_step(
                model, forward, x, y, opt, policies, tracker, accel, step, steps.total
            )
            if step + 1 < steps.main:
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
        osc = tracker.stats(osc_threshold) if tracker is not None else None
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
                    "tracker": tracker.state_dict() if tracker is not None else None,
                    "rng": rng_state(),
                    "epoch": epoch + 1,
                    "step": step,
                    "history": history,
                }
            )
        on_epoch(record)
    return history
