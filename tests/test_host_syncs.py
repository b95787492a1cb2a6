"""No host synchronisation inside a training step (issue 26): on a GPU every one stalls the
host until the device has caught up, so the host can no longer queue kernels ahead of it.
bench/gpu_check.py checks this on CUDA with `torch.cuda.set_sync_debug_mode("error")`; here
tests/syncs.py notes the ops that would synchronise there, on the CPU."""

import functools

import pytest

from oscbench.launch.compose import presets
from oscbench.training.loop import per_step_wrapped
from tests.conftest import run_config
from tests.syncs import HostSyncs

CASES = [(p.name, []) for p in presets()] + [
    ("lsq", ["trainer.ema_decay=0.9"]),
    ("parq", ["recipe=parq2025"]),  # LSBQ's uneven levels
]


@pytest.mark.parametrize(
    ("method", "extra"), CASES, ids=lambda c: c if isinstance(c, str) else "+".join(c)
)
def test_no_per_step_call_of_the_loop_would_synchronise_a_gpu(method, extra, tmp_path):
    """Every preset (and LSQ with an EMA copy, PARQ under its recipe), 4 epochs at batch
    256 (every policy's phase reached: BinReg's from its second epoch), with each per-step
    call of the loop (`oscbench.training.loop.PER_STEP`: `train_step`, the schedule's step,
    the EMA's update) watched; per-epoch code may synchronise. BinReg's bin sums were
    `torch.bincount`, whose CUDA kernel reads the largest code on the host."""
    probe = HostSyncs()

    def watched(fn):  # noqa: ANN001, ANN202
        @functools.wraps(fn)
        def inner(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            with probe:
                return fn(*args, **kwargs)

        return inner

    overrides = [f"method={method}", "bits=3", "trainer.epochs=4", "trainer.batch_size=256", *extra]
    with per_step_wrapped(watched):
        run_config([*overrides, "logger=none", "device=cpu"], tmp_path)
    assert probe.found == []
