"""CONTRIBUTING.md's worked example is real: its three files, written into a copy of the
repository with no other change, give a method that validates, passes the contract tests
and trains."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def example_files() -> dict[str, str]:
    """The code blocks of CONTRIBUTING.md whose first line is `# file: <path>`."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    blocks = re.findall(r"```\w*\n# file: (\S+)\n(.*?)```", text, flags=re.S)
    return dict(blocks)


@pytest.mark.slow  # 30 s; the plugin contract itself is tests/test_contract.py's
def test_the_worked_example_lands_as_three_files_and_runs(tmp_path):
    files = example_files()
    assert sorted(files) == [
        "conf/method/lsq_snap.yaml",
        "conf/policy/snap.yaml",
        "oscbench/oscillation/snap.py",
    ]
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    copy = tmp_path / "repo"
    for name in tracked:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    for name, text in files.items():
        assert not (copy / name).exists()  # new files, not edits
        (copy / name).write_text(text)
    env = {**os.environ, "PYTHONPATH": str(copy), "WANDB_SILENT": "true"}

    def run(*args):
        proc = subprocess.run(
            [sys.executable, *args], cwd=copy, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc

    run("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_contract.py", "-k", "snap")
    run("-m", "oscbench.run", "method=lsq_snap", "bits=2", "trainer.epochs=3", "logger=none",
        f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["method"] == "lsq_snap" and record["final"]["snap/snapped"] >= 0
    assert sum(h["snap/snapped"] for h in record["history"]) > 0  # it did snap weights
    refused = subprocess.run(
        [sys.executable, "-m", "oscbench.run", "method=ofq", "policy=[cga,snap]"],
        cwd=copy, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "policy=snap pins weights to codes of a fixed grid" in refused.stderr
