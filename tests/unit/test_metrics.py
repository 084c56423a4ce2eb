"""Metrics: nearest-rank percentiles, windows that forget, rates over the window."""

from __future__ import annotations

from daemon.metrics import Metrics, percentiles


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_percentiles_nearest_rank():
    p = percentiles(range(1, 101))
    assert (p.count, p.p50, p.p90, p.p99, p.max) == (100, 50, 90, 99, 100)
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
