"""Float tolerances derived from error bounds, never from what one CPU printed.

Two float evaluations of the same sum may add its terms in different orders (vector width,
threads, fused kernels). Each lies within gamma_(n-1) * sum|t| of the exact sum
(Higham, Accuracy and Stability of Numerical Algorithms, Sec. 4.2), gamma_k = k u / (1 - k u)
with u = eps / 2 the unit roundoff, so two of them differ by at most 2 gamma_(n-1) sum|t|.
Terms that are themselves rounded add their own per-term error on top.
"""

from __future__ import annotations

import torch


def unit_roundoff(dtype: torch.dtype = torch.float32) -> float:
    return torch.finfo(dtype).eps / 2


def gamma(k: int, dtype: torch.dtype = torch.float32) -> float:
    """gamma_k = k u / (1 - k u): the relative error bound of k successive roundings."""
    ku = k * unit_roundoff(dtype)
    assert ku < 1, "bound undefined: too many roundings for this precision"
    return ku / (1 - ku)


def sum_difference_bound(
    abs_terms: torch.Tensor, dim: int | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Largest possible difference between two evaluations of sum(terms) (over `dim`, or
    all elements) in `dtype`, in any order: 2 gamma_(n-1) sum|t|, computed in float64."""
    abs_terms = abs_terms.double()
    n = abs_terms.numel() if dim is None else abs_terms.shape[dim]
    total = abs_terms.sum() if dim is None else abs_terms.sum(dim)
    return 2 * gamma(max(n - 1, 1), dtype) * total


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    """|actual - expected| <= bound elementwise, and the largest bound is a small fraction of
    the largest value (else the comparison could not fail)."""
    diff = (actual.double() - expected.double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(diff)
    worst = (diff - bound).max().item()
    assert worst <= 0, f"difference exceeds its error bound by {worst:.3g}: {diff} > {bound}"
    scale = expected.double().abs().max().item()
    assert bound.max().item() < 1e-2 * scale, "the error bound is too loose to test anything"
