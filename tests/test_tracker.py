"""The oscillation tracker on hand-written integer sequences with known counts."""

import pytest
import torch

from oscbench.launch.compose import presets
from oscbench.oscillation.tracker import LayerTracker, OscillationTracker, TrackerConfig
from tests.bounds import gamma, unit_roundoff
from tests.conftest import build_config, fit

pytestmark = pytest.mark.numeric  # rerun in CI under other CPU code paths

# one column per weight; rows are the codes after each optimizer step (row 0 = start)
SEQ = torch.tensor(
    [
        [0, 0, 3, -2],
        [1, 0, 2, -2],  # w0 up (first switch: no oscillation), w2 down (first)
        [0, 0, 3, -2],  # w0 down: osc; w2 up: osc
        [1, 0, 3, -2],  # w0 up: osc
        [1, 0, 2, -2],  # w2 down: osc
        [2, 0, 1, -1],  # w0 up again (same direction: no osc); w2 down (same); w3 up (first)
        [1, 0, 0, -2],  # w0 down: osc; w2 down (same); w3 down: osc
    ],
    dtype=torch.int8,
)
SWITCHES = [5, 0, 5, 2]
OSCILLATIONS = [3, 0, 2, 1]


def _osc_flags() -> torch.Tensor:
    """Oscillation events per step, written out by hand from the comments above."""
    f = torch.zeros(len(SEQ) - 1, 4)
    f[1, 0] = f[2, 0] = f[5, 0] = 1
    f[1, 2] = f[3, 2] = 1
    f[5, 3] = 1
    return f


def test_counts_on_known_sequences():
    m = 0.1
    start = SEQ[0].clone()
    tr = LayerTracker(SEQ[0], momentum=m)
    for codes in SEQ[1:]:
        tr.update(codes)
    assert tr.count.tolist() == OSCILLATIONS
    assert tr.epoch_switches.item() == sum(SWITCHES)
    assert tr.epoch_oscillations.item() == sum(OSCILLATIONS)
    assert _osc_flags().sum(0).tolist() == OSCILLATIONS
    expected = torch.zeros(4)
    for flags in _osc_flags():
        expected = m * flags + (1 - m) * expected
    torch.testing.assert_close(tr.freq, expected)
    assert tr.direction.tolist() == [-1, 0, -1, -1]
    assert torch.equal(SEQ[0], start)  # the caller's tensor is not the tracker's state
    last = SEQ[-1].clone()
    tr.update(last)
    last.fill_(5)
    assert torch.equal(tr.code, SEQ[-1])  # nor is the last update's


def test_epoch_stats_and_reset():
    tr = LayerTracker(SEQ[0], momentum=0.1)
    for codes in SEQ[1:]:
        tr.update(codes)
    stats = tr.epoch_stats(threshold=0.1)
    assert stats["crossings"] == 12 and stats["oscillations"] == 6
    assert stats["osc_share"] == 0.5  # w0 (f=0.2539) and w2 (f=0.1539) exceed 0.1
    again = tr.epoch_stats(threshold=0.1)
    assert again["crossings"] == 0 and again["oscillations"] == 0
    assert again["osc_share"] == 0.5  # the frequency EMA is not an epoch counter


def test_stuck_share_counts_weights_that_never_left_their_level_in_the_epoch():
    """w1 of SEQ never moves; w3 goes -2 -> -1 -> -2, back where it started (a reversal);
    w0 and w2 end elsewhere. In the next epoch only w0 moves. A weight whose count the
    saturation may have clamped counts as moved."""
    from oscbench.oscillation.tracker import COUNT_MAX, SATURATE_EVERY

    tr = LayerTracker(SEQ[0], momentum=0.1)
    for codes in SEQ[1:]:
        tr.update(codes)
    assert tr.epoch_stats(threshold=0.1)["stuck_share"] == 1 / 4
    tr.update(torch.tensor([2, 0, 0, -2], dtype=torch.int8))
    tr.update(torch.tensor([1, 0, 0, -2], dtype=torch.int8))  # w0 back: still moved
    assert tr.epoch_stats(threshold=0.1)["stuck_share"] == 3 / 4
    tr.count[1] = COUNT_MAX - SATURATE_EVERY
    tr.epoch_stats(threshold=0.1)  # the epoch starts with w1's count at the saturation
    tr.update(SEQ[-1])
    assert tr.epoch_stats(threshold=0.1)["stuck_share"] == 3 / 4


def test_no_update_in_eval_mode():
    tr = LayerTracker(SEQ[0], momentum=0.1)
    tr.eval()
    for codes in SEQ[1:]:
        tr.update(codes)
    assert tr.epoch_switches.item() == 0 and tr.count.sum().item() == 0
    assert torch.equal(tr.code, SEQ[0])


def test_compact_state_is_in_state_dict_and_restores_exactly():
    tr = LayerTracker(SEQ[0], momentum=0.1)
    for codes in SEQ[1:4]:
        tr.update(codes)
    state = tr.state_dict()
    assert {k: v.dtype for k, v in state.items() if v.dim()} == {
        "code": torch.int8,
        "direction": torch.int8,
        "freq": torch.float32,
        "count": torch.int16,
    }
    per_weight = sum(v.element_size() for v in state.values() if v.dim())
    assert per_weight == 8
    fresh = LayerTracker(torch.zeros(4, dtype=torch.int8), momentum=0.1)
    fresh.load_state_dict(state)
    for codes in SEQ[4:]:
        tr.update(codes)
        fresh.update(codes)
    for key, value in tr.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_extreme_codes_do_not_overflow():
    tr = LayerTracker(torch.tensor([-128, 127], dtype=torch.int8), momentum=0.5, bits=8)
    tr.update(torch.tensor([127, -128]))
    assert tr.direction.tolist() == [1, -1]
    tr.update(torch.tensor([-128, 127]))
    assert tr.count.tolist() == [1, 1] and tr.direction.tolist() == [-1, 1]


def test_counts_saturate_instead_of_wrapping():
    tr = LayerTracker(torch.zeros(2, dtype=torch.int8), momentum=0.5)
    tr.count.fill_(32767 - 3)  # as if loaded from a checkpoint of a very long run
    tr.load_state_dict(tr.state_dict())
    for i in range(10):
        tr.update(torch.tensor([i % 2, 0]))
    assert 0 < tr.count[0] <= 32767 and tr.count[1] == 32767 - 1024


def test_short_runs_raise_the_momentum_floor():
    cfg = TrackerConfig(
        momentum=0.001, window_fraction=0.1, threshold=0.005, track_first_last=False
    )
    assert cfg.effective_momentum(500_000) == 0.001  # paper regime: unchanged
    assert cfg.effective_momentum(700) == 1 / 70  # EMA window = 10% of the run
    cfg.window_fraction = None
    assert cfg.effective_momentum(700) == 0.001


def test_matches_a_plain_reference_on_random_walks():
    """The in-place int8 update against Nagel et al.'s definition written plainly."""
    torch.manual_seed(0)
    steps, n, m = 200, 5000, 0.05
    codes = torch.randint(-8, 8, (1, n)) + torch.randint(-1, 2, (steps, n)).cumsum(0)
    codes = codes.clamp(-8, 7).to(torch.int8)
    tr = LayerTracker(codes[0], momentum=m)
    last, last_dir = codes[0].long(), torch.zeros(n, dtype=torch.long)
    freq, count, switches, oscillations = torch.zeros(n), torch.zeros(n, dtype=torch.long), 0, 0
    for c in codes[1:]:
        tr.update(c)
        d = torch.sign(c.long() - last)
        osc = (d != 0) & (last_dir != 0) & (d != last_dir)
        freq = freq * (1 - m) + osc.float() * m
        count += osc
        switches, oscillations = switches + int((d != 0).sum()), oscillations + int(osc.sum())
        last_dir = torch.where(d != 0, d, last_dir)
        last = c.long()
    assert oscillations > 1000  # the walks do oscillate
    assert torch.equal(tr.count.long(), count) and torch.equal(tr.direction.long(), last_dir)
    assert torch.equal(tr.freq, freq) and torch.equal(tr.code, codes[-1])
    assert (tr.epoch_switches.item(), tr.epoch_oscillations.item()) == (switches, oscillations)


def test_switches_of_the_last_update_and_the_code_change():
    tr = LayerTracker(SEQ[0], momentum=0.1)
    per_step = []
    for prev, codes in zip(SEQ[:-1], SEQ[1:], strict=True):
        delta = tr.update(codes)
        assert torch.equal(delta, codes - prev)
        per_step.append(int(tr.switches))
    assert per_step == [(SEQ[i + 1] != SEQ[i]).sum().item() for i in range(len(SEQ) - 1)]


def test_dq_over_dw_on_a_hand_made_trajectory():
    """TetraJet's ratio: sum |Q(w_t) - Q(w_t-1)| over sum |w_t - w_t-1|, Q on a grid of
    spacing 0.5 (per tensor) or (0.5, 0.25) (per channel)."""
    from oscbench.oscillation.tracker import Movement, code_distance

    w = [
        torch.tensor([[0.20, 0.10], [0.00, 0.30]]),
        torch.tensor([[0.26, 0.10], [0.10, 0.30]]),  # w00 crosses 0.25 (+1 code)
        torch.tensor([[0.24, 0.12], [0.10, 0.40]]),  # w00 back (-1); w11 +1 code per ch 1
        torch.tensor([[0.24, 0.12], [0.10, 0.40]]),  # nothing moves
    ]
    codes = [torch.tensor([[0, 0], [0, 1]]), torch.tensor([[1, 0], [0, 1]])]
    codes += [torch.tensor([[0, 0], [0, 2]]), torch.tensor([[0, 0], [0, 2]])]
    codes = [c.to(torch.int8) for c in codes]
    for spacing, dq in ((torch.tensor(0.5), 0.5 + 1.0), (torch.tensor([0.5, 0.25]), 1.25)):
        tr, move = LayerTracker(codes[0], momentum=0.1), Movement(w[0])
        for wt, ct in zip(w[1:], codes[1:], strict=True):
            move.update(wt, code_distance(tr.update(ct), spacing))
        # every |latent step| (0.06 + 0.10, then 0.02 + 0.02 + 0.10), exactly, from the
        # float32 values; each step's float32 sum of 4 rounded differences: gamma_5 relative
        steps = zip(w[:-1], w[1:], strict=True)
        dw = sum((b.double() - a.double()).abs().sum().item() for a, b in steps)
        stats = move.epoch_stats()
        assert stats["dq"] == dq  # code changes times an exact spacing
        assert abs(stats["dw"] - dw) <= gamma(5) * dw
        assert abs(stats["dq_dw"] - dq / dw) <= 2 * gamma(5) * dq / dw
        assert move.epoch_stats() == {"dq": 0.0, "dw": 0.0, "dq_dw": 0.0}  # reset, no motion


def test_dq_over_dw_stays_a_ratio_of_movements_when_a_learned_step_turns_negative():
    """An LSQ step pushed below zero (no guard: `keep_positive: false`) reverses the grid:
    the quantized movement is still |code change| x |step|, never negative."""
    from tests.conftest import build_config

    spec, built = build_config(["bits=2", "trainer.epochs=1"])
    tracker, layer = built.tracker, built.tracker.layers[0]
    q = layer.weight_quantizer
    with torch.no_grad():
        q.s.mul_(-1)
        tracker.update()  # the reversed grid's codes: the starting point
        before = q.to_int(layer.weight).clone()
        w0 = layer.weight.detach().clone()
        layer.weight.add_(0.3 * q.s.abs() * torch.sign(torch.randn_like(layer.weight)))
        for state in tracker.moves:
            state.epoch_stats()  # the sums from the flip and the start on: reset
        tracker.update()
    moved = (q.to_int(layer.weight) - before).abs().sum().item()
    stats = tracker.moves[0].epoch_stats()
    step = q.s.abs().item()
    assert moved > 0 and abs(stats["dq"] - moved * step) <= unit_roundoff() * moved * step
    dw = (layer.weight.detach().double() - w0.double()).abs().sum().item()  # float32 sum of n
    assert abs(stats["dw"] - dw) <= gamma(layer.weight.numel() + 1) * dw
    assert stats["dq_dw"] > 0


def test_model_tracker_reports_the_ratio_and_the_step_share():
    from oscbench.training.loop import Trainer
    from tests.conftest import build_config

    spec, built = build_config(["bits=2", "trainer.epochs=2"])
    shares = []

    def record(r):
        shares.append(float(built.tracker.step_share()))

    history = Trainer(built.model, built.data, spec.trainer, [], built.tracker).fit(record)
    osc = history[-1]["osc"]
    layers = osc["layers"].values()
    assert osc["dq"] == sum(v["dq"] for v in layers)
    assert osc["dq_dw"] == osc["dq"] / osc["dw"] > 0
    assert osc["crossings"] == sum(v["crossings"] for v in layers) > 0
    exact = int(built.tracker.switches.sum()) / built.tracker.total
    assert abs(shares[-1] - exact) <= unit_roundoff() * exact  # one float32 division


# In the fast suite: LSQ, and the presets whose policies read the tracker and so steer
# training by it (freezing, TRS, OsciReset); the others, whose tracker only measures, are slow.
STEERED = {"lsq", "lsq_freeze", "lsq_trs", "lsq_oscireset"}
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "method",
    [p.name if p.name in STEERED else pytest.param(p.name, marks=SLOW) for p in presets()],
)
def test_flat_tracker_is_the_per_layer_tracker_bit_for_bit(method, monkeypatch):
    """Two epochs of every quantized preset with the per-layer tracker the flat one replaced
    (tests/reference_tracker.py) and with the flat one, advancing layer by layer (the CPU's
    way) and in one span over all layers (a GPU's): the same epoch records (every per-layer
    and model number, exactly), the same trained weights, and the same per-weight state
    (codes, directions, frequencies, counts), also where policies read the tracker
    (freezing, TRS, OsciReset) and so steer training by it. A preset that trains in full
    precision has no tracker."""
    import oscbench.launch.build
    from tests import reference_tracker

    def trained(tracker_class: type, one_span: bool = False) -> tuple[list[dict], dict, dict]:
        monkeypatch.setattr(oscbench.launch.build, "OscillationTracker", tracker_class)
        spec, built = build_config([f"method={method}", "bits=3", "trainer.epochs=2"])
        tracker = built.tracker
        if one_span and tracker is not None:
            tracker.in_one_span()
        history = fit(spec, built)
        if not spec.quantized:
            assert tracker is None
            return history, {}, {}
        if isinstance(tracker, reference_tracker.OscillationTracker):
            state = {
                k: torch.cat([getattr(s, k).flatten() for s in tracker.states])
                for k in ("code", "direction", "freq", "count")
            }
        else:
            assert len(tracker.groups) == (1 if one_span else len(tracker.layers))
            state = {k: getattr(tracker, k) for k in ("code", "direction", "freq", "count")}
        return history, built.model.state_dict(), state

    per_layer = trained(reference_tracker.OscillationTracker)
    assert "osc" not in per_layer[0][-1] or per_layer[0][-1]["osc"]["crossings"] > 0
    for flat in (trained(OscillationTracker), trained(OscillationTracker, one_span=True)):
        assert flat[0] == per_layer[0]  # every number of every epoch record
        for a, b in ((flat[1], per_layer[1]), (flat[2], per_layer[2])):
            assert a.keys() == b.keys()
            for key in a:
                if isinstance(a[key], torch.Tensor):
                    assert torch.equal(a[key], b[key]), key


def test_on_level_share_counts_weights_within_eps_of_a_level_as_parq():
    """PARQ's relative_quantized_frac (parq/optim/quantopt.py, `_count_quantized_params`):
    |w - level| <= float32 eps for some level. A trained LSQ layer's latent weights are
    almost never on a level; put some there (and some a float32 eps and 2 eps away)."""
    from oscbench.oscillation.tracker import ON_LEVEL_EPS, on_level
    from oscbench.quant.modules import quantized_layers

    _, built = build_config(["bits=2"])
    layer = next(m for _, m in quantized_layers(built.model) if not m.is_first_or_last)
    q, w = layer.weight_quantizer, layer.weight.detach().clone()
    levels = q.levels(w).flatten()
    flat = w.flatten()
    flat[:7] = levels[torch.arange(7) % levels.numel()]  # exactly on a level
    flat[7] = levels[1] + ON_LEVEL_EPS / 2  # within eps
    flat[8] = levels[1] + 4 * ON_LEVEL_EPS  # not (well above float32's spacing near a level)
    distance = (flat[:, None] - levels[None, :]).abs().min(dim=1).values
    expected = int((distance <= ON_LEVEL_EPS).sum())
    assert expected >= 8
    assert int(on_level(q, w)) == expected
