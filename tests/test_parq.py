"""PARQ against its reference as torchao ships it (torchao.prototype.parq, the port of
facebookresearch/parq): the levels, the slope schedule, the proximal map, and whole
optimizer steps against `QuantOptimizer` with `ProxPARQ`; then a run's weights end on levels."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torchao.prototype.parq.optim import ProxPARQ, QuantOptimizer
from torchao.prototype.parq.optim.parq import normalized_mirror_sigmoid
from torchao.prototype.parq.quant import LSBQuantizer, UnifQuantizer

from oscbench.deploy.onnx import deployed, logits_only, to_onnx
from oscbench.deploy.parity import parity, weight_codes_equal
from oscbench.launch.compose import CONF_DIR
from oscbench.oscillation.parq import (
    PARQ,
    PARQScheduleConfig,
    inv_slope,
    mirror_sigmoid,
    prox_,
    prox_uniform_,
)
from oscbench.oscillation.policy import RunContext, Schedule
from oscbench.quant.base import EXTRA_BIT, LOOKUP, QUANTIZERS, UNIFORM, deployability
from oscbench.quant.modules import QuantPlan, quantize_model, quantizer_factory
from oscbench.quant.parq import sign_patterns
from oscbench.registry import ConfigError
from tests.bounds import gamma
from tests.conftest import build_config, compose_config, fit
from tests.learned import above, below

pytestmark = pytest.mark.numeric  # bit-for-bit parity: rerun in CI under other CPU code paths


def quantizer(bits: int, channels: int | None = None, **options):  # noqa: ANN201
    node = OmegaConf.merge(OmegaConf.load(f"{CONF_DIR}/quantizer/parq.yaml"), options)
    return QUANTIZERS.get("parq").build(QUANTIZERS.parse(node, "quantizer"), bits, channels, True)


def reference_levels(
    w: torch.Tensor, bits: int, per_channel: bool, method: str, shift: float, center: bool = False
):
    zero_point = 0.5 if shift == 0.5 else 0.0
    ref = UnifQuantizer(center, scale_method=method, int_shift=shift, zero_point=zero_point)
    p = w.flatten(1) if per_channel else w
    return ref.quantize(p, bits, dim=-1 if per_channel else None)


def weights(bits: int) -> torch.Tensor:
    """A conv's weights with channels of different scales, off centre (for `center`)."""
    torch.manual_seed(bits)
    return torch.randn(6, 3, 3, 3) * torch.rand(6, 1, 1, 1) + 0.2 * torch.randn(6, 1, 1, 1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize(("method", "shift"), [("mean", 0.5), ("max", 0.5), ("mean", 1.0)])
@pytest.mark.parametrize("center", [False, True])
def test_levels_and_codes_are_unifquantizers(bits, per_channel, method, shift, center):
    w = weights(bits)
    q = quantizer(
        bits, 6, per_channel=per_channel, scale_method=method, int_shift=shift, center=center
    )
    q.init_from(w)
    hard, levels = reference_levels(w, bits, per_channel, method, shift, center)
    assert torch.equal(q.levels(w), levels)
    assert torch.equal(q.quantize(w), hard.view(w.shape))
    # the rounded weight UnifQuantizer returns is the level of to_int's code (centred:
    # the nearest level; the mean's rounding may move a tie, which these weights have not)
    codes = q.to_int(w)
    assert torch.equal(q.code_centre(codes, w).flatten(), hard.flatten())
    deploy = EXTRA_BIT if shift == 0.5 else UNIFORM
    assert q.deploy == (LOOKUP if center else deploy) and q.uneven == center


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize(
    ("center", "optimal"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_lsbq_levels_and_rounding_are_lsbquantizers(bits, per_channel, center, optimal):
    if optimal and bits > 2:
        with pytest.raises(ConfigError, match="optimal levels exist for 1 and 2 bits"):
            quantizer(bits, 6, levels="lsbq", optimal=True)
        return
    w = weights(bits)
    q = quantizer(bits, 6, per_channel=per_channel, levels="lsbq", center=center, optimal=optimal)
    q.init_from(w)
    p = w.flatten(1) if per_channel else w
    ref = LSBQuantizer(center=center, optimal=optimal)
    hard, levels = ref.quantize(p, bits, dim=-1 if per_channel else None)
    # sorted: the reference's optimal levels per channel are V B^T, in its sign patterns'
    # order, out of order where v_2 > v_1 (which its proximal map's bucketize then misreads)
    assert torch.equal(q.levels(w), torch.sort(levels, dim=-1).values)
    assert torch.equal(q.quantize(w), hard.view(w.shape))
    assert q.deploy == LOOKUP  # exported as the table of levels (tests/test_export.py)
    # per tensor, the optimal residual is at most the greedy one's; per channel the
    # reference's candidates are scored with v_2 = v_1 (lsbq_optimal_2bit), and here its
    # residual is the larger, as the reference's is
    if optimal and not per_channel:
        greedy = LSBQuantizer(center=center).quantize(p, bits, dim=-1 if per_channel else None)
        assert (hard - p).norm() <= (greedy[0] - p).norm()


def test_optimal_2bit_levels_of_a_tensor_are_the_least_squares_over_every_split():
    """The per-tensor solution against a brute force in float64: every v_1 (each weight's
    |w|, between neighbours, and mean|w| / 2), v_2 = mean|w - v_1 s_1|... as LSBQuantizer
    defines its candidates; the chosen pair's residual is the smallest of all candidates'."""
    w = weights(2).flatten()
    q = quantizer(2, None, levels="lsbq", optimal=True)
    q.init_from(w)
    v1 = (q.levels(w)[2] + q.levels(w)[3]) / 2
    v2 = (q.levels(w)[3] - q.levels(w)[2]) / 2
    a = w.double().abs().sort().values
    n = len(a)
    best = None
    for i in range(n - 1):
        above, below = a[i + 1 :].mean(), a[: i + 1].mean()
        c1, c2 = (above + below) / 2, (above - below) / 2
        if above >= below and a[i] <= c1 < a[i + 1]:
            r = w.double() - c1 * torch.where(w >= 0, 1.0, -1.0).double()
            r = r - c2 * torch.where(r >= 0, 1.0, -1.0)
            if best is None or r.norm() < best[0]:
                best = (r.norm(), c1, c2)
    assert best is not None
    # each of v_1, v_2: sums of n terms of |w| over counts, rounded once more
    bound = gamma(n + 3) * a.sum()
    assert abs(v1.double() - best[1]) <= bound and abs(v2.double() - best[2]) <= bound


def _row_residuals(row: torch.Tensor) -> dict[float, float]:
    """Each candidate v_1 of `compute_v_per_channel` for one row, in float64 from its
    definition (|p|_(j) where half the mean above j, or that plus half the mean up to j,
    lies in [|p|_(j), |p|_(j+1)], j = 1..K-2 of the sorted |p|), and the residual it leaves
    with v_2 = mean|p - v_1 s_1|."""
    p = row.double()
    a, k = p.abs().sort().values, p.numel()
    out = {}
    for j in range(1, k - 1):
        above, below = a[j + 1 :].mean() / 2, a[: j + 1].mean() / 2
        if any(a[j] <= m <= a[j + 1] for m in (above, above + below)):
            r = p - a[j] * torch.where(p >= 0, 1.0, -1.0).double()
            r = r - r.abs().mean() * torch.where(r >= 0, 1.0, -1.0).double()
            out[float(a[j])] = float(r.norm())
    return out


def test_optimal_rows_least_squares_takes_each_rows_candidate_of_least_residual():
    """Per channel the reference scores a candidate v_1 subtracting it twice; with
    `optimal_rows: least_squares` each row's residual |w - q(w)| is the least any candidate
    leaves with the v_2 then taken (float64 from the definition), never above the
    reference's scoring's, and below it in some rows here."""
    w = torch.randn(64, 27, generator=torch.Generator().manual_seed(0))
    w = w * torch.rand(64, 1, generator=torch.Generator().manual_seed(1))
    left = {}
    for rows in ("reference", "least_squares"):
        q = quantizer(2, 64, levels="lsbq", optimal=True, per_channel=True, optimal_rows=rows)
        q.init_from(w)
        left[rows] = (w.double() - q.quantize(w).double()).norm(dim=-1)
    better = 0
    for i, row in enumerate(w):
        least = min(_row_residuals(row).values())
        # a residual in float32: K terms of |w| + v_1 + v_2 (each at most 3 max|w|), rounded
        # over at most 2K + 8 operations
        k = row.numel()
        bound = gamma(2 * k + 8) * float(row.abs().sum() + 3 * k * row.abs().max())
        assert left["least_squares"][i] <= least + bound, i
        assert left["least_squares"][i] <= left["reference"][i] + bound, i
        better += int(left["reference"][i] > left["least_squares"][i] + bound)
    assert better > 0  # the two scorings differ on these rows


def test_optimal_rows_least_squares_is_refused_where_it_changes_nothing():
    for options in ({"optimal": True}, {"per_channel": True}):
        with pytest.raises(ConfigError, match="optimal_rows"):
            quantizer(2, 4, levels="lsbq", optimal_rows="least_squares", **options)


def test_optimal_levels_need_lsbq():
    with pytest.raises(ConfigError, match="optimal"):
        quantizer(2, None, levels="uniform", optimal=True)


def test_the_sign_patterns_are_lsbquantizers_basis_in_its_order():
    for bits in range(1, 9):
        basis = torch.tensor(list(itertools.product((-1, 1), repeat=bits)), dtype=torch.float32)
        assert torch.equal(sign_patterns(bits), basis)


@pytest.mark.parametrize("per_channel", [False, True])
def test_lsbq_codes_are_the_nearest_levels_on_an_uneven_grid(per_channel):
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3) * torch.rand(6, 1, 1, 1)
    q = quantizer(3, 6, per_channel=per_channel, levels="lsbq")
    q.init_from(w)
    rows = w.flatten(1) if per_channel else w.reshape(1, -1)
    levels = q.levels(w) if per_channel else q.levels(w).unsqueeze(0)  # (C or 1, 8)
    gaps = levels.diff(dim=-1)
    assert (gaps > 0).all() and not torch.allclose(gaps, gaps[..., :1].expand_as(gaps))
    mids = (levels[..., 1:] + levels[..., :-1]) / 2
    index = (rows.unsqueeze(-1) > mids.unsqueeze(1)).sum(-1)  # thresholds below w: ties lower
    codes = q.to_int(w)
    assert torch.equal(codes.reshape(rows.shape), (index - 4).float())
    chosen = levels.gather(1, index)
    assert torch.equal(q.code_centre(codes, w).reshape(rows.shape), chosen)
    # the nearest level: no level closer, but for rounding in (w - level), |w| eps at most
    distance = (rows.unsqueeze(-1) - levels.unsqueeze(1)).abs()
    bound = torch.finfo(w.dtype).eps * (rows.abs() + levels.abs().amax(-1, keepdim=True))
    assert ((rows - chosen).abs() <= distance.amin(-1) + bound).all()
    expected = (rows.unsqueeze(-1) - mids.unsqueeze(1)).abs().amin(-1)
    assert torch.equal(q.threshold_distance(w).reshape(rows.shape), expected)
    step = (levels[..., -1] - levels[..., 0]) / 7  # the mean spacing, per row
    assert torch.equal(q.step(w).reshape(-1), step)
    low, high = q.bounds(w)
    assert torch.equal(low.reshape(-1), levels[..., 0])
    assert torch.equal(high.reshape(-1), levels[..., -1])


def test_on_lsbq_levels_the_quantized_movement_is_each_weights_own_gap():
    """d_Q on uneven levels: |level(new code) - level(old code)| per weight, not the code
    change times one spacing."""
    from oscbench.oscillation.tracker import code_distance, level_distance, level_spacing

    torch.manual_seed(3)
    w = torch.randn(4, 64)
    q = quantizer(2, 4, levels="lsbq")
    q.init_from(w)
    before = q.to_int(w).to(torch.int8)
    moved = w + 0.5 * torch.randn_like(w)
    after = q.to_int(moved).to(torch.int8)
    delta = after - before
    levels = q.levels(w).double()
    gaps = (levels[after.long() + 2] - levels[before.long() + 2]).abs()
    expected = gaps.sum().item()
    got = level_distance(q, moved, after, delta).item()
    assert abs(got - expected) <= gamma(w.numel()) * expected  # a float32 sum of n terms
    uniform = code_distance(delta, level_spacing(q.levels(w))).item()
    assert abs(uniform - expected) > 0.05 * expected  # one spacing would misstate it


def test_the_slope_schedule_is_the_mirror_sigmoid():
    for s, c in [(100.0, 0.5), (10.0, 0.5), (3.0, 0.3)]:
        for t in range(20, 120):
            assert mirror_sigmoid(t, 20, 120, s, c) == normalized_mirror_sigmoid(t, 20, 120, s, c)
    assert mirror_sigmoid(19, 20, 120, 100.0, 0.5) == 1.0
    assert mirror_sigmoid(120, 20, 120, 100.0, 0.5) == 0.0
    assert mirror_sigmoid(20, 20, 120, 100.0, 0.5) == 1.0  # normalised: 1 at the start


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("step", [0, 30, 50, 70, 99, 100, 150])  # slope 1 .. 0, then hard
def test_the_proximal_map_is_proxparqs(per_channel, step):
    torch.manual_seed(step)
    w = torch.randn(8, 16) * 0.1
    _, levels = reference_levels(w, 2, per_channel, "mean", 0.5)
    expected = w.clone()
    inv = ProxPARQ(0, 100, steepness=10.0).apply_(
        expected, None, levels, step, dim=-1 if per_channel else None
    )
    got = w.clone()
    slope = inv_slope(step, 0, 100, 10.0, 0.5)
    prox_(got if per_channel else got.view(-1), levels, slope)
    assert slope == inv
    assert torch.equal(got, expected)


def _hard_cases(levels: torch.Tensor, rows: int) -> torch.Tensor:
    """Weights at, just below and just above every level and midpoint, beyond both ends,
    and random ones: (rows, K), each row from its own levels."""
    lv = levels.expand(rows, -1) if levels.dim() == 1 else levels
    mids = (lv[:, :-1] + lv[:, 1:]) / 2
    points = torch.cat([lv, mids, lv[:, :1] * 3, lv[:, -1:] * 3], dim=1)
    up, down = torch.full_like(points, float("inf")), torch.full_like(points, -float("inf"))
    spread = lv[:, -1:] * torch.randn(rows, 64)
    return torch.cat([points, points.nextafter(up), points.nextafter(down), spread], dim=1)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize(("bits", "shift"), [(2, 0.5), (4, 0.5), (8, 0.5), (3, 1.0)])
@pytest.mark.parametrize("slope", [1.0, 0.7, 0.01, torch.finfo(torch.float32).tiny, 0.0])
def test_the_uniform_map_without_a_search_is_prox_bit_for_bit(per_channel, bits, shift, slope):
    """Over many steps: w / step rounds across an integer for some of them, at a level (the
    product rounded up) or at a midpoint, where only the corrections find prox_'s bin."""
    torch.manual_seed(bits)
    for _ in range(40):
        w = torch.randn(16, 40) * torch.rand(16, 1)
        q = quantizer(bits, 16, per_channel=per_channel, int_shift=shift)
        q.init_from(w)
        grid = q.grid(w)
        cases = _hard_cases(q.levels(w), 16)
        expected, got = cases.clone(), cases.clone()
        step = grid.step.reshape(-1, 1) if per_channel else grid.step
        prox_uniform_(got, dataclasses.replace(grid, step=step), slope)
        prox_(expected if per_channel else expected.view(-1), q.levels(w), slope)
        assert torch.equal(got, expected)


def test_a_slope_between_zero_and_one_pulls_weights_towards_the_bins_ends():
    levels = torch.tensor([-1.5, -0.5, 0.5, 1.5])
    w = torch.tensor([-2.0, -1.25, -0.875, 0.125, 0.375, 0.625, 2.0])
    prox_(w, levels, 0.5)  # c + 2 (w - c), clamped to the bin (dyadic: exact)
    assert torch.equal(w, torch.tensor([-1.5, -1.5, -0.75, 0.25, 0.5, 0.5, 1.5]))


def _pair(per_channel: bool, levels: str, center: bool = False, optimal: bool = False):
    """One linear layer trained by oscbench's policy and its twin by torchao's optimizer."""
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(12, 6))
    theirs = copy.deepcopy(ours)
    options = {"per_channel": per_channel, "levels": levels, "center": center}
    node = OmegaConf.merge(
        OmegaConf.load(f"{CONF_DIR}/quantizer/parq.yaml"), options | {"optimal": optimal}
    )
    component = type("C", (), {"name": "parq", "options": QUANTIZERS.parse(node, "quantizer")})
    none = lambda bits, channels, is_weight: None  # noqa: E731
    quantize_model(ours, quantizer_factory(component), none, QuantPlan(2, 2, None))
    cfg = PARQScheduleConfig(
        warmup_steps=3,
        quant_period=4,
        anneal_start=0.1,
        anneal_end=0.6,
        steepness=10.0,
        anneal_center=0.5,
    )
    run = RunContext(ours, None, 2, Schedule(total=40, main=40, per_epoch=10), "sgd")
    policy = PARQ(cfg, run)
    opt = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    weight, bias = theirs[0].weight, theirs[0].bias
    base = torch.optim.SGD(
        [{"params": [weight], "quant_bits": 2}, {"params": [bias]}],
        lr=0.05,
        momentum=0.9,
        weight_decay=1e-3,
    )
    ref = QuantOptimizer(
        base,
        LSBQuantizer(center, optimal) if levels == "lsbq" else UnifQuantizer(center),
        ProxPARQ(policy.start, policy.end, steepness=10.0),
        warmup_steps=3,
        quant_period=4,
        quant_per_channel=per_channel,
    )
    return ours, policy, opt, theirs, ref


@pytest.mark.parametrize(
    ("per_channel", "levels", "center", "optimal"),
    [
        *itertools.product((False, True), ("uniform", "lsbq"), (False, True), (False,)),
        # per channel the reference's optimal levels come out of order where v_2 > v_1 (at
        # step 3 here), which its proximal map misreads; oscbench sorts them
        # (test_lsbq_levels_and_rounding_are_lsbquantizers checks them against it)
        (False, "lsbq", False, True),
        (False, "lsbq", True, True),
    ],
)
def test_forty_steps_are_quantoptimizers_bit_for_bit(per_channel, levels, center, optimal):
    """The whole step: warm-up, latent weights restored and kept, levels every 4 steps,
    the annealed map, hard rounding after anneal_end (steps 4..24 of 40 here), by the
    quantizer's own rounding at the steps that set the levels (27, 31, 35, 39)."""
    ours, policy, opt, theirs, ref = _pair(per_channel, levels, center, optimal)
    torch.manual_seed(1)
    for _ in range(40):
        x, y = torch.randn(16, 12), torch.randn(16, 6)
        for model, step in (
            (ours, lambda: policy.optimizer_step(opt, opt.step)),
            (theirs, ref.step),
        ):
            model.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            step()
        assert torch.equal(ours[0].weight, theirs[0].weight)
        assert torch.equal(ours[0].bias, theirs[0].bias)
    latent = ref.state[theirs[0].weight]["latent"]
    assert torch.equal(policy.latent_0, latent)
    assert policy.inv_slope == 0.0 and not torch.equal(latent, theirs[0].weight)


def test_a_run_ends_with_every_quantized_weight_on_a_level_and_exports():
    spec, built = build_config(
        [
            "method=parq",
            "bits=2",
            "trainer.epochs=4",
            "policy.parq.warmup_steps=5",
            "policy.parq.anneal_end=0.5",
            "oscillation.track_first_last=true",
        ]
    )
    history = fit(spec, built)
    # 21 steps an epoch: annealing over steps 0..41, hard rounding from step 42
    assert history[0]["parq/inv_slope"] > 0 and history[-1]["parq/inv_slope"] == 0.0
    assert history[0]["osc"]["on_level_share"] < 0.5
    assert history[-1]["osc"]["on_level_share"] == 1.0  # every tracked weight, all layers
    policy = built.policies[0]
    latent = torch.cat(
        [getattr(policy, f"latent_{i}").flatten() for i in range(len(policy.layers))]
    )
    assert not torch.equal(latent, torch.cat([m.weight.flatten() for m in policy.layers]))
    # the integer model: the weights' codes (odd, at one more bit) and onnxruntime's logits
    model = built.model.eval()
    batches = list(built.data.eval_batches("test", 256))
    probe = to_onnx(deployed(model), batches[0][0][:2])
    assert weight_codes_equal(model, logits_only(probe)) == (len(policy.layers), True)
    got = parity(model, probe, batches)
    assert got["logits"]["images_over_bound"] == 0
    assert (
        deployability(
            {"quantizer": {"name": "parq", "int_shift": 0.5}, "act_quantizer": {"name": "lsq"}}
        )
        == EXTRA_BIT
    )


@pytest.mark.learned
def test_an_lsbq_run_ends_on_its_uneven_levels_and_exports_them_as_a_table():
    """Margins in bench/margins.md (first epoch's share on a level, last epoch's crossings)."""
    spec, built = build_config(
        [
            "method=parq",
            "bits=2",
            "quantizer.levels=lsbq",
            "trainer.epochs=4",
            "policy.parq.anneal_end=0.5",
        ]
    )
    history = fit(spec, built)
    below("share of weights on a level, first epoch", history[0]["osc"]["on_level_share"], 0.5)
    assert history[-1]["osc"]["on_level_share"] == 1.0
    # the tracker reads the codes of uneven levels: weights still cross after hard rounding
    above("crossings in the last epoch", history[-1]["osc"]["crossings"], 0)
    for m in built.policies[0].layers:
        levels = m.weight_quantizer.levels(m.weight)
        gaps = levels.diff()
        assert not torch.allclose(gaps, gaps[:1].expand_as(gaps))  # v1 != 2 v2
        assert torch.isin(m.weight, levels).float().mean() > 0.99  # greedy sums: ulps aside
    # the integer model: each weight's code and its layer's table of levels
    model = built.model.eval()
    batches = list(built.data.eval_batches("test", 256))
    probe = to_onnx(deployed(model), batches[0][0][:2])
    assert weight_codes_equal(model, logits_only(probe)) == (len(built.policies[0].layers), True)
    got = parity(model, probe, batches)
    assert got["logits"]["images_over_bound"] == 0
    assert got["correct"] == got["correct_simulated_here"]
    config = {"quantizer": {"name": "parq", "levels": "lsbq"}, "act_quantizer": {"name": "lsq"}}
    assert deployability(config) == LOOKUP


def test_parq_without_its_policy_or_with_a_warmup_as_long_as_the_run_is_refused():
    from oscbench.launch.config import validate

    with pytest.raises(ConfigError, match="add policy=parq or use method=parq"):
        validate(compose_config(["quantizer=parq", "policy=[]"]))
    with pytest.raises(ConfigError, match="PARQ's map would never act"):
        build_config(["method=parq", "trainer.epochs=2", "policy.parq.warmup_steps=42"])
    build_config(["method=parq", "trainer.epochs=2", "policy.parq.warmup_steps=41"])
