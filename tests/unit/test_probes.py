"""Probes (torch): which ops they time, the quant-registry coupling and its fallback, the profile record."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

from profiler.costmodel import CostModel
from profiler.probes import (ProbePlan, _reference_unpack, probe_attention, probe_ffn, probe_h2d,
                             probe_unpack, time_call)
from profiler.shapes import ModelShape

SHAPE = ModelShape("probe", 256, 128, 8, 2, 2, (0, 1), 4, 2, 64)
TINY = ProbePlan(tokens=(1, 8), ffn_bits=(4,), rotate=2, attn_batches=(1, 2), attn_contexts=(16, 64),
                 copy_sizes=(4096, 65536), flash_sizes=(4096, 65536), flash_file_bytes=1 << 20, unpack_bits=(4,),
                 unpack_rows=(16, 32), repeats=2, min_time=0.0, max_time=1.0)


def test_time_call_repeats_and_budget():
    calls = []
    out = time_call(calls.append, repeats=3)
    assert len(out) == 3 and calls == [0, 1, 2, 3]  # one warm-up
    assert len(time_call(lambda i: None, repeats=2, min_time=10.0)) == 8  # fast op: up to 4x repeats
    assert len(time_call(lambda i: sum(range(20000)), repeats=5, max_time=0.0)) == 2  # slow op: stops early


def test_ffn_probe_times_torch_path_and_quant_backends():
    samples, meta, notes = probe_ffn(SHAPE, TINY)
    ops = {s.op for s in samples}
    assert "ffn:cpu:32:torch" in ops
    assert {s.x for s in samples} == {1, 8}
    assert meta["ffn:cpu:32:torch"] == {"hidden": 256, "inter": 128}
    try:
        from quant.kernels import available_backends
    except ImportError:
        return
    for name in available_backends():
        if name != "cuda":
            assert f"ffn:cpu:4:{name}" in ops or any(name in n for n in notes), (name, notes)
    assert all(s.seconds > 0 for s in samples)


def test_ffn_probe_falls_back_when_quant_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "quant.kernels", None)  # import fails
    samples, meta, notes = probe_ffn(SHAPE, TINY)
    assert {s.op for s in samples} == {"ffn:cpu:32:torch"}
    assert "not importable" in notes[0]


def test_attention_probe_grid():
    samples, meta = probe_attention(SHAPE, TINY)
    assert {(s.op, s.x) for s in samples} == {(f"attn:cpu:b{b}", c + 1) for b in (1, 2) for c in (16, 64)}
    assert meta["attn:cpu:b2"]["kv_heads"] == 2


def test_h2d_probe_skips_cleanly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    assert probe_h2d(TINY) == ([], ["no CUDA device: host-to-device copies not probed"])


@pytest.mark.cuda
def test_h2d_probe_on_cuda():
    samples, notes = probe_h2d(TINY)
    assert {s.op for s in samples} == {"h2d:cuda:pinned", "h2d:cuda:pageable"} and not notes


def test_unpack_probe_and_reference_unpacker():
    samples, meta, notes = probe_unpack(SHAPE, TINY)
    assert {s.op for s in samples} == {"unpack:cpu:4"} and not notes
    assert sorted({s.x for s in samples}) == [16 * 256 * 4 // 8 + 4 * 16 * 2, 32 * 256 * 4 // 8 + 4 * 32 * 2]
    quant = pytest.importorskip("quant.planes")
    from quant.views import msb_view
    g = torch.Generator().manual_seed(0)
    codes8 = torch.randint(0, 256, (8, 256), dtype=torch.uint8, generator=g)
    scale, minimum = torch.rand(8, 2, generator=g), torch.rand(8, 2, generator=g)
    planes = quant.pack_planes(codes8)
    for r in (8, 4, 2):
        ref = msb_view(codes8, scale, minimum, r, 128).dequantize()
        assert torch.allclose(_reference_unpack(planes[:r], 8, 256, scale, minimum, 128), ref, atol=1e-6)


def test_profile_record_holds_facts_samples_and_fit(tmp_path, monkeypatch):
    from profiler.profile import format_profile, load_profile, run_profile, save_profile

    monkeypatch.setattr("profiler.shapes.PRESETS", {"probe": SHAPE})
    prof = run_profile(shape_name="probe", flash_dir=tmp_path, plan=TINY)
    path = save_profile(prof, tmp_path / "p.json")
    back = load_profile(path)
    assert back == json.loads(json.dumps(prof))
    assert back["facts"]["cpu"]["logical_cores"] >= 1 and "ram_total_bytes" in back["facts"]
    assert back["plan"] == json.loads(json.dumps(dataclasses.asdict(TINY)))
    cm = CostModel.from_dict(back["costmodel"])
    ops = cm.ops()
    assert {"ffn:cpu:32:torch", "attn:cpu:b1", "flash:read", "unpack:cpu:4"} <= set(ops)
    for op in ops:
        d = cm.curve(op).to_dict()
        assert d["samples"] and d["fit"]["knots"] and d["fit"]["values"]  # raw samples and the fit
    assert back["costmodel"]["ops"]["flash:read"]["meta"]["cold_verified"] in (True, None)
    text = format_profile(back)
    assert "ffn:cpu:32:torch" in text and "flash:read" in text and "B/s" in text


def test_one_token_ffn_is_timed_as_the_engine_runs_a_decode_layer():
    """A backend with threads of its own (native) runs a decode layer's resident experts in one call split over
    them: its one-token probe runs top_k experts a call (each the expert's own output) and records the time per
    expert; other token counts and backends run one expert a call."""
    from quant.kernels import available_backends, get_backend

    from profiler.probes import quant_ffn_runners, random_experts

    experts = random_experts(SHAPE, 3)
    runners, _, batched = quant_ffn_runners(experts, "cpu", (4,), together=2)
    run = dict(runners)
    want = {f"ffn:cpu:4:{n}" for n in available_backends() if n != "cuda" and get_backend(n).threads_inside}
    assert batched == want
    x = torch.randn(1, SHAPE.hidden, generator=torch.Generator().manual_seed(3))
    for op in batched:
        one = run[op]
        got = one(x, 2)  # experts 2 and 0 (rotating over 3)
        assert got.shape == (2, 1, SHAPE.hidden)
        for row, e in ((0, 2), (1, 0)):  # each the expert's own output (here from a call of two tokens, one expert)
            alone = one(torch.cat([x, x]), e)
            assert alone.shape == (2, SHAPE.hidden) and torch.allclose(got[row], alone[:1], rtol=1e-4, atol=1e-5)
    _, _, notes = probe_ffn(SHAPE, TINY)
    assert not batched or any(f"{SHAPE.top_k} experts a call" in n for n in notes)
