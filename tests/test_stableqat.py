"""StableQAT: LSQ's forward and step, the weight's straight-through gradient times the
reference's Fourier-derived factor (microsoft/StableQAT, `models/utils_quant.py`)."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from oscbench.launch.compose import CONF_DIR
from oscbench.quant.base import QUANTIZERS
from oscbench.quant.stableqat import ROOT2_PI, surrogate_factor
from oscbench.registry import InvalidValue
from tests.bounds import unit_roundoff

U = unit_roundoff(torch.float32)


def build(name: str, bits: int, channels: int | None = None, **options):  # noqa: ANN201
    node = OmegaConf.merge(OmegaConf.load(f"{CONF_DIR}/quantizer/{name}.yaml"), options)
    return QUANTIZERS.get(name).build(QUANTIZERS.parse(node, "quantizer"), bits, channels, True)


def reference_factor(t: torch.Tensor, amplitudes: list[float]) -> torch.Tensor:
    """The reference's efficient kernel, in float64: 2 / (1 + c S) - 1 with
    S = sum_k a_k cos((2k + 1) pi (t + round(t))) (`lsq_backward_kernel`)."""
    t = t.double()
    angle = (t + t.round()) * math.pi
    s = torch.zeros_like(t)
    for k, a in enumerate(amplitudes):
        s += a * ROOT2_PI * torch.cos(angle * (2 * k + 1))
    return 2 / (1 + s) - 1


def factor_bound(t: torch.Tensor, amplitudes: list[float]) -> torch.Tensor:
    """How far the float32 factor may lie from the float64 one. The angle pi (t + round(t))
    is off by at most 3u|angle| (pi rounded, a sum, a product; t exact here), the harmonic
    (2k + 1) times that, and cos adds a few ulps (4u): S is off by at most
    dS = sum |a_k| ((2k + 1) 3u |angle| + 4u); the factor (1 - cS) / (1 + cS) has slope
    2c / (1 + cS)^2 <= 2c / (1 - c sum|a|)^2, and its own four roundings add 8u."""
    angle = (t.double() + t.double().round()).abs() * math.pi
    ds = sum(abs(a) * ((2 * k + 1) * 3 * U * angle + 4 * U) for k, a in enumerate(amplitudes))
    slope = 2 * ROOT2_PI / (1 - ROOT2_PI * sum(abs(a) for a in amplitudes)) ** 2
    return slope * ds + 8 * U


def test_one_harmonic_at_021_is_one_at_the_thresholds_and_0035_at_the_levels():
    levels = torch.arange(-4.0, 4.0, dtype=torch.float64)
    at_level = surrogate_factor(levels, [0.21])
    c = ROOT2_PI * 0.21
    assert torch.allclose(at_level, torch.full_like(levels, (1 - c) / (1 + c)), rtol=0, atol=1e-12)
    assert abs((1 - c) / (1 + c) - 0.0347) < 5e-5  # the "about 0.035"
    at_threshold = surrogate_factor(levels + 0.5, [0.21])
    assert torch.allclose(at_threshold, torch.ones_like(levels), rtol=0, atol=1e-12)
    assert torch.equal(surrogate_factor(levels + 0.25, []), torch.ones_like(levels))


@pytest.mark.parametrize("amplitudes", [[0.21], [0.15, 0.05], [0.1, -0.05, 0.02]])
def test_the_factor_is_the_reference_kernels_algebra(amplitudes):
    t = torch.linspace(-8, 8, 4097, dtype=torch.float64)  # steps of 1/256: exact in float32
    ref = reference_factor(t, amplitudes)
    ours64 = surrogate_factor(t, amplitudes)
    assert (ours64 - ref).abs().max() < 1e-12  # two algebraic forms of one value, in float64
    ours32 = surrogate_factor(t.float(), amplitudes)
    assert bool(((ours32.double() - ref).abs() <= factor_bound(t, amplitudes)).all())
    assert bool((ref >= 0).all()) and ref.max() <= 1 + 1e-12


@pytest.mark.parametrize("mask", ["reference", "lsq"])
def test_the_weight_gradient_is_the_mask_times_the_factor_and_the_step_gradient_is_lsqs(mask):
    """s = 1/4 and t = x/s on a 1/64 grid: t, its code and q - t are exact in float32."""
    bits, amplitudes = 3, [0.21]
    q = build("stableqat", bits, amplitudes=amplitudes, mask=mask, per_channel=False)
    w = torch.linspace(-6, 6, 769).reshape(1, -1) * 0.25
    q.init_from(w)
    q.s.data.fill_(0.25)
    x = w.clone().requires_grad_(True)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    (q(x) * grad).sum().backward()
    t = w / 0.25
    n, p = -4, 3
    inside = ((t >= n) & (t <= p)) if mask == "reference" else (t.round() >= n) & (t.round() <= p)
    expected = grad.double() * inside * reference_factor(t, amplitudes)
    bound = grad.double().abs() * factor_bound(t, amplitudes) + U * expected.abs()
    assert bool(((x.grad.double() - expected).abs() <= bound).all())
    assert bool((x.grad[~inside] == 0).all()) and bool((x.grad[inside] != 0).any())
    coeff = torch.where(inside, t.round().clamp(n, p) - t, t.round().clamp(n, p))
    expected_s = (grad.double() * coeff).sum() * q.g
    terms = (grad.double() * coeff).abs().sum() * q.g
    assert abs(q.s.grad.item() - expected_s.item()) <= 2 * t.numel() * U * terms.item() + 1e-12


def test_the_masks_differ_only_within_half_a_step_outside_the_range():
    """t = n - 0.3 and p + 0.4 round to n and p: inside for `lsq`, outside for `reference`
    (no weight gradient; the step's coefficient n or p, not the code minus t)."""
    t = torch.tensor([[-4.3, 3.4]])
    for mask, passes in (("reference", False), ("lsq", True)):
        q = build("stableqat", 3, amplitudes=[], mask=mask, per_channel=False)
        q.init_from(t)
        q.s.data.fill_(1.0)
        x = t.clone().requires_grad_(True)
        q(x).sum().backward()
        assert torch.equal(x.grad, torch.full_like(t, float(passes)))
        coeff = (torch.tensor([-4.0, 3.0]) - t[0]) if passes else torch.tensor([-4.0, 3.0])
        assert torch.allclose(q.s.grad, (coeff.sum() * q.g).reshape(()), rtol=4 * U, atol=0)


def test_without_harmonics_and_with_lsqs_mask_it_is_lsq_bit_for_bit():
    w = torch.randn(8, 27, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    out = []
    for name, opts in (("stableqat", {"amplitudes": [], "mask": "lsq"}), ("lsq", {})):
        q = build(name, 2, None, per_channel=False, init="lsq", keep_positive=False, **opts)
        q.init_from(w)
        x = w.clone().requires_grad_(True)
        y = q(x)
        (y * grad).sum().backward()
        out.append((y.detach(), x.grad, q.s.grad, q.g))
    for a, b in zip(*out, strict=True):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_the_step_starts_at_max_over_p_per_row_and_its_gradient_scale_counts_the_whole_weight():
    w = torch.randn(5, 3, 3, 3, generator=torch.Generator().manual_seed(3))
    q = build("stableqat", 4, channels=5)
    q.init_from(w)
    assert torch.equal(q.s.detach(), w.abs().flatten(1).amax(dim=1) / 7)
    assert q.g == 1 / math.sqrt(w.numel() * 7)


def test_amplitudes_that_would_flip_the_factors_sign_are_refused():
    with pytest.raises(InvalidValue, match="sum \\|a_k\\| below"):
        build("stableqat", 2, amplitudes=[0.2, 0.03])
