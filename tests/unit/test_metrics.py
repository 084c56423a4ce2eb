"""Metrics: nearest-rank percentiles, windows that forget, rates over the window; the cost model's check."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from daemon.costcheck import CostCheck, StepPredictor, routed_counts
from daemon.metrics import Metrics, percentiles

PROFILE = Path(__file__).resolve().parents[2] / "bench" / "results" / "profile_this_machine.json"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_percentiles_nearest_rank():
    p = percentiles(range(1, 101))
    assert (p.count, p.p50, p.p90, p.p95, p.p99, p.max) == (100, 50, 90, 95, 99, 100)
    assert percentiles(range(1, 21)).p95 == 19 and percentiles(range(1, 11)).p95 == 10
    assert percentiles([]).count == 0
    one = percentiles([0.3])
    assert one.p50 == one.p99 == one.max == 0.3
    assert percentiles([3, 1, 2]).p50 == 2


def test_rates_and_latencies_cover_their_windows():
    clock = Clock()
    m = Metrics(rate_window=10.0, latency_window=60.0, clock=clock)
    clock.t += 20
    for _ in range(10):
        m.record_step(0.01, batch=4, prefill_tokens=0, decode_tokens=4)
        m.record_token(0.02, first=False)
    m.record_step(0.1, batch=1, prefill_tokens=50, decode_tokens=0)
    m.record_token(0.5, first=True)
    m.record_finish("length", prompt_tokens=50)
    v = m.view()
    assert v.decode_tokens_per_second == 40 / 10 and v.prefill_tokens_per_second == 50 / 10
    assert v.ttft.count == 1 and v.ttft.p50 == 0.5 and v.inter_token.p90 == 0.02
    assert v.mean_batch_size == (10 * 4 + 1) / 11 and v.steps_total == 11
    assert v.finished_by_reason == {"length": 1} and v.generated_tokens_total == 11
    assert v.decode_steps == {4: (10, pytest.approx(0.1))}  # the prefill step is not a decode step
    clock.t += 11  # the rate window has passed, the latency window has not
    v = m.view()
    assert v.decode_tokens_per_second == 0 and v.inter_token.count == 10
    clock.t += 60
    assert m.view().inter_token.count == 0 and m.view().generated_tokens_total == 11  # totals stay


def test_rate_early_in_life_uses_the_uptime():
    clock = Clock()
    m = Metrics(rate_window=10.0, clock=clock)
    clock.t += 2
    m.record_step(0.01, 1, 0, 10)
    assert m.view().decode_tokens_per_second == 5.0


def test_routed_counts_spread_the_picks_over_the_expected_distinct_experts():
    assert routed_counts(1, 8, 2) == (1, 1)
    assert routed_counts(4, 8, 2) == (2, 2, 2, 1, 1)  # 8 * (1 - (3/4)^4) = 5.5 -> 5 experts
    assert routed_counts(100, 8, 2) == (25,) * 8
    assert all(sum(routed_counts(b, 128, 8)) == 8 * b for b in (1, 3, 16, 64))


@pytest.fixture
def tiny_config(tiny_model) -> tuple[str, dict]:
    path = tiny_model("qwen3_moe")
    return str(path), json.loads((path / "config.json").read_text())


def decode_metrics() -> Metrics:
    clock = Clock()
    m = Metrics(clock=clock)
    for b in (1, 2, 2, 4):
        m.record_step(0.01 * b, batch=b, prefill_tokens=0, decode_tokens=b)
    m.record_step(0.5, batch=1, prefill_tokens=40, decode_tokens=0)
    m.record_finish("length", prompt_tokens=40)
    return m


def test_step_predictor_without_a_profile_says_none(tmp_path, tiny_config):
    assert StepPredictor(tmp_path / "profile.json").check(*tiny_config, 32, decode_metrics().view()) is None


def test_step_predictor_reads_the_stored_profile(tmp_path, monkeypatch, tiny_config):
    monkeypatch.setenv("MOED_STATE_DIR", str(tmp_path))
    p = StepPredictor()
    assert p.profile_path() == tmp_path / "profile.json" and p.check(*tiny_config, 32, decode_metrics().view()) is None
    shutil.copy(PROFILE, tmp_path / "profile.json")
    c = p.check(*tiny_config, 32, decode_metrics().view())
    assert isinstance(c, CostCheck) and not c.problem and c.steps == 4 and c.bits == 32
    assert c.measured == pytest.approx((0.01 + 0.02 + 0.02 + 0.04) / 4) and c.batch == 2.25 and c.context == 40
    assert 0 < c.predicted < 1 and c.relative_error == pytest.approx((c.predicted - c.measured) / c.measured)
    assert "measured on" in c.machine
    at8 = p.check(*tiny_config, 8, decode_metrics().view())
    assert at8.predicted != c.predicted  # another bit-width times other kernels
    one = Metrics()
    one.record_step(0.01, batch=1, prefill_tokens=0, decode_tokens=1)
    two = Metrics()
    two.record_step(0.01, batch=2, prefill_tokens=0, decode_tokens=2)
    assert p.check(*tiny_config, 32, two.view()).predicted > p.check(*tiny_config, 32, one.view()).predicted
    assert p.check(*tiny_config, 32, Metrics().view()).steps == 0  # a profile but nothing measured yet


def test_step_predictor_reports_a_bad_profile_and_rereads_a_new_one(tmp_path, tiny_config):
    path = tmp_path / "profile.json"
    path.write_text("{not json")
    p = StepPredictor(path)
    c = p.check(*tiny_config, 32, decode_metrics().view())
    assert c.problem.startswith("cannot read the profile") and c.predicted == 0
    shutil.copy(PROFILE, path)
    os.utime(path, ns=(1, 1))  # a different mtime than the bad file's
    assert not p.check(*tiny_config, 32, decode_metrics().view()).problem
    cfg = {k: v for k, v in tiny_config[1].items() if k != "num_experts"}
    assert "cannot time this model" in p.check("other", cfg, 32, decode_metrics().view()).problem


def test_engine_timings_refine_the_cost_model(tiny_config):
    """Timings the engine measured (CostTimes.observe) move the predictions toward them; the step
    predictor takes them in before it predicts."""
    from profiler.machine import load_machine
    from profiler.shapes import ModelShape

    times = load_machine(PROFILE).times(ModelShape.from_config(tiny_config[1]), 8)
    expert, read, form = times.expert("cpu", 1), times.read(6 << 20), times.cost.unpack("cpu", 8, 6 << 20)
    for _ in range(60):
        assert times.observe("expert", 1, 4 * expert)
        assert times.observe("read", 6 << 20, 3 * read)
        assert times.observe("form", 6 << 20, 2 * form)
    assert times.expert("cpu", 1) == pytest.approx(4 * expert, rel=0.15)
    assert times.read(6 << 20) == pytest.approx(3 * read, rel=0.15)
    assert times.cost.unpack("cpu", 8, 6 << 20) == pytest.approx(2 * form, rel=0.15)
    assert not times.observe("nonsense", 1, 1.0)

    # attention and the head: the profile times attention (scaled to this model); it has no head op, so the
    # head is estimated from the expert kernel's time per weight (at 8 bits, as these times' experts) until the
    # engine times it, then learned from that
    shape = times.shape
    assert shape.vocab == tiny_config[1]["vocab_size"] and "head" not in " ".join(times.cost.ops())
    attn = times.attention(1, 99)
    assert times.head(1) == pytest.approx(times.expert("cpu", 1) * shape.head_params / shape.expert_params)
    assert any("head" in n for n in times.notes)
    for _ in range(60):
        assert times.observe("attn", 100, 2 * attn)
    assert times.attention(1, 99) == pytest.approx(2 * attn, rel=0.15)
    assert times.observe("head", 1, 5e-3) and times.head(1) == pytest.approx(5e-3)
    for _ in range(60):
        assert times.observe("head", 1, 1e-2)
    assert times.head(1) == pytest.approx(1e-2, rel=0.15)
    assert times.cost.curve("head:cpu").meta == {"hidden": shape.hidden, "vocab": shape.vocab}

    p = StepPredictor(PROFILE)
    before = p.check(*tiny_config, 8, decode_metrics().view())
    slower = [("expert", 1.0, 20 * times.expert("cpu", 1))] * 60
    after = p.check(*tiny_config, 8, decode_metrics().view(), slower)
    assert p.observed == 60 and after.predicted > 2 * before.predicted
    assert p.check(*tiny_config, 8, decode_metrics().view()).predicted == after.predicted  # kept


def test_profile_costs_plan_with_a_gpu_profile_only(tmp_path, tiny_config):
    """The scheduler's op times come from a profile that times GPU experts; a CPU-only profile or none
    gives None (experts then run where they are held)."""
    from daemon.costcheck import profile_costs
    from profiler.machine import MACHINES_DIR

    config = tiny_config[1]
    assert profile_costs(config, 4, tmp_path / "none.json") is None
    assert profile_costs(config, 4, PROFILE) is None  # this machine: no GPU
    costs = profile_costs(config, 4, MACHINES_DIR / "laptop-rtx4060-8gb.json")
    assert costs is not None and costs.has_gpu
    assert 0 < costs.gpu(1, 4) < costs.cpu(1, 4) and costs.h2d(1 << 20) > 0 and costs.read(1 << 20) > 0
