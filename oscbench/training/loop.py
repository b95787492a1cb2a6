"""The training loop: `train_step` (one optimizer step with the policies' hooks and the
tracker's update) and the `Trainer` (the run's training state as one object, and its epochs)."""

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

from oscbench.data.base import SPLITS, Data
from oscbench.distributed import all_sum, check_sync, sync_buffers
from oscbench.oscillation.policy import Policy, Schedule
from oscbench.oscillation.tracker import OscillationTracker
from oscbench.quant.modules import quantized_layers
from oscbench.records.checkpoint import CHECKPOINT, rng_state, set_rng_state
from oscbench.records.files import DamagedFile
from oscbench.training.accel import Accel
from oscbench.training.config import TrainerConfig
from oscbench.training.distill import CROSS_ENTROPY, Objective, prediction
from oscbench.training.evaluation import evaluate
from oscbench.training.optim import Optimizers, build_optimizers

if TYPE_CHECKING:
    from oscbench.training.ema import ModelEma

PROBE_STREAM = 1 << 20  # batches of Policy.on_epoch_start's probes: epochs apart from training's

# What `Trainer.fit` calls once per optimizer step, as (module, attribute): code that must not make
# a GPU wait for the host (tests/test_host_syncs.py, bench/gpu_check.py watch it).
PER_STEP = (
    ("oscbench.training.loop", "train_step"),
    ("oscbench.training.optim", "Optimizers.schedule_step"),
    ("oscbench.training.ema", "ModelEma.update"),
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


class Trainer:
    """What a run trains and what its checkpoint restores, as one object: the model (its
    quantizers' and the tracker's buffers in it), the optimizers and schedule, the policies,
    the tracker, the EMA copy, the step and the history. `fit` trains `cfg.epochs`, then
    `cfg.extra_epochs` at `cfg.extra_lr_scale` times each group's peak rate (or where the
    schedule ended); `state_dict`/`load_state_dict` are what a checkpoint holds and a resume
    restores, and what `trainer.check_sync` compares across the ranks."""

    def __init__(
        self,
        model: nn.Module,
        data: Data,
        cfg: TrainerConfig,
        policies: list[Policy],
        tracker: OscillationTracker | None = None,
        objective: Objective = CROSS_ENTROPY,
        ema: ModelEma | None = None,
    ) -> None:
        self.model, self.data, self.cfg = model, data, cfg
        self.policies, self.tracker, self.objective, self.ema = policies, tracker, objective, ema
        self.steps = schedule(data, cfg)
        self.accel = Accel.resolve(cfg, data.device)
        if self.accel.channels_last:
            model.to(memory_format=torch.channels_last)
        forward = model
        if data.world.active:  # DDP: gradients (quantizer steps' too) averaged over the ranks
            ids = [data.device.index] if data.device.type == "cuda" else None
            forward = DistributedDataParallel(model, device_ids=ids)
        self.forward = compiled(forward) if cfg.compile else forward
        self.opt = build_optimizers(model, cfg, self.steps.main)
        self.step = 0  # optimizer steps taken
        self.history: list[dict] = []  # a record per epoch trained

    def state_dict(self) -> dict:
        """Everything training continues from, RNG states included."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "policies": [p.state_dict() for p in self.policies],
            "tracker": self.tracker.state_dict() if self.tracker is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "step": self.step,
            "rng": rng_state(),
            "epoch": len(self.history),
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (a checkpoint); one that does not fit this run (e.g. from an
        older oscbench) is named with the fix."""
        try:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            for p, sub in zip(self.policies, state["policies"], strict=True):
                p.load_state_dict(sub)
            if self.tracker is not None:
                self.tracker.load_state_dict(state["tracker"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise DamagedFile(
                f"the run directory's {CHECKPOINT} does not fit this run ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:300]}); remove it to train this run from the start, "
                "or start over with trainer.resume=never"
            ) from None
        set_rng_state(state["rng"])
        self.history, self.step = list(state["history"]), state["step"]

    def fit(
        self,
        on_epoch: Callable[[dict], None],
        save: Callable[[dict], None] | None = None,
        measure: Callable[[int], dict] | None = None,
    ) -> list[dict]:
        """Train the epochs not trained yet; after each, `save(state_dict())` a checkpoint,
        then `on_epoch(record)`. Returns the whole history. Each record holds the learning
        rate (of the first parameter group) at the epoch's first and last steps (`lr`,
        `lr_last`), the validation split's loss and accuracy (`val_*`, the EMA copy's
        `ema_val_acc`), and with trainer.test=every_epoch the test split's (`test_*`), which
        nothing selects on; `measure(epoch)` (1-based) adds what it measures (the probe's)."""
        cfg = self.cfg
        for epoch in range(len(self.history), cfg.epochs + cfg.extra_epochs):
            if epoch >= cfg.epochs and cfg.extra_lr_scale is not None:
                for group in self.opt.param_groups:
                    group["lr"] = cfg.extra_lr_scale * group.get("initial_lr", group["lr"])
            record, extra_loss = self.train_epoch(epoch)
            if cfg.check_sync:  # less the RNG and the history: rank-local draws and measures
                state = self.state_dict()
                del state["rng"], state["history"]
                check_sync(state, self.data.world, epoch + 1)
            record |= self.evaluate()
            if self.policies:
                record["extra_loss"] = extra_loss
                for p in self.policies:
                    record.update(p.metrics())
            osc = self.tracker.stats() if self.tracker is not None else None
            if osc is not None:
                record["osc"] = osc
            if measure is not None:
                record |= measure(epoch + 1)
            self.history.append(record)
            if save is not None:
                save(self.state_dict())
            on_epoch(record)
        return self.history

    def probe_steps(self, n: int, policy: Policy, *, epoch: int, step: int) -> Iterator[int]:
        """`Policy.on_epoch_start`'s probe: n training steps with `policy` alone, on batches of
        a stream of their own (seeded by the epoch, apart from the training epochs'), yielding
        the probe step's index after each; then model, optimizer, the policy's state and the
        random state are restored, also if the caller stops early."""
        model, opt, data = self.model, self.opt, self.data
        saved = [copy.deepcopy(x.state_dict()) for x in (model, opt, policy)]
        rng = rng_state()
        batches = itertools.chain.from_iterable(
            data.train_batches(PROBE_STREAM + epoch * 1024 + k, self.cfg.batch_size)
            for k in itertools.count()
        )
        try:
            for i, (x, y) in zip(range(n), batches, strict=False):
                train_step(
                    model,
                    self.forward,
                    x,
                    y,
                    opt,
                    [policy],
                    None,
                    self.accel,
                    step,
                    self.steps.total,
                    self.objective,
                )
                yield i
        finally:
            for x, state in zip((model, opt, policy), saved, strict=True):
                x.load_state_dict(state)
            set_rng_state(rng)

    def train_epoch(self, epoch: int) -> tuple[dict, float]:
        """One epoch of `train_step`s, each followed by the schedule's step and the EMA
        copy's update; returns its record's training part and the mean extra loss."""
        model, data, cfg, opt, device = self.model, self.data, self.cfg, self.opt, self.data.device
        model.train()
        loss_sum = torch.zeros((), device=device)
        extra_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        lr = opt.param_groups[0]["lr"]
        probe = functools.partial(self.probe_steps, epoch=epoch, step=self.step)
        for p in self.policies:
            p.on_epoch_start(epoch, probe)
        for i, (x, y) in enumerate(data.train_batches(epoch, cfg.batch_size)):
            weight = data.shard_weight(i, cfg.batch_size, len(y))
            loss, extra, logits = train_step(
                model,
                self.forward,
                x,
                y,
                opt,
                self.policies,
                self.tracker,
                self.accel,
                self.step,
                self.steps.total,
                self.objective,
                weight,
            )
            lr_last = opt.param_groups[0]["lr"]  # the step's own rate (a Python float)
            if self.step + 1 < self.steps.main:
                opt.schedule_step()
            if self.ema is not None:
                self.ema.update(model, self.step + 1 if cfg.ema_warmup else None)
            with torch.no_grad():
                loss_sum += loss * len(y)
                if extra is not None:
                    extra_sum += extra * len(y)
                correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            self.step += 1
        world = data.world
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
        if self.ema is not None:
            sync_buffers(self.ema.module, world)
        record = {
            "epoch": epoch + 1,
            "step": self.step,
            "lr": lr,
            "lr_last": lr_last,
            "train_loss": loss_sum.item() / seen,
            "train_acc": 100.0 * correct.item() / seen,
        }
        return record, extra_sum.item() / seen

    def evaluate(self) -> dict:
        """The epoch splits' loss and accuracy (and the EMA copy's accuracy)."""
        cfg, data, record = self.cfg, self.data, {}
        splits = [s for s in SPLITS if data.split_size(s)]
        for split in [s for s in splits if s == "val" or cfg.test == "every_epoch"]:
            out = evaluate(self.model, data, split, cfg.eval_batch_size, self.accel)
            record |= {f"{split}_loss": out["loss"], f"{split}_acc": out["acc"]}
            if self.ema is not None:
                ema_out = evaluate(self.ema.module, data, split, cfg.eval_batch_size, self.accel)
                record[f"ema_{split}_acc"] = ema_out["acc"]
        return record
