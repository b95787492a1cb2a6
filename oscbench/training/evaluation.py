"""Evaluation: accuracy on the validation or the test split, BN re-estimation,
post-training quantization (round to nearest) at other bit-widths, the end-of-training
histogram of latent-weight distance to the nearest threshold, and the final metrics a run
records."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from oscbench.data.base import Data
from oscbench.distributed import all_sum, sync_buffers
from oscbench.models.base import bn_momentum
from oscbench.oscillation.tracker import OscillationTracker
from oscbench.quant.base import clip_to_grid
from oscbench.quant.modules import QuantPlan, quantize_model, quantized_layers
from oscbench.quant.rtn import RTNConfig, RTNQuantizer
from oscbench.training.accel import Accel
from oscbench.training.config import TrainerConfig

DIST_BINS = 20  # over [0, 0.5] step: inside the grid a weight is at most half a step away


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Data, split: str, batch_size: int, accel: Accel | None = None
) -> dict[str, float]:
    """Loss and accuracy (%) on `split` ("val" or "test") in eval mode; on several
    processes each rank evaluates its part of the split and the sums are added up."""
    accel = accel or Accel()
    model.eval()
    sums = torch.zeros(3, device=data.device)  # loss, correct, count (exact in fp32 to 2^24)
    for x, y in data.eval_batches(split, batch_size):
        with accel.autocast(data.device):
            logits = model(accel.input(x))
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum")
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += len(y)
    loss, correct, n = all_sum(sums, data.world).tolist()
    return {"loss": loss / n, "acc": 100.0 * correct / n}


def split_record(data: Data, cfg: TrainerConfig) -> dict:
    """What a record says of its splits: their sizes (test: null when never evaluated) and
    which split each kind of number comes from."""
    test = data.split_size("test") if cfg.test != "never" else None
    return {
        "sizes": {"train": data.split_size("train"), "val": data.split_size("val"), "test": test},
        "history": "train_*: training batches; val_*, ema_val_acc: validation; test_*: test "
        "(trainer.test=every_epoch; nothing selects on it)",
        "final": "val_*: validation; acc, loss, acc_bn, acc@Nbit, ema_acc_bn, kl_to_teacher: test",
        "objective": "val_acc_bn",
    }


def final_splits(data: Data, cfg: TrainerConfig) -> dict[str, str]:
    """The splits a run reports at the end, each with its metrics' prefix: the validation
    split (`val_`) if there is one, and the test split (no prefix) unless trainer.test=never."""
    out = {"val": "val_"} if data.split_size("val") else {}
    return out | ({"test": ""} if cfg.test != "never" else {})


@torch.no_grad()
def reestimate_bn(model: nn.Module, data: Data, batches: int, batch_size: int) -> None:
    """Recompute BN running statistics as a plain average over training batches of the
    final (quantized) model (Nagel et al. 2022, Sec. 5); BatchNorms that stay in evaluation
    mode in training (folded and frozen: `QConvBn2d.freeze_bn_stats`) keep theirs. The
    tracker is not updated."""
    if batches == 0:
        return
    with bn_momentum(model, None) as bns:  # None: a cumulative moving average
        model.train()
        bns = [bn for bn in bns if bn.training]  # a frozen folded BN (bn_fold) stays as it is
        if not bns:
            return
        for bn in bns:
            bn.reset_running_stats()
        for i, (x, _) in enumerate(data.train_batches(epoch=-1, batch_size=batch_size)):
            if i == batches:
                break
            model(x)
    sync_buffers(model, data.world)  # SyncBN agrees already; plain BN takes rank 0's


def _rtn(bits: int) -> RTNQuantizer:
    """Post-training round to nearest: per tensor, s = max|w| / (2^(b-1) - 1)."""
    return RTNQuantizer(RTNConfig(per_channel=False, scale_grad=False), bits, None, True)


def with_weight_bits(model: nn.Module, bits: int, plan: QuantPlan) -> nn.Module:
    """A copy of `model` whose weights are rounded to nearest at `bits`, the first and last
    layer as `plan` sets them. A full-precision model gets weight-only PTQ; a QAT model
    keeps its trained activation quantizers."""
    m = copy.deepcopy(model)
    layers = list(quantized_layers(m))
    if not layers:
        return quantize_model(
            m,
            lambda b, channels, is_weight: _rtn(b) if is_weight else None,
            lambda *a: None,
            QuantPlan(bits, bits, plan.first_last_bits, plan.first_last_fp),
        )
    for _, layer in layers:
        layer.weight_quantizer = _rtn(plan.first_last_bits if layer.is_first_or_last else bits)
    return m


def cross_bit_accuracy(
    model: nn.Module, data: Data, bits: list[int], plan: QuantPlan, cfg: TrainerConfig
) -> dict[str, float]:
    """`acc@Nbit` (test) and `val_acc@Nbit` for each N: weights rounded to nearest at N
    bits, BN statistics re-estimated as for the main result (trainer.bn_reestimate_batches)."""
    out = {}
    for b in sorted(set(bits)):
        q = with_weight_bits(model, b, plan)
        reestimate_bn(q, data, cfg.bn_reestimate_batches, cfg.batch_size)
        for split, prefix in final_splits(data, cfg).items():
            out[f"{prefix}acc@{b}bit"] = evaluate(q, data, split, cfg.eval_batch_size)["acc"]
    return out


@torch.no_grad()
def threshold_distance_histogram(model: nn.Module, bits: int, plan: QuantPlan) -> dict:
    """Histogram of |w - nearest threshold| / step over the low-bit layers' latent weights
    (the 8-bit ends excluded), on each layer's own grid, or for a full-precision model on
    the round-to-nearest grid at `bits`. The last bin collects weights beyond the grid.
    Also the mean distance of latent weights, clipped to the grid's range as dampening
    does, to their quantized value, in steps."""
    layers = [m for _, m in quantized_layers(model) if not m.is_first_or_last]
    if not layers:
        layers = [
            m
            for _, m in quantized_layers(with_weight_bits(model, bits, plan))
            if not m.is_first_or_last
        ]
    dists, to_level = [], []
    for m in layers:
        q, w = m.weight_quantizer, m.quantizer_input()
        step = q.step(w)
        dists.append((q.threshold_distance(w) / step).flatten().float())
        to_level.append(((q(w) - clip_to_grid(q, w)).abs() / step).flatten().float())
    dists = torch.cat(dists)
    edges = torch.linspace(0, 0.5, DIST_BINS + 1)
    counts = torch.histc(dists.clamp(max=0.5).cpu(), bins=DIST_BINS, min=0.0, max=0.5)
    beyond = int((dists > 0.5).sum())
    counts[-1] -= beyond
    return {
        "edges": edges.tolist(),
        "counts": [int(c) for c in counts] + [beyond],
        "near_share": float((dists <= 0.1).float().mean()),  # within 0.1 step of a threshold
        "mean": float(dists.clamp(max=0.5).mean()),
        "mean_to_level": float(torch.cat(to_level).mean()),  # |clip(w) - q(w)| / step
    }


@torch.no_grad()
def ptq_accuracy(model: nn.Module, data: Data, cfg: TrainerConfig) -> dict[str, float]:
    """Post-training quantization's accuracy (`ptq_acc`, `val_ptq_acc`): the model as QAT
    starts from it (weights on the quantizers' initial grids, inputs calibrated), its BN
    statistics re-estimated as for the final result. Evaluated on a copy, the random state
    kept, so that training goes on exactly as without it."""
    twin = copy.deepcopy(model)
    cuda = [data.device] if data.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        reestimate_bn(twin, data, cfg.bn_reestimate_batches, cfg.batch_size)
        return {
            f"{prefix}ptq_acc": evaluate(twin, data, split, cfg.eval_batch_size)["acc"]
            for split, prefix in final_splits(data, cfg).items()
        }


def gap_recovered(final: dict) -> dict[str, float]:
    """torchao's share of the PTQ gap that QAT recovered, (QAT - PTQ) / (FP - PTQ), on each
    split (`ptq_gap_recovered`, `val_ptq_gap_recovered`), for a run that started from FP
    weights (its `init` holds FP's and PTQ's accuracy) where PTQ lost accuracy."""
    init, out = final.get("init") or {}, {}
    for prefix in ("val_", ""):
        fp, ptq = init.get(f"{prefix}acc"), init.get(f"{prefix}ptq_acc")
        qat = final.get(f"{prefix}acc_bn")
        if None not in (fp, ptq, qat) and fp > ptq:
            out[f"{prefix}ptq_gap_recovered"] = (qat - ptq) / (fp - ptq)
    return out


def _ratio(dq: float, dw: float) -> float:
    return dq / dw if dw > 0 else 0.0


def final_metrics(
    model: nn.Module,
    data: Data,
    tracker: OscillationTracker | None,
    history: list[dict],
    cfg: TrainerConfig,
    bits: int,
    cross_bits: list[int],
    plan: QuantPlan,
) -> dict:
    """Accuracy and loss on each of `final_splits` before and after BN re-estimation
    (test: `acc`, `loss`, `acc_bn`; validation: `val_acc`, `val_loss`, `val_acc_bn`),
    accuracy with the weights rounded to each of `cross_bits`, oscillation totals and the
    threshold-distance histogram at `bits`, from the trained model and its history."""
    splits = final_splits(data, cfg)
    final = {}
    for split, prefix in splits.items():
        out = evaluate(model, data, split, cfg.eval_batch_size)
        final |= {f"{prefix}acc": out["acc"], f"{prefix}loss": out["loss"]}
    reestimate_bn(model, data, cfg.bn_reestimate_batches, cfg.batch_size)
    for split, prefix in splits.items():
        final[f"{prefix}acc_bn"] = evaluate(model, data, split, cfg.eval_batch_size)["acc"]
    final |= cross_bit_accuracy(model, data, cross_bits, plan, cfg)
    final["threshold_distance"] = threshold_distance_histogram(model, bits, plan)
    osc = history[-1].get("osc")
    if osc:
        final |= {
            "osc_share": osc["osc_share"],
            "mean_freq": osc["mean_freq"],
            "stuck_share": osc["stuck_share"],
            "crossings_last_epoch": osc["crossings"],
            "crossings_total": sum(h["osc"]["crossings"] for h in history),
            "oscillations_total": sum(h["osc"]["oscillations"] for h in history),
            "dq_dw_last_epoch": osc["dq_dw"],
            "dq_dw": _ratio(
                sum(h["osc"]["dq"] for h in history), sum(h["osc"]["dw"] for h in history)
            ),
            "tracked_weights": osc["tracked_weights"],
            "osc_count_hist": torch.bincount(tracker.counts()).tolist(),
        }
    final |= {k: v for k, v in history[-1].items() if "/" in k}  # the policies' last values
    return final
