"""Shared fixtures: compose the real Hydra config and run it in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from oscbench.launch.compose import compose
from oscbench.launch.config import resolved, validate
from oscbench.launch.execute import execute
from oscbench.oscillation.policy import Policy

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
if "PYTEST_XDIST_WORKER" in os.environ:  # `pytest -n N` (make test): N workers share the cores,
    os.environ["OMP_NUM_THREADS"] = "1"  # each on one thread, and so is every process it starts
    torch.set_num_threads(1)


def unprivileged(cmd: list[str]) -> list[str]:
    """`cmd` run without the power to ignore file permissions: as root (CI's and this
    machine's user), through util-linux's setpriv without CAP_DAC_OVERRIDE, so that a
    read-only directory is read-only to it too."""
    if os.geteuid() != 0:
        return cmd
    drop = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", *cmd]


def compose_config(overrides: list[str]) -> DictConfig:
    return compose(overrides)


def run_config(overrides: list[str], run_dir: Path) -> dict:
    """Compose, validate and execute one run; returns the final metrics."""
    cfg = compose_config(overrides)
    return execute(validate(cfg), resolved(cfg), run_dir, overrides)


@pytest.fixture
def quick() -> list[str]:
    """Overrides for a short CPU run without W&B."""
    return ["trainer.epochs=3", "logger=none", "device=cpu"]


def build_config(overrides: list[str]):
    """Validate and build a run (CPU, no W&B) without training: (spec, Built)."""
    from oscbench.launch.build import build

    spec = validate(compose_config(["device=cpu", "logger=none", *overrides]))
    return spec, build(spec)


def check_latex(table: str, tmp_path: Path) -> None:
    """The report's LaTeX table compiles with pdflatex where a TeX engine is installed
    (.ci/run installs Debian's), else it parses as LaTeX: one tabular, booktabs' rules, as
    many cells in each row as columns."""
    import shutil
    import subprocess

    from oscbench.analysis.latex import document

    if shutil.which("pdflatex"):
        (tmp_path / "table.tex").write_text(document(table))
        cmd = ["pdflatex", "-halt-on-error", "-interaction=nonstopmode", "table.tex"]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-3000:]
        assert (tmp_path / "table.pdf").stat().st_size > 1000
        return
    from pylatexenc.latexwalker import LatexEnvironmentNode, LatexWalker

    nodes, _, _ = LatexWalker(table, tolerant_parsing=False).get_latex_nodes()
    (tab,) = [n for n in nodes if isinstance(n, LatexEnvironmentNode)]
    body = table[table.index("\\begin{tabular}") : table.index("\\end{tabular}")]
    spec = body[body.index("}{") + 2 : body.index("}\n")]
    for rule in ("\\toprule", "\\midrule", "\\bottomrule"):
        assert rule in body
    rows = body.split("\\\\")[:-1]  # the header rows and the body's, up to \\bottomrule
    assert rows and all(r.count("&") == len(spec) - 1 for r in rows)


def aoq_coef(q, w):  # noqa: ANN001, ANN201
    """AOQ's level coefficient of each weight, i - (2^b - 1)/2 with the bin index
    i = clamp(floor(w / s_th) + 2^(b-1), 0, 2^b - 1), written out as in the paper, as the
    reference the fused implementation is tested against; w's bin centre is it * s_th."""
    i = torch.clamp(torch.floor(w.detach() / q.s_th) + 2 ** (q.bits - 1), 0, 2**q.bits - 1)
    return i - (2**q.bits - 1) / 2


class Observer(Policy):
    """A policy that runs after the run's own policies and calls what a test gives it:
    on_step_start(step, total), after_backward(model), on_step_end(model)."""

    def __init__(self, on_step_start=None, after_backward=None, on_step_end=None):
        super().__init__()
        self._start, self._ab, self._end = on_step_start, after_backward, on_step_end

    def on_step_start(self, step, total):
        if self._start:
            self._start(step, total)

    def after_backward(self, model):
        if self._ab:
            self._ab(model)

    def on_step_end(self, model):
        if self._end:
            self._end(model)


def fit(spec, built, extra_policies=()) -> list[dict]:
    """Train a built run through the real loop; extra policies run after the run's own."""
    from oscbench.training.loop import Trainer

    policies = [*built.policies, *extra_policies]
    trainer = Trainer(
        built.model, built.data, spec.trainer, policies, built.tracker, built.objective, built.ema
    )
    return trainer.fit(on_epoch=lambda record: None)
