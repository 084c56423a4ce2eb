"""The engine stepped by hand (no loop thread): joining, limits, cancellation, deadlines, sampling state."""

from __future__ import annotations

import time

import pytest

from daemon.config import Config
from daemon.engine import Engine
from daemon.generate import generate
from daemon.records import Finished, GenRequest, Prompt, TokenEvent
from daemon.request_errors import QueueFull, Unavailable
from daemon.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine_for(tiny_model):
    """engine_for(**config) -> an Engine with the tiny qwen3_moe loaded; its loop thread not started."""
    def make(**cfg) -> Engine:
        e = Engine(Config(keep_alive=-1, **cfg))
        e.load(str(tiny_model("qwen3_moe")))
        return e
    return make


def req(text: str, n: int, **params) -> GenRequest:
    return GenRequest(Prompt(text=text), SamplingParams(ignore_eos=True, **params), max_tokens=n)


def drain(handle) -> tuple[list[int], list[TokenEvent], Finished | None]:
    """Events already delivered to a handle (without blocking)."""
    events = []
    while not handle.seq.events.empty():
        events.append(handle.seq.events.get())
    toks = [e for e in events if isinstance(e, TokenEvent)]
    done = next((e for e in events if isinstance(e, Finished)), None)
    return [t for e in toks for t in e.ids], toks, done


def alone(lm, text: str, n: int, **params) -> list[int]:
    return [s.token for s in generate(lm, lm.tokenizer.encode(text), SamplingParams(max_tokens=n, ignore_eos=True,
                                                                                       **params))]


def test_requests_join_between_steps_and_keep_their_own_sampling(engine_for, loaded):
    e = engine_for(max_batch=4)
    lm = loaded("qwen3_moe")
    a = e.submit(req("The first request", 6, temperature=0.9, top_k=50, seed=11))
    assert e.step() == 1
    assert e.step() == 1
    b = e.submit(req("A second one joins", 4))
    assert e.step() == 2  # b's prefill and a's decode in one step
    while e.step():
        pass
    a_ids, a_ev, a_done = drain(a)
    b_ids, b_ev, b_done = drain(b)
    assert [ev.batch_size for ev in a_ev] == [1, 1, 2, 2, 2, 2]
    assert [ev.batch_size for ev in b_ev] == [2, 2, 2, 2]
    assert a_ids == alone(lm, "The first request", 6, temperature=0.9, top_k=50, seed=11)
    assert b_ids == alone(lm, "A second one joins", 4)
    assert a_done.summary.finish_reason == b_done.summary.finish_reason == "length"
    assert a_done.summary.generated_tokens == 6 and a_done.summary.prompt_tokens == len(lm.tokenizer.encode(
        "The first request"))
    assert e.queue_view().completed == 2 and e.queue_view().running == 0


def test_batch_limit_holds_requests_back(engine_for):
    e = engine_for(max_batch=2, max_queue=8)
    handles = [e.submit(req(f"request {i}", 2)) for i in range(3)]
    assert e.step() == 2
    q = e.queue_view()
    assert (q.running, q.waiting) == (2, 1)
    assert e.step() == 2  # both finish after their second token
    assert e.step() == 1  # the third got a slot
    assert drain(handles[2])[1][0].engine_step == 3


def test_cancel_and_deadline_free_the_slot_at_the_next_boundary(engine_for):
    e = engine_for(max_batch=1, max_queue=4)
    a = e.submit(req("to be cancelled", 100))
    b = e.submit(GenRequest(Prompt(text="expires"), SamplingParams(ignore_eos=True), 100,
                            deadline=time.monotonic() + 3600))
    c = e.submit(req("waits its turn", 2))
    e.step()
    e.step()
    a.cancel()
    e.step()  # a leaves, b joins in the same step
    _, _, a_done = drain(a)
    assert a_done.summary.finish_reason == "cancelled" and a_done.summary.generated_tokens == 2
    assert drain(b)[1][0].engine_step == 3
    b.seq.deadline = time.monotonic()  # now past
    e.step()
    assert drain(b)[2].summary.finish_reason == "deadline"
    assert drain(c)[1][0].engine_step == 4
    recs = {r.reason: r for r in e.finished()}
    assert recs["cancelled"].steps_late == 0 and recs["deadline"].steps_late == 0


def test_waiting_requests_can_be_cancelled_too(engine_for):
    e = engine_for(max_batch=1, max_queue=4)
    e.submit(req("running", 3))
    w = e.submit(req("waiting", 3))
    e.step()
    w.cancel()
    e.step()
    _, toks, done = drain(w)
    assert not toks and done.summary.finish_reason == "cancelled" and done.summary.generated_tokens == 0


def test_queue_limit_and_drain(engine_for):
    e = engine_for(max_batch=1, max_queue=1)
    e.submit(req("one", 3))
    e.submit(req("two", 3))
    with pytest.raises(QueueFull, match="queue is full"):
        e.submit(req("three", 3))
    assert e.queue_view().rejected == 1
    e.drain()
    e.cancel_all("shutdown")
    with pytest.raises(Unavailable, match="shutting down"):
        e.submit(req("four", 3))


def test_stop_strings_and_eos_end_a_request(engine_for, loaded):
    e = engine_for()
    lm = loaded("qwen3_moe")
    text = lm.tokenizer.decode(alone(lm, "The expert said", 30))
    stop = text[10:13]
    h = e.submit(GenRequest(Prompt(text="The expert said"), SamplingParams(stop=(stop,), ignore_eos=True), 30))
    while e.step():
        pass
    _, toks, done = drain(h)
    out = "".join(t.text for t in toks) + done.text
    assert done.summary.finish_reason == "stop" and out == text[:text.index(stop)]
