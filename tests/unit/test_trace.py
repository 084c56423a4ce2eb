"""Routing traces: recording from a tiny model, the file format's round trip, synthetic traces."""

from __future__ import annotations

import json

import pytest
import torch

from daemon.errors import FormatError
from profiler.shapes import PRESETS, ModelShape
from profiler.synthetic import SyntheticParams, synthetic_trace
from profiler.trace import LayerRouting, StepRecord, Trace, TraceHeader, TraceRecorder, read_trace, record_trace
from profiler.tracestats import trace_stats

SMALL = ModelShape("small", 64, 32, 16, 2, 4, (0, 1, 2, 3), 4, 2, 16)


def _generate(lm, prompt: list[int], n: int) -> None:
    from daemon.generate import generate
    from daemon.sampling import SamplingParams

    for _ in generate(lm, prompt, SamplingParams(max_tokens=n, ignore_eos=True)):
        pass


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v2"])
def test_recorded_trace_round_trips_and_matches_the_routing(loaded, tmp_path, arch):
    lm = loaded(arch)
    seen: list[tuple[int, list, list]] = []

    def capture(layer, routing):
        seen.append((layer, routing.experts.tolist(), routing.weights.float().tolist()))

    prompt = [5, 17, 33, 2, 9]
    try:
        lm.model.observe_routing(capture)
        _generate(lm, prompt, 6)
        rec = record_trace(lm, tmp_path / "t.jsonl")
        _generate(lm, prompt, 6)
        rec.close()
    finally:
        lm.model.observe_routing(None)
    tr = read_trace(tmp_path / "t.jsonl")
    assert tr.header.synthetic is None and "recorded" in tr.header.label
    assert tr.header.model.moe_layers == tuple(lm.model.moe_layers)
    assert tr.header.model.num_experts == lm.args.num_experts
    assert [s.tokens for s in tr.steps] == [len(prompt)] + [1] * 5
    assert [s.context for s in tr.steps] == [0, 5, 6, 7, 8, 9]
    flat = [(r.layer, [list(e) for e in r.experts], [list(w) for w in r.weights]) for s in tr.steps for r in s.layers]
    assert [(l, e) for l, e, _ in flat] == [(l, e) for l, e, _ in seen]  # same experts, same order
    for (_, _, w), (_, _, w0) in zip(flat, seen):
        assert sum(w, []) == pytest.approx(sum(w0, []), rel=1e-4)  # 5 significant digits kept
    for s in tr.steps:
        for r in s.layers:
            assert len(r.scores[0]) == 2 * lm.args.num_experts_per_tok
            for row, ex in zip(r.scores, r.experts):  # the chosen experts are the top scores
                assert {e for e, _ in row[:len(ex)]} == set(ex) or lm.args.model_type == "deepseek_v2"
    # write again from memory and read back: identical
    tr.save(tmp_path / "again.jsonl")
    assert read_trace(tmp_path / "again.jsonl") == tr
    assert (tmp_path / "again.jsonl").read_text() == (tmp_path / "t.jsonl").read_text()


def test_counts_and_scores():
    r = LayerRouting(0, ((1, 2), (2, 3)), ((0.6, 0.4), (0.7, 0.3)),
                     (((1, 0.5), (2, 0.3), (3, 0.1)), ((2, 0.6), (3, 0.2), (0, 0.1))))
    assert r.counts() == {1: 1, 2: 2, 3: 1}
    assert r.expert_scores(2) == pytest.approx({1: 0.25, 2: 0.45, 3: 0.1})
    no_scores = LayerRouting(0, ((1, 2),), ((0.6, 0.4),))
    assert no_scores.expert_scores(4) == pytest.approx({1: 0.6, 2: 0.4})


def test_read_ahead_round_trips_and_is_optional():
    r = LayerRouting(3, ((1, 2),), ((0.6, 0.4),), ahead=(2, 0, 5))
    assert LayerRouting.from_dict(r.to_dict()) == r and r.to_dict()["ahead"] == [2, 0, 5]
    plain = LayerRouting(3, ((1, 2),), ((0.6, 0.4),))
    assert "ahead" not in plain.to_dict() and LayerRouting.from_dict(plain.to_dict()).ahead is None


def test_bad_files_are_named_errors(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"format": "something-else"}) + "\n")
    with pytest.raises(FormatError, match="not a moed routing trace"):
        read_trace(p)
    head = TraceHeader(SMALL).to_dict()
    p.write_text(json.dumps({**head, "version": 99}) + "\n")
    with pytest.raises(FormatError, match="unsupported trace version"):
        read_trace(p)
    step = StepRecord(0, 1, 0, (LayerRouting(0, ((99, 1),), ((0.5, 0.5),)),)).to_dict()
    p.write_text(json.dumps(head) + "\n" + json.dumps(step) + "\n")
    with pytest.raises(FormatError, match="line 2.*out of range"):
        read_trace(p)
    step = StepRecord(0, 1, 0, (LayerRouting(0, ((0, 1),), ((0.5, 0.5),), ahead=(1, 99)),)).to_dict()
    p.write_text(json.dumps(head) + "\n" + json.dumps(step) + "\n")
    with pytest.raises(FormatError, match="line 2.*out of range"):
        read_trace(p)
    p.write_text(json.dumps(head) + "\n{not json\n")
    with pytest.raises(FormatError, match="line 2"):
        read_trace(p)
    with pytest.raises(FormatError, match="no such trace file"):
        read_trace(tmp_path / "missing.jsonl")


def test_recorder_writes_each_step_when_its_last_layer_routes(tmp_path):
    rec = TraceRecorder(tmp_path / "r.jsonl", SMALL, score_top=0)

    class R:  # duck-typed Routing
        experts = torch.tensor([[1, 2]])
        weights = torch.tensor([[0.5, 0.5]])
        logits = torch.zeros(1, 16)

    for layer in SMALL.moe_layers:
        rec(layer, R)
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 2  # header + one whole step
    rec(0, R)
    rec.close()  # the partial step is kept
    tr = read_trace(tmp_path / "r.jsonl")
    assert [len(s.layers) for s in tr.steps] == [4, 1]
    assert tr.steps[0].layers[0].scores is None


def test_synthetic_trace_is_labelled_deterministic_and_round_trips(tmp_path):
    p = SyntheticParams(steps=20, prefill=8, skew=1.2, locality=0.4, seed=3)
    a, b = synthetic_trace(SMALL, p), synthetic_trace(SMALL, p)
    assert a == b
    assert a.header.synthetic["params"]["skew"] == 1.2 and a.header.label.startswith("SYNTHETIC")
    assert [s.tokens for s in a.steps] == [8] + [1] * 20
    for s in a.steps:
        for r in s.layers:
            assert all(len(set(row)) == SMALL.top_k for row in r.experts)
            assert all(sum(w) == pytest.approx(1.0) for w in r.weights)
            assert all(len(row) == 2 * SMALL.top_k for row in r.scores)
    a.save(tmp_path / "s.jsonl")
    back = read_trace(tmp_path / "s.jsonl")
    assert back.header == a.header
    assert [s.layers[0].experts for s in back.steps] == [s.layers[0].experts for s in a.steps]
    with pytest.raises(ValueError):
        synthetic_trace(SMALL, SyntheticParams(locality=1.0))


def test_synthetic_knobs_move_the_statistics():
    shape = PRESETS["olmoe-1b-7b"]

    def stats(**kw):
        st = trace_stats(synthetic_trace(shape, SyntheticParams(steps=200, seed=1, **kw)))
        return sum(ls.skew for ls in st.layers) / len(st.layers), st.curve("lru")[15]

    flat, _ = stats(skew=0.0, locality=0.0)
    skewed, _ = stats(skew=1.5, locality=0.0)
    assert flat < 0.2 < 0.5 < skewed  # top 10% of 64 experts: ~10% of uses when uniform
    _, lru_cold = stats(skew=0.5, locality=0.0)
    _, lru_warm = stats(skew=0.5, locality=0.6)
    assert lru_warm > lru_cold + 0.15  # temporal locality raises LRU hit rates


def test_trace_header_accepts_unknown_keys_and_model_shape_from_config():
    cfg = {"model_type": "qwen2_moe", "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16,
           "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
           "shared_expert_intermediate_size": 5632, "intermediate_size": 5632, "decoder_sparse_step": 1,
           "mlp_only_layers": [0]}
    s = ModelShape.from_config(cfg)
    assert s.moe_layers == tuple(range(1, 24)) and s.shared_inter == 5632 and s.head_dim == 128
    h = TraceHeader.from_dict({**TraceHeader(s).to_dict(), "note": "x"})
    assert h.extra == {"note": "x"} and h.model == s
    trace = Trace(h, ())
    assert trace.tokens == 0
