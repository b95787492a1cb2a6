"""Assertions on a learned outcome: an accuracy above a value, one method's share below
another's. A training run is a chaotic trajectory whose course depends on the order in which
sums are added up, so such a bound must hold with a margin on every CPU path
(`.ci/cpu_path`: native, avx2, default), not on one. Tests that make them are marked
`learned`; `python bench/margins.py` runs them on the three paths and writes each value per
path to bench/margins.md, the numbers their docstrings quote. With $OSCBENCH_MARGINS set,
every value is appended there (JSON lines) before it is checked.
"""

from __future__ import annotations

import json
import operator
import os

import torch

OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt}


def _check(what: str, value: float, op: str, bound: float) -> None:
    out = os.environ.get("OSCBENCH_MARGINS")
    if out:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
        row = {
            "test": test,
            "what": what,
            "value": float(value),
            "op": op,
            "bound": float(bound),
            "path": os.environ.get("OSCBENCH_CPU_PATH", "native"),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
        }
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
    assert OPS[op](value, bound), f"{what}: {value} {op} {bound} does not hold"


def above(what: str, value: float, bound: float) -> None:
    _check(what, value, ">", bound)


def at_least(what: str, value: float, bound: float) -> None:
    _check(what, value, ">=", bound)


def below(what: str, value: float, bound: float) -> None:
    _check(what, value, "<", bound)
