"""The training loop: optimizer, schedule, policy hooks, tracking, per-epoch evaluation."""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import itertools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from oscbench.accel import Accel
from oscbench.checkpoint import CHECKPOINT, rng_state, set_rng_state
from oscbench.config import TrainerConfig
from oscbench.data.base import SPLITS, Data
from oscbench.distill import CROSS_ENTROPY, Objective, prediction
from oscbench.distributed import all_sum, check_sync, sync_buffers
from oscbench.evaluation import evaluate
from oscbench.files import DamagedFile
from oscbench.optim import Optimizers, build_optimizers
from oscbench.oscillation.policy import Policy, Schedule
from oscbench.oscillation.tracker import OscillationTracker
from oscbench.quant.modules import quantized_layers

if TYPE_CHECKING:
    from oscbench.ema import ModelEma

PROBE_STREAM = 1 << 20  # batches of Policy.on_epoch_start's probes: epochs apart from training's

# What `train` calls once per optimizer step, as (module, attribute): code that must not make
# a GPU wait for the host (tests/test_host_syncs.py, bench/gpu_check.py watch it).
PER_STEP = (
    ("oscbench.train", "train_step"),
    ("oscbench.optim", "Optimizers.schedule_step"),
    ("oscbench.ema", "ModelEma.update"),
)


@contextlib.contextmanager
def per_step_wrapped(wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """Inside, each of PER_STEP is `wrap(it)`; restored on leaving."""
    saved = []
    for module, path in PER_STEP:
        *parents, name = path.split(".")
        owner = functools.reduce(getattr, parents, importlib.import_module(module))
        saved.append((owner, name, getattr(owner, name)))
    try:
        for owner, name, fn in saved:
            setattr(owner, name, wrap(fn))
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def train_step(
    model: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    opt: Optimizers,
    policies: list[Policy],
    tracker: OscillationTracker | None,
    accel: Accel,
    step: int,
    total: int,
    objective: Callable[..., torch.Tensor] = CROSS_ENTROPY,
    weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One optimizer step: policies' on_step_start -> forward, task loss + policies' extra
    losses -> backward -> after_backward -> optimizer step (inside the policies'
    optimizer_step wrappers, the first policy's outermost) -> policies' on_step_end ->
    weight quantizers' after_step -> tracker update (so the tracker sees weights as the
    policies leave them, frozen ones at their frozen codes, as in Nagel et al.'s code, and
    the codes the next forward uses). `weight` scales the task loss's gradient (a rank's
    share of an unevenly split batch, `Data.shard_weight`). Returns the detached task
    loss, extra loss (or None) and the outputs."""
    for p in policies:
        p.on_step_start(step, total)
    with accel.autocast(x.device):
        x = accel.input(x)
        out = forward(x)
        loss = objective(out, x, y)  # a teacher runs here: under the student's autocast
        logits = prediction(out)
        extras = [t for p in policies if (t := p.extra_loss(model)) is not None]
    extra = sum(extras) if extras else None
    opt.zero_grad(set_to_none=True)
    task = loss * weight if weight != 1.0 else loss
    (task + extra if extra is not None else task).backward()
    for p in policies:
        p.after_backward(model)
    step_fn = opt.step
    for p in reversed(policies):
        step_fn = _wrapped(p, opt, step_fn)
    step_fn()
    for p in policies:
        p.on_step_end(model)
    for _, layer in quantized_layers(model):
        layer.weight_quantizer.after_step(layer.quantizer_input())
    if tracker is not None:
        tracker.update()
    return loss.detach(), None if extra is None else extra.detach(), logits.detach()


def _wrapped(policy: Policy, opt: Optimizers, inner: Callable) -> Callable[[], None]:
    return lambda: policy.optimizer_step(opt, inner)


def probe_steps(
    n: int,
    policy: Policy,
    *,
    model: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    opt: Optimizers,
    data: Data,
    cfg: TrainerConfig,
    accel: Accel,
    objective: Objective,
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
            train_step(model, forward, x, y, opt, [policy], None, accel, step, total, objective)
            yield i
    finally:
        for x, state in zip((model, opt, policy), saved, strict=True):
            x.load_state_dict(state)
        set_rng_state(rng)


def compiled(module: nn.Module, layout_optimization: bool = False) -> nn.Module:
    """`module` under torch.compile (trainer.compile). The memory layout is
    trainer.channels_last's, not the compiler's: Inductor's own layout optimization (its
    default) turns a quantized ResNet's convolutions to channels_last and made its step
    1.32x slower on the CPU, where with it off the compiled step is faster than the eager
    one (bench/README.md)."""
    return torch.compile(module, options={"layout_optimization": layout_optimization})


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
    objective: Objective = CROSS_ENTROPY,
    ema: ModelEma | None = None,
    measure: Callable[[int], dict] | None = None,
) -> list[dict]:
    """Train for `cfg.epochs`, then `cfg.extra_epochs` at `cfg.extra_lr_scale` times each
    group's peak rate (or where the schedule ended); after each epoch `save(state)` a
    checkpoint, then `on_epoch(record)`. With `resume` (a checkpoint), continue after its
    epoch. Returns the whole history. Each optimizer step is `train_step` on `objective`,
    then the schedule's step, then the `ema` copy's update. Each record holds the learning
    rate (of the first parameter group) at the epoch's first and last steps (`lr`,
    `lr_last`), the validation split's loss and accuracy (`val_*`, the EMA copy's
    `ema_val_acc`), and with trainer.test=every_epoch the test split's (`test_*`), which
    nothing selects on; `measure(epoch)` (1-based) adds what it measures (the probe's)."""
    steps = schedule(data, cfg)
    epoch_splits = [s for s in SPLITS if data.split_size(s)]
    epoch_splits = [s for s in epoch_splits if s == "val" or cfg.test == "every_epoch"]
    device = data.device
    accel = Accel.resolve(cfg, device)
    if accel.channels_last:
        model.to(memory_format=torch.channels_last)
    world = data.world
    if world.active:  # DDP: gradients (quantizer steps' too) averaged over the ranks
        ids = [device.index] if device.type == "cuda" else None
        forward = DistributedDataParallel(model, device_ids=ids)
    else:
        forward = model
    forward = compiled(forward) if cfg.compile else forward
    opt = build_optimizers(model, cfg, steps.main)
    history: list[dict] = []
    step = start = 0
    if resume is not None:
        try:
            model.load_state_dict(resume["model"])
            opt.load_state_dict(resume["optimizer"])
            for p, state in zip(policies, resume["policies"], strict=True):
                p.load_state_dict(state)
            if tracker is not None:
                tracker.load_state_dict(resume["tracker"])
            if ema is not None:
                ema.load_state_dict(resume["ema"])
        except (RuntimeError, ValueError, KeyError) as e:  # e.g. from an older oscbench
            raise DamagedFile(
                f"the run directory's {CHECKPOINT} does not fit this run ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:300]}); remove it to train this run from the start, "
                "or start over with trainer.resume=never"
            ) from None
        set_rng_state(resume["rng"])
        history, step, start = list(resume["history"]), resume["step"], resume["epoch"]
    epochs = cfg.epochs + cfg.extra_epochs

    def state() -> dict:
        """What a checkpoint holds besides the RNG, the epoch and the history."""
        return {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "policies": [p.state_dict() for p in policies],
            "tracker": tracker.state_dict() if tracker is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
            "step": step,
        }

    for epoch in range(start, epochs):
        model.train()
        loss_sum = torch.zeros((), device=device)
        extra_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        if epoch >= cfg.epochs and cfg.extra_lr_scale is not None:
            for group in opt.param_groups:
                group["lr"] = cfg.extra_lr_scale * group.get("initial_lr", group["lr"])
        lr = opt.param_groups[0]["lr"]
        probe = functools.partial(
            probe_steps,
            model=model,
            forward=forward,
            opt=opt,
            data=data,
            cfg=cfg,
            accel=accel,
            objective=objective,
            epoch=epoch,
            step=step,
            total=steps.total,
        )
        for p in policies:
            p.on_epoch_start(epoch, probe)
        for i, (x, y) in enumerate(data.train_batches(epoch, cfg.batch_size)):
            weight = data.shard_weight(i, cfg.batch_size, len(y))
            loss, extra, logits = train_step(
                model,
                forward,
                x,
                y,
                opt,
                policies,
                tracker,
                accel,
                step,
                steps.total,
                objective,
                weight,
            )
            lr_last = opt.param_groups[0]["lr"]  # the step's own rate (a Python float)
            if step + 1 < steps.main:
                opt.schedule_step()
            if ema is not None:
                ema.update(model, step + 1 if cfg.ema_warmup else None)
            with torch.no_grad():
                loss_sum += loss * len(y)
                if extra is not None:
                    extra_sum += extra * len(y)
                correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            step += 1
        sums = all_sum(
            torch.stack(
                [loss_sum, extra_sum, correct.float(), torch.tensor(float(seen), device=device)]
            ),
            world,
        )
        loss_sum, extra_sum, correct, seen = sums[0], sums[1], sums[2], int(sums[3].item())
        if not torch.isfinite(loss_sum):  # checked once an epoch: no host sync per step
            raise FloatingPointError(
                f"training diverged: the loss is {loss_sum.item()} in epoch {epoch + 1} "
                f"(trainer.lr={cfg.lr}); lower the learning rate"
            )
        sync_buffers(model, world)  # BN statistics of this epoch's last local batch: rank 0's
        if ema is not None:
            sync_buffers(ema.module, world)
        if cfg.check_sync:
            check_sync(state(), world, epoch + 1)
        record = {
            "epoch": epoch + 1,
            "step": step,
            "lr": lr,
            "lr_last": lr_last,
            "train_loss": loss_sum.item() / seen,
            "train_acc": 100.0 * correct.item() / seen,
        }
        for split in epoch_splits:
            out = evaluate(model, data, split, cfg.eval_batch_size, accel)
            record |= {f"{split}_loss": out["loss"], f"{split}_acc": out["acc"]}
            if ema is not None:
                ema_out = evaluate(ema.module, data, split, cfg.eval_batch_size, accel)
                record[f"ema_{split}_acc"] = ema_out["acc"]
        if policies:
            record["extra_loss"] = extra_sum.item() / seen
            for p in policies:
                record.update(p.metrics())
        osc = tracker.stats(osc_threshold) if tracker is not None else None
        if osc is not None:
            record["osc"] = osc
        if measure is not None:
            record |= measure(epoch + 1)
        history.append(record)
        if save is not None:
            save(state() | {"rng": rng_state(), "epoch": epoch + 1, "history": history})
        on_epoch(record)
    return history
