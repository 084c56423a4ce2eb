"""Cost model: piecewise-linear fits, op lookup, JSON round trip, bounded online refinement."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from profiler.costmodel import RECENT, CostModel, Curve, Sample, UnknownOp, isotonic

TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


def ffn_truth(t: float) -> float:
    """A memory-bound then compute-bound expert: flat, then linear (a roofline)."""
    return max(2e-3, 1e-3 + 5e-5 * t)


def fitted(truth=ffn_truth, op="ffn:cpu:4:torch", xs=TOKENS) -> CostModel:
    return CostModel.fit([Sample(op, x, truth(x)) for x in xs for _ in range(3)],
                         {op: {"hidden": 2048, "inter": 768}})


def test_fit_passes_through_knots_and_interpolates_linearly():
    cm = fitted()
    for t in TOKENS:
        assert cm.predict("ffn:cpu:4:torch", t) == pytest.approx(ffn_truth(t))
    # between knots 64 and 128 the fit is the chord
    a, b = ffn_truth(64), ffn_truth(128)
    assert cm.predict("ffn:cpu:4:torch", 96) == pytest.approx((a + b) / 2)
    # beyond the last knot: the last segment's slope
    slope = (ffn_truth(512) - ffn_truth(256)) / 256
    assert cm.predict("ffn:cpu:4:torch", 1024) == pytest.approx(ffn_truth(512) + 512 * slope)


def test_fit_uses_lower_quartiles_and_is_non_decreasing():
    samples = [Sample("flash:read", 4096, s) for s in (1e-4, 1e-4, 9.0)]  # one outlier
    samples += [Sample("flash:read", 8192, s) for s in (0.9e-4, 0.9e-4, 0.9e-4)]  # noise makes it faster
    samples += [Sample("flash:read", 1 << 20, 1e-3)]
    c = CostModel.fit(samples).curve("flash:read")
    assert c.values[0] <= c.values[1] <= c.values[2]
    assert c.values[0] == pytest.approx(0.95e-4) and c.values[1] == pytest.approx(0.95e-4)
    assert len(c.samples) == 7  # raw samples kept


def test_fit_ignores_contention_that_only_adds_time():
    # half of the samples at each size were slowed down by other work (2x to 10x)
    rng = random.Random(2)
    samples = []
    for t in TOKENS:
        samples += [Sample("ffn:cpu:4:torch", t, ffn_truth(t) * rng.uniform(1.0, 1.05)) for _ in range(4)]
        samples += [Sample("ffn:cpu:4:torch", t, ffn_truth(t) * rng.uniform(2, 10)) for _ in range(4)]
    cm = CostModel.fit(samples)
    for t in TOKENS:
        assert cm.predict("ffn:cpu:4:torch", t) == pytest.approx(ffn_truth(t), rel=0.06)


def test_quantile():
    from profiler.costmodel import quantile
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.25) == pytest.approx(1.75)
    assert quantile([5.0], 0.25) == 5.0


def test_isotonic_is_monotone_and_keeps_the_total():
    rng = random.Random(0)
    for _ in range(200):
        v = [rng.choice([1.0, 2.0, 3.0, 0.5]) for _ in range(rng.randint(1, 6))]
        out = isotonic(v, [1.0] * len(v))
        assert all(a <= b + 1e-12 for a, b in zip(out, out[1:]))
        assert sum(out) == pytest.approx(sum(v))  # PAV keeps the total of equal-weight pools


def test_json_round_trip_keeps_samples_fit_and_refinement(tmp_path):
    cm = fitted()
    for t in (3, 100, 700):
        cm.observe("ffn:cpu:4:torch", t, 1.5 * ffn_truth(t))
    path = tmp_path / "cm.json"
    cm.save(path)
    back = CostModel.load(path)
    assert back.to_dict() == json.loads(path.read_text())
    for t in (1, 3, 50, 100, 700, 2000):
        assert back.predict("ffn:cpu:4:torch", t) == pytest.approx(cm.predict("ffn:cpu:4:torch", t))
    with pytest.raises(ValueError):
        CostModel.from_dict({"format": "other", "version": 1, "ops": {}})


def test_ffn_lookup_prefers_exact_bits_then_nearest_then_fastest_backend():
    samples = []
    for op, scale in (("ffn:cpu:4:torch", 1.0), ("ffn:cpu:4:onnxruntime", 0.5), ("ffn:cpu:8:torch", 2.0),
                      ("ffn:cpu:32:torch", 8.0)):
        samples += [Sample(op, t, scale * ffn_truth(t)) for t in TOKENS]
    cm = CostModel.fit(samples)
    assert cm.ffn_op("cpu", 4) == "ffn:cpu:4:onnxruntime"  # fastest backend at 4 bits
    assert cm.ffn_op("cpu", 4, backend="torch") == "ffn:cpu:4:torch"
    assert cm.ffn_op("cpu", 3) == "ffn:cpu:4:onnxruntime"  # nearest bit-width
    assert cm.ffn_op("cpu", 16) == "ffn:cpu:8:torch"
    assert cm.expert_ffn("cpu", 10, bits=32) == pytest.approx(cm.predict("ffn:cpu:32:torch", 10))
    with pytest.raises(UnknownOp):
        cm.ffn_op("cuda", 4)


def test_attention_interpolates_between_probed_batches():
    samples = [Sample(f"attn:cpu:b{b}", c, 1e-4 * b + 1e-8 * b * c) for b in (1, 4) for c in (128, 1024, 8192)]
    cm = CostModel.fit(samples)
    assert cm.attention("cpu", 1, 1024) == pytest.approx(1e-4 + 1e-8 * 1024)
    assert cm.attention("cpu", 2, 1024) == pytest.approx(2e-4 + 2e-8 * 1024)  # linear in batch
    assert cm.attention("cpu", 4, 4096) == pytest.approx(4e-4 + 4e-8 * 4096)


def test_every_kind_of_op_is_answered():
    samples = [Sample("h2d:cuda:pinned", n, 1e-5 + n / 25e9) for n in (1 << 16, 1 << 20, 1 << 24)]
    samples += [Sample("flash:read", n, 1e-4 + n / 3e9) for n in (4096, 1 << 20, 1 << 24)]
    samples += [Sample("unpack:cpu:4", n, n / 1e9) for n in (1 << 16, 1 << 20)]
    cm = CostModel.fit(samples)
    assert cm.h2d(1 << 20) == pytest.approx(1e-5 + (1 << 20) / 25e9)
    assert cm.h2d(1 << 20, pinned=False) == cm.h2d(1 << 20)  # falls back to the probed kind
    assert cm.flash_read(1 << 20) == pytest.approx(1e-4 + (1 << 20) / 3e9)
    assert cm.unpack("cpu", 3, 1 << 20) == pytest.approx((1 << 20) / 1e9)
    with pytest.raises(UnknownOp, match="have:"):
        cm.predict("attn:cuda:b1", 100)


def _max_rel_error(cm: CostModel, op: str, truth) -> float:
    grid = [1, 3, 8, 24, 64, 200, 512, 1000]
    return max(abs(cm.predict(op, t) - truth(t)) / truth(t) for t in grid)


@pytest.mark.parametrize("factor", [2.0, 0.5])
def test_online_refinement_converges_after_a_2x_shift(factor):
    """The machine slows down (or speeds up) 2x; observations at small token counts only."""
    op = "ffn:cpu:4:torch"
    cm = fitted()
    assert _max_rel_error(cm, op, ffn_truth) < 0.05  # interpolation error of the fit at the kink

    def shifted(t):
        return factor * ffn_truth(t)

    rng = random.Random(1)
    errors = []
    for _ in range(60):
        t = rng.choice([1, 2, 3, 5, 8, 13])  # decode-sized batches, as the engine sees most
        cm.observe(op, t, shifted(t) * rng.uniform(0.95, 1.05))  # 5% timing noise
        errors.append(_max_rel_error(cm, op, shifted))
    assert errors[0] > 0.3  # the shift is visible at first
    assert errors[-1] < 0.08  # converged within 60 timings, also far from the observed sizes (512, 1000)
    assert max(errors[-10:]) < 0.1  # and stays there
    assert cm.curve(op).recent_error() is not None


def test_online_refinement_tracks_a_local_change():
    """Only large batches get slower (e.g. a thermal limit under load): the far end adapts."""
    op = "ffn:cpu:4:torch"
    cm = fitted()

    def truth(t):
        return ffn_truth(t) * (2.0 if t >= 256 else 1.0)

    for i in range(300):
        t = [1, 8, 64, 256, 512][i % 5]
        cm.observe(op, t, truth(t))
    for t in (1, 8, 64, 256, 512):
        assert cm.predict(op, t) == pytest.approx(truth(t), rel=0.1)


def test_refinement_memory_is_bounded():
    op = "ffn:cpu:4:torch"
    cm = fitted()
    c = cm.curve(op)
    size0 = len(json.dumps(c.to_dict()))
    for i in range(5000):
        cm.observe(op, 1 + i % 700, ffn_truth(1 + i % 700) * (1 + (i % 7) / 10))
    assert len(c.recent) == RECENT and len(c.local) == len(c.knots) and len(c.samples) == 30
    assert len(json.dumps(c.to_dict())) < size0 + 64 * RECENT  # only the ring of recent errors grew


def test_single_knot_curves_work():
    c = Curve.fit("flash:read", [(4096, 1e-4), (4096, 1.2e-4)])
    assert c.predict(1 << 20) == pytest.approx(1.05e-4)  # lower quartile of the two
    c.observe(4096, 2.2e-4)
    assert c.predict(4096) > 1.05e-4


def test_policy_side_modules_import_no_torch():
    code = ("import sys; import profiler.costmodel, profiler.simulator, profiler.policies, profiler.machine, "
            "profiler.trace, profiler.tracestats, profiler.synthetic, profiler.shapes; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
