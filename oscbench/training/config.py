"""`trainer:`: the training recipe (optimizer, schedule, epochs, precision, checkpoints),
checked on construction."""

from __future__ import annotations

from dataclasses import dataclass

from oscbench.registry import check


@dataclass
class TrainerConfig:
    epochs: int
    batch_size: int
    optimizer: str  # sgd | adam (weight decay added to the gradient) | adamw (decoupled)
    lr: float
    finetune_lr: float | None  # a run that starts from weights (init_from): lr instead
    finetune_epochs: int | None  # ... and these epochs instead of `epochs`
    momentum: float  # SGD momentum (Adam, AdamW: beta1)
    nesterov: bool
    weight_decay: float  # not applied to quantizer parameters
    no_weight_decay: str  # none | biases (PARQ's split_param_groups) | 1d (timm's
    #                       param_groups_weight_decay: biases, every 1-D parameter, the
    #                       model's own no_weight_decay() names)
    warmup_fraction: float  # linear warm-up over this share of the main steps, then `schedule`
    schedule: str  # cosine | linear: decay to 0 at the end of the main epochs | constant |
    #                multistep: times `gamma` at each of `milestones` (torch's MultiStepLR)
    milestones: list[float]  # multistep: shares of the main steps, counted from the first
    gamma: float  # multistep: the factor at each milestone
    label_smoothing: float  # of the cross-entropy with the labels (0 = off)
    extra_epochs: int  # epochs after the main run, for a policy's phase (CGA)
    extra_lr_scale: float | None  # their rate, a share of each group's peak; null: as ended
    quant_lr: float  # learning rate of quantizer parameters (their own group)
    act_quant_lr: float | None  # input quantizers' parameters; null: at quant_lr, one group
    quant_optimizer: str  # shared: a group of the main optimizer | adam | sgd: their own
    quant_schedule: str  # an own quantizer optimizer's: main (the same schedule) | constant
    ema_decay: float | None  # an EMA copy of the model (timm's ModelEmaV3); null = none
    ema_warmup: bool  # timm's decay warm-up: decay_t = min(decay, 1 - (1 + t)^(-2/3))
    ema_buffers: str  # copy (the live model's buffers) | average (float buffers too)
    eval_batch_size: int
    test: str  # the test split: end (evaluated once, at the end) | every_epoch (also) | never
    bn_reestimate_batches: int  # Nagel et al.: re-estimate BN statistics before final eval; 0 = off
    checkpoint: bool  # save a checkpoint after every epoch (needed to resume)
    precision: str  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    channels_last: str  # auto (on CUDA) | always | never
    compile: bool  # torch.compile the model's forward
    sync_bn: bool  # several processes: BatchNorm over the global batch (SyncBatchNorm)
    dist_timeout_s: float  # several processes: a collective that waits longer fails the run
    check_sync: bool  # several processes: compare every rank's state each epoch (debug)
    resume: str  # auto: continue from the run directory's checkpoint, if any; never: start over

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        check(
            self.finetune_epochs is None or self.finetune_epochs >= 1,
            "finetune_epochs",
            self.finetune_epochs,
            "null (epochs) or an integer >= 1",
        )
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        optimizers = ("sgd", "adam", "adamw")
        check(self.optimizer in optimizers, "optimizer", self.optimizer, ", ".join(optimizers))
        schedules = ("cosine", "linear", "constant", "multistep")
        check(self.schedule in schedules, "schedule", self.schedule, ", ".join(schedules))
        m = self.milestones
        check(
            all(a < b for a, b in zip([0.0, *m], [*m, 1.0], strict=True)),
            "milestones",
            m,
            "increasing shares of the main steps, each 0 < x < 1 (epochs 80, 120 of 200: "
            "[0.4, 0.6])",
        )
        check(self.gamma > 0, "gamma", self.gamma, "a number > 0 (MultiStepLR's: 0.1)")
        check(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "0 <= x < 1")
        check(
            self.quant_optimizer in ("shared", "adam", "sgd"),
            "quant_optimizer",
            self.quant_optimizer,
            "shared, adam, sgd",
        )
        check(
            self.ema_decay is None or 0 < self.ema_decay < 1,
            "ema_decay",
            self.ema_decay,
            "null (no EMA) or 0 < x < 1",
        )
        buffers = ("copy", "average")
        check(self.ema_buffers in buffers, "ema_buffers", self.ema_buffers, ", ".join(buffers))
        check(
            self.quant_schedule in ("main", "constant"),
            "quant_schedule",
            self.quant_schedule,
            "main, constant",
        )
        check(self.lr > 0, "lr", self.lr, "a number > 0")
        check(
            self.finetune_lr is None or self.finetune_lr > 0,
            "finetune_lr",
            self.finetune_lr,
            "null (lr) or a number > 0",
        )
        check(self.quant_lr >= 0, "quant_lr", self.quant_lr, "a number >= 0")
        check(
            self.act_quant_lr is None or self.act_quant_lr >= 0,
            "act_quant_lr",
            self.act_quant_lr,
            "null (quant_lr) or a number >= 0",
        )
        check(0 <= self.momentum < 1, "momentum", self.momentum, "0 <= x < 1")
        exempt = ("none", "biases", "1d")
        check(
            self.no_weight_decay in exempt,
            "no_weight_decay",
            self.no_weight_decay,
            ", ".join(exempt),
        )
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        check(
            0 <= self.warmup_fraction < 1,
            "warmup_fraction",
            self.warmup_fraction,
            "0 <= x < 1 (a share of all steps)",
        )
        check(self.extra_epochs >= 0, "extra_epochs", self.extra_epochs, "an integer >= 0")
        check(
            self.extra_lr_scale is None or self.extra_lr_scale > 0,
            "extra_lr_scale",
            self.extra_lr_scale,
            "null or > 0",
        )
        check(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, ">= 1")
        check(self.resume in ("auto", "never"), "resume", self.resume, "auto, never")
        tests = ("end", "every_epoch", "never")
        check(self.test in tests, "test", self.test, ", ".join(tests))
        check(
            self.precision in ("auto", "fp32", "bf16"),
            "precision",
            self.precision,
            "auto, fp32, bf16",
        )
        check(
            self.channels_last in ("auto", "always", "never"),
            "channels_last",
            self.channels_last,
            "auto, always, never",
        )
        check(
            self.bn_reestimate_batches >= 0,
            "bn_reestimate_batches",
            self.bn_reestimate_batches,
            "an integer >= 0 (0 = off)",
        )
