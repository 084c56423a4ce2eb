"""Machine profiles: the shipped spec-sheet files, their roofline op times, measured profiles."""

from __future__ import annotations

import json

import pytest

from daemon.errors import MoedError
from profiler.costmodel import CostModel, Sample
from profiler.machine import _roof, load_machine, machine_names
from profiler.shapes import PRESETS

QWEN3 = PRESETS["qwen3-30b-a3b"]


def test_shipped_machines_cite_their_figures():
    assert set(machine_names()) == {"desktop-rtx4090-pcie4", "laptop-rtx4060-8gb", "jetson-agx-orin-64gb"}
    for name in machine_names():
        m = load_machine(name)
        assert m.kind == "spec-sheet" and m.has_gpu and len(m.sources) >= 3
        assert any("spec-sheet" in a for a in m.spec["assumptions"])
    assert load_machine("jetson-agx-orin-64gb").unified
    assert load_machine("laptop-rtx4060-8gb").vram_bytes == 8 << 30


@pytest.mark.parametrize("name", ["desktop-rtx4090-pcie4", "laptop-rtx4060-8gb", "jetson-agx-orin-64gb"])
def test_roofline_times(name):
    m = load_machine(name)
    t = m.times(QWEN3, 4)
    spec = m.spec
    eb = QWEN3.expert_bytes(4)
    # decode: memory-bound; the fit passes through its samples exactly
    assert t.expert("gpu", 1) == pytest.approx(_roof(spec["gpu"], eb, 2.0 * QWEN3.expert_params))
    assert t.expert("cpu", 1) == pytest.approx(_roof(spec["cpu"], eb, 2.0 * QWEN3.expert_params))
    assert t.expert("gpu", 1) < t.expert("cpu", 1)  # the GPU is the faster device for an expert
    assert t.expert("gpu", 512) > t.expert("gpu", 1)
    assert t.read(eb) == pytest.approx(spec["flash"]["latency_s"] + eb / spec["flash"]["bandwidth_Bps"], rel=0.02)
    if m.unified:
        assert t.h2d(eb) == 0.0
    else:
        assert t.h2d(eb) == pytest.approx(spec["pcie"]["latency_s"] + eb / spec["pcie"]["bandwidth_Bps"], rel=0.02)
    assert 0 < t.attention(1, 100) < t.attention(1, 60000)


def test_measured_profile_scales_to_the_model(tmp_path):
    ref = {"hidden": 1024, "inter": 512}
    samples = [Sample("ffn:cpu:32:torch", n, 1e-3 * n) for n in (1, 8, 64)]
    samples += [Sample("attn:cpu:b1", c, 1e-4 + 1e-8 * c) for c in (128, 4096)]
    samples += [Sample("flash:read", n, n / 1e9) for n in (4096, 1 << 20)]
    cm = CostModel.fit(samples, {"ffn:cpu:32:torch": ref, "attn:cpu:b1": {"hidden": 1024, "heads": 8, "kv_heads": 8,
                                                                         "head_dim": 128}})
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"format": "moed-profile", "version": 1, "costmodel": cm.to_dict(),
                             "facts": {"ram_total_bytes": 8 << 30, "gpus": [], "cpu": {"model": "x"}}}))
    m = load_machine(p)
    assert m.kind == "measured" and not m.has_gpu and m.default_budgets() == (0, int(0.8 * (8 << 30)))
    t = m.times(QWEN3, 4)
    scale = QWEN3.expert_params / (3 * 1024 * 512)  # 3x the probed expert's weights
    assert t.expert("cpu", 8) == pytest.approx(8e-3 * scale)
    assert t.notes and "no 4-bit kernel" in t.notes[0]
    assert t.h2d(1 << 20) == 0.0 and t.read(1 << 20) == pytest.approx((1 << 20) / 1e9)


def test_bad_machine_files(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"format": "moed-machine", "version": 1, "name": "x"}))
    with pytest.raises(MoedError, match="lacks"):
        load_machine(p)
    p.write_text("{")
    with pytest.raises(MoedError, match="cannot read"):
        load_machine(p)
    with pytest.raises(MoedError, match="no such machine"):
        load_machine(tmp_path / "nope.json")
