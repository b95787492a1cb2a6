"""The papers' toy problems, one command each, with a record and figures in the run directory.

python -m oscbench.toy problem=one_weight        # Wenshoj et al. 2025, Fig. 1
python -m oscbench.toy problem=regression        # Nagel et al. 2022, toy regression
python -m oscbench.toy problem=linear_recovery   # the AOQ page's linear toy
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from torch import nn  # noqa: E402

from oscbench.launch.compose import CONF_DIR, compose  # noqa: E402
from oscbench.launch.config import validate  # noqa: E402
from oscbench.launch.naming import overrides_suffix  # noqa: E402,F401  (registers the resolver)
from oscbench.oscillation.policy import RunContext, Schedule, build_policies  # noqa: E402
from oscbench.oscillation.tracker import LayerTracker, OscillationTracker, TrackerConfig  # noqa: E402
from oscbench.quant.lsq import lsq_quantize  # noqa: E402
from oscbench.quant.modules import (  # noqa: E402
    QuantPlan,
    quantize_model,
    quantizer_factory,
    quantizer_parameters,
)
from oscbench.records.files import write_json_atomic  # noqa: E402
from oscbench.training.accel import Accel  # noqa: E402
from oscbench.training.loop import train_step  # noqa: E402


def _grid(w: torch.Tensor, step: float, n: int, p: int) -> torch.Tensor:
    """Round to a fixed grid step * {n..p} with the straight-through gradient."""
    return lsq_quantize(w, torch.tensor(step), n, p, 0.0)


# --- one weight (Wenshoj et al. 2025, Fig. 1) -----------------------------------------------


def one_weight(cfg: DictConfig) -> dict:
    """y_hat = q(w) x, levels {0, 1}, SGD: QAT, full precision with the oscillation
    regulariser, and QAT with dampening (switched on at `dampen_start`, once the oscillation
    runs, as Nagel et al. delay it). Each trajectory holds w before every step. With x = 1
    and lambda = 1/2 the regulariser's gradient (w - y) + 2 lambda (q - w) is QAT's, q - y."""

    def loss(w: torch.Tensor, variant: str, step: int) -> torch.Tensor:
        q = _grid(w, 1.0, 0, 1)
        task = 0.5 * (q * cfg.x - cfg.y) ** 2
        if variant == "fp_regulariser":
            return 0.5 * (w * cfg.x - cfg.y) ** 2 + cfg.reg_lambda * (q**2 - w**2)
        if variant == "qat_dampen" and step >= cfg.dampen_start:
            return task + cfg.dampen_lambda * (q.detach() - w.clamp(0, 1)) ** 2
        return task

    out = {}
    for variant in ("qat", "fp_regulariser", "qat_dampen"):
        w = torch.tensor(cfg.w0, requires_grad=True)
        opt = torch.optim.SGD([w], lr=cfg.lr)
        ws, qs = [], []
        for step in range(cfg.steps):
            ws.append(w.item())
            qs.append(_grid(w.detach(), 1.0, 0, 1).item())
            opt.zero_grad()
            loss(w, variant, step).backward()
            opt.step()
        ws.append(w.item())
        qs.append(_grid(w.detach(), 1.0, 0, 1).item())
        out[variant] = {"w": ws, "q": qs, "mean_q_last_4": sum(qs[-4:]) / 4}
    return out


def plot_one_weight(res: dict, cfg: DictConfig, out: Path) -> list[Path]:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5), sharey=True)
    for ax, (variant, r) in zip(axes, res.items(), strict=True):
        ax.plot(r["w"], marker="o", ms=3, label="latent w")
        ax.step(range(len(r["q"])), r["q"], where="post", label="q(w)")
        ax.axhline(0.5, color="grey", ls=":", label="threshold")
        ax.axhline(cfg.y, color="k", lw=0.8, ls="--", label="target")
        ax.set(title=variant.replace("_", " "), xlabel="step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "one_weight.png", dpi=110)
    plt.close(fig)
    return [out / "one_weight.png"]


# --- toy regression (Nagel et al. 2022) ------------------------------------------------------


def _regression_run(cfg: DictConfig, w_star: float, g: torch.Generator) -> dict:
    s = cfg.grid_step
    w = torch.tensor(cfg.w0, requires_grad=True)
    opt = torch.optim.SGD([w], lr=cfg.lr)
    tracker = LayerTracker(torch.round(w.detach() / s).reshape(1), momentum=0.01)
    qs = []
    for step in range(cfg.steps):
        q = _grid(w, s, -1000, 1000)
        if cfg.batch:
            x = torch.randn(cfg.batch, generator=g)
            loss = ((x * w_star - x * q) ** 2).mean() / 2
        else:
            loss = 0.5 * (q - w_star) ** 2  # the expectation over x ~ N(0, 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        qs.append(q.item())
        if step == cfg.steps // 2:
            tracker.epoch_stats(0.0)  # count oscillations over the second half only
        tracker.update(torch.round(w.detach() / s).reshape(1))
    half = qs[len(qs) // 2 :]
    return {
        "q": qs,
        "mean_q_second_half": sum(half) / len(half),
        "oscillations_per_step": tracker.epoch_stats(0.0)["oscillations"] / len(half),
    }


def regression(cfg: DictConfig) -> dict:
    """The latent weight oscillates around the threshold next to w*; the time-average of
    q(w) approaches w*; the frequency depends on where w* lies between the two levels."""
    g = torch.Generator().manual_seed(0)
    main = _regression_run(cfg, cfg.w_star, g)
    lo = torch.floor(torch.tensor(cfg.w_star / cfg.grid_step)).item() * cfg.grid_step
    positions = torch.linspace(0, 1, cfg.sweep_points)[1:-1].tolist()
    sweep = [
        {
            "position": p,
            **{
                k: v for k, v in _regression_run(cfg, lo + p * cfg.grid_step, g).items() if k != "q"
            },
        }
        for p in positions
    ]
    return {"main": main, "lower_level": lo, "sweep": sweep}


def plot_regression(res: dict, cfg: DictConfig, out: Path) -> list[Path]:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    q = res["main"]["q"]
    avg = torch.tensor(q).cumsum(0) / torch.arange(1, len(q) + 1)
    axes[0].plot(q, lw=0.6, label="q(w)")
    axes[0].plot(avg, label="running mean of q(w)")
    axes[0].axhline(cfg.w_star, color="k", ls="--", label="w*")
    axes[0].set(xlabel="step", title="Toy regression: q(w) and its time-average")
    axes[0].legend(fontsize=8)
    pos = [r["position"] for r in res["sweep"]]
    axes[1].plot(pos, [r["oscillations_per_step"] for r in res["sweep"]], marker="o")
    axes[1].set(
        xlabel="position of w* between two levels (0 = lower, 1 = upper)",
        ylabel="oscillations per step",
        title="Oscillation frequency vs w*",
    )
    fig.tight_layout()
    fig.savefig(out / "regression.png", dpi=110)
    plt.close(fig)
    return [out / "regression.png"]


# --- linear recovery (AOQ) ----------------------------------------------------------------


def linear_recovery(cfg: DictConfig, seed: int) -> dict:
    """10,000 weights with integer values in {-2, -1, 0, 1}, y = X w noise-free, a
    bias-free linear model started from the minimum-norm full-precision solution, then QAT
    at 2 bits with each method. A weight is recovered when its integer code (the index of
    its level, counted from the lowest: LSQ's codes -2..1 are the integers themselves, AOQ's
    mid-rise bins likewise) equals its true integer."""
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randint(-2, 2, (cfg.num_weights,), generator=g).float()
    x = torch.randn(cfg.num_samples, cfg.num_weights, generator=g)
    y = x @ w_true
    w_fp = x.T @ torch.linalg.solve(x @ x.T, y)  # minimum-norm exact solution
    steps_per_epoch = -(-cfg.num_samples // cfg.batch)
    total = cfg.epochs * steps_per_epoch
    results = {"w_fp": w_fp, "w_true": w_true, "methods": {}}
    for name in cfg.methods:
        spec = validate(compose([f"method={name}", f"bits={cfg.bits}", "logger=none"]))
        if not spec.quantized:
            raise ValueError(f"linear_recovery needs a quantized method; method={name} is not one")
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(cfg.num_weights, 1, bias=False))
        model[0].weight.data.copy_(w_fp[None])
        quantize_model(
            model,
            quantizer_factory(spec.quantizer),
            lambda *a: None,
            QuantPlan(cfg.bits, cfg.bits, None),
        )
        tracker_cfg = TrackerConfig(0.001, 0.1, 0.005, track_first_last=True)
        tracker = OscillationTracker(model, tracker_cfg, total)
        steps = Schedule(total=total, main=total, per_epoch=steps_per_epoch)
        run = RunContext(model, tracker, cfg.bits, steps, "adam")
        policies = build_policies(spec.policies, run)
        groups = [  # named as the training loop's (policies address groups by name)
            {"name": "latent", "params": [model[0].weight]},
            {"name": "quantizer", "params": quantizer_parameters(model)},
        ]
        opt = torch.optim.Adam(groups, lr=cfg.lr)
        step, start = 0, time.time()
        for _ in range(cfg.epochs):
            order = torch.randperm(cfg.num_samples, generator=g)
            for i in range(0, cfg.num_samples, cfg.batch):
                idx = order[i : i + cfg.batch]
                train_step(
                    model,
                    model,
                    x[idx],
                    y[idx],
                    opt,
                    policies,
                    tracker,
                    Accel(),
                    step,
                    total,
                    objective=lambda out, _, target: F.mse_loss(out.squeeze(-1), target),
                )
                step += 1
        layer = model[0]
        codes = layer.weight_quantizer.to_int(layer.weight.detach())[0]
        with torch.no_grad():
            final_loss = float(F.mse_loss(model(x).squeeze(-1), y))
        results["methods"][name] = {
            "recovered": int((codes == w_true).sum()),
            "recovered_share": float((codes == w_true).float().mean()),
            "codes": codes,
            "crossings": int(tracker.epoch_switches[0]),
            "final_loss": final_loss,
            "seconds": time.time() - start,
        }
    return results


def plot_linear_recovery(res: dict, cfg: DictConfig, out: Path) -> list[Path]:
    methods = list(res["methods"])
    fig, axes = plt.subplots(
        1, len(methods), figsize=(4.5 * len(methods), 3.6), sharey=True, squeeze=False
    )
    for ax, name in zip(axes[0], methods, strict=True):
        codes = res["methods"][name]["codes"]
        for level in sorted(codes.unique().tolist()):
            ax.hist(
                res["w_fp"][codes == level].numpy(),
                bins=80,
                alpha=0.6,
                label=f"ends at level {int(level)}",
            )
        r = res["methods"][name]
        ax.set(
            title=f"{name}: {r['recovered']:,} of {cfg.num_weights:,} recovered",
            xlabel="starting full-precision weight",
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "linear_recovery.png", dpi=110)
    plt.close(fig)
    return [out / "linear_recovery.png"]


PROBLEMS = {
    "one_weight": (lambda cfg, seed: one_weight(cfg), plot_one_weight),
    "regression": (lambda cfg, seed: regression(cfg), plot_regression),
    "linear_recovery": (linear_recovery, plot_linear_recovery),
}


def _plain(obj):  # noqa: ANN001, ANN202
    """Tensors to lists, for the JSON record (per-weight arrays are left out)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if k not in ("codes", "w_fp", "w_true")}
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def run_problem(cfg: DictConfig, out: Path) -> dict:
    """Solve one problem, write results.json and its figures into `out`."""
    solve, plot = PROBLEMS[cfg.problem.name]
    start = time.time()
    res = solve(cfg.problem, cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    figures = plot(res, cfg.problem, out)
    record = {
        "problem": cfg.problem.name,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "results": _plain(res),
        "figures": [p.name for p in figures],
        "wall_time_s": time.time() - start,
    }
    write_json_atomic(out / "results.json", record)
    return res


@hydra.main(config_path=str(Path(CONF_DIR) / "toy"), config_name="toy", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    res = run_problem(cfg, out)
    if cfg.problem.name == "linear_recovery":
        for name, r in res["methods"].items():
            print(f"{name:12s} recovered {r['recovered']:6,} of {cfg.problem.num_weights:,}")
    print(f"oscbench.toy: {cfg.problem.name}: record and figures in {out}")


if __name__ == "__main__":
    main()
