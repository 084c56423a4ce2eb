"""The request queue and batch admission, with plain objects and numbers."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.request_errors import QueueFull, Unavailable
from daemon.scheduler import Scheduler, drop_reason


@dataclass(eq=False)
class Item:
    name: str
    cancelled: bool = False
    deadline: float | None = None


def names(items) -> list[str]:
    return [i.name for i in items]


def test_fifo_admission_up_to_the_batch_limit():
    s = Scheduler(max_batch=2, max_queue=3)
    a, b, c = Item("a"), Item("b"), Item("c")
    for i in (a, b, c):
        s.submit(i)
    plan = s.schedule(now=0.0)
    assert names(plan.running) == ["a", "b"] and names(plan.admitted) == ["a", "b"]
    assert names(s.waiting) == ["c"]
    s.finish(a)
    plan = s.schedule(now=1.0)
    assert names(plan.running) == ["b", "c"] and names(plan.admitted) == ["c"]


def test_queue_limit_counts_running_and_waiting():
    s = Scheduler(max_batch=1, max_queue=1)
    s.submit(Item("a"))
    s.submit(Item("b"))
    with pytest.raises(QueueFull):
        s.submit(Item("c"))
    assert s.rejected == 1
    s.schedule(0.0)
    with pytest.raises(QueueFull):  # a runs, b waits: still full
        s.submit(Item("c"))


def test_cancelled_and_expired_leave_before_admission():
    s = Scheduler(max_batch=2, max_queue=4)
    a, b, c, d = Item("a"), Item("b", deadline=5.0), Item("c"), Item("d")
    for i in (a, b, c, d):
        s.submit(i)
    s.schedule(0.0)
    a.cancelled = True
    c.cancelled = True  # still waiting
    plan = s.schedule(5.0)
    assert [(i.name, r) for i, r in plan.dropped] == [("a", "cancelled"), ("b", "deadline"), ("c", "cancelled")]
    assert names(plan.running) == ["d"] and names(plan.admitted) == ["d"]


def test_deadline_wins_over_cancel():
    assert drop_reason(Item("x", cancelled=True, deadline=1.0), now=1.0) == "deadline"
    assert drop_reason(Item("x", cancelled=True, deadline=2.0), now=1.0) == "cancelled"
    assert drop_reason(Item("x", deadline=2.0), now=1.0) is None


def test_draining_refuses_new_work():
    s = Scheduler(1, 1)
    s.accepting = False
    with pytest.raises(Unavailable):
        s.submit(Item("a"))
    assert s.idle


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4), st.integers(0, 4),
       st.lists(st.tuples(st.sampled_from(["submit", "cancel", "finish", "step"]), st.integers(0, 20)), max_size=60))
def test_invariants_under_any_sequence_of_events(max_batch, max_queue, events):
    s = Scheduler(max_batch, max_queue)
    items: list[Item] = []
    now = 0.0
    for kind, k in events:
        if kind == "submit":
            it = Item(str(len(items)), deadline=now + k if k % 3 == 0 else None)
            try:
                s.submit(it)
                items.append(it)
            except QueueFull:
                assert len(s.running) + len(s.waiting) == max_batch + max_queue
        elif kind == "cancel" and items:
            items[k % len(items)].cancelled = True
        elif kind == "finish" and s.running:
            s.finish(s.running[k % len(s.running)])
        elif kind == "step":
            now += 1
            plan = s.schedule(now)
            assert all(drop_reason(i, now) is None for i in plan.running)
            assert len(plan.running) <= max_batch
            assert len(plan.running) == max_batch or not s.waiting  # no free slot left unused
        assert len(s.running) <= max_batch
        assert not set(map(id, s.running)) & set(map(id, s.waiting))
