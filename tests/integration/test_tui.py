"""`moed top` driven with run_test() and Pilot against a real daemon serving a tiny model."""

from __future__ import annotations

import asyncio
import html
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from proto.moed.v1 import moed_pb2 as pb
from proto.moed.v1 import moed_pb2_grpc as pb_grpc
from daemon import resources
from tui.app import MoedTop
from tui.widgets.costmodel import CostModelPanel
from tui.widgets.devices import DevicesPanel
from tui.widgets.heatmap import Heatmap
from tui.widgets.help import HelpScreen
from tui.widgets.requests import RequestsPanel
from tui.widgets.throughput import ThroughputPanel

SIZE = (120, 40)
SNAPSHOTS = Path(__file__).parent / "snapshots"
UPDATE = os.environ.get("MOED_UPDATE_SNAPSHOTS") == "1"  # rewrite the stored SVGs (and docs/moed-top.svg)
ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "bench" / "results" / "profile_this_machine.json"  # `moed profile` of this 2-core VM


@pytest.fixture(scope="module")
def server(moed_server):
    return moed_server(max_batch=4, max_queue=16)


class Load:
    """Generate requests against a daemon from background threads until stopped."""

    def __init__(self, target: str, threads: int = 2) -> None:
        self.stop = threading.Event()
        self.done = 0
        self.threads = [threading.Thread(target=self._run, args=(target, i), daemon=True) for i in range(threads)]

    def _run(self, target: str, i: int) -> None:
        s = pb_grpc.MoedStub(grpc.insecure_channel(target))
        n = 0
        while not self.stop.is_set():
            n += 1
            req = pb.GenerateRequest(text=f"load {i} {n}: the experts" + " more" * (n % 7), max_tokens=8 + n % 9,
                                     ignore_eos=True)
            try:
                list(s.Generate(req, timeout=30))
                self.done += 1
            except grpc.RpcError:
                time.sleep(0.1)

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


async def until(pilot, cond: Callable[[], bool], timeout: float = 20.0) -> None:
    """Let the app run until cond() holds; fail after timeout seconds."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out waiting for the app"
        await pilot.pause(0.05)


def text(widget) -> str:
    """A Static's current content as plain text."""
    return str(widget.content)


def test_live_panels_show_nonzero_changing_values(server):
    async def go():
        app = MoedTop(f"unix:{server.socket_path}", interval=0.1)
        async with app.run_test(size=SIZE) as pilot:
            with Load(f"unix:{server.socket_path}"):
                tp, rq = app.query_one(ThroughputPanel), app.query_one(RequestsPanel)
                await until(pilot, lambda: max(tp.decode, default=0) > 0 and max(tp.prefill, default=0) > 0)
                first = text(rq)
                await until(pilot, lambda: text(rq) != first and len(set(tp.decode)) > 2)
            assert "TTFT" in first and "n=0" not in text(rq).splitlines()[2]
            assert re.search(r"TTFT +p50 +[\d.]+ ms +p95 +[\d.]+ ms", text(rq))
            assert re.search(r"ITL +p50 +[\d.]+ ms +p95 +[\d.]+ ms", text(rq))
            assert re.search(r"active +\d+ / 4", text(rq))
            assert "moed" in text(app.query_one("#conn")) and "disconnected" not in text(app.query_one("#conn"))
    asyncio.run(go())


def test_heatmap_has_the_models_layers_and_experts(server):
    st = pb_grpc.MoedStub(grpc.insecure_channel(f"unix:{server.socket_path}")).Status(pb.StatusRequest())
    assert (st.model.moe_layers, st.model.experts_per_layer) == (2, 8)

    async def go():
        app = MoedTop(f"unix:{server.socket_path}", interval=0.1)
        async with app.run_test(size=SIZE) as pilot:
            hm = app.query_one(Heatmap)
            with Load(f"unix:{server.socket_path}", threads=1):
                await until(pilot, lambda: len(hm.layer_ids) == 2 and sum(map(sum, hm.counts)) > 0)
            assert [len(c) for c in hm.counts] == [8, 8]
            assert text(hm).startswith("2 layers x 8 experts")
            assert hm.held == [[("r", 32)] * 8] * 2  # untiered: every expert in RAM at the model's float32
            assert re.search(r">L0 +(r\+){8}\n", text(hm)) and "held   ram 8 at 32 bits" in text(hm)
            assert "v vram r ram f flash, then bits (+ 32)" in text(hm)
            hm.focus()
            await until(pilot, lambda: app.focused is hm)
            await pilot.press("l")
            await until(pilot, lambda: hm.selected == 1 and ">L1" in text(hm))
            await pilot.press("right")
            await until(pilot, lambda: hm.selected == 0 and ">L0" in text(hm))
            await pilot.press("left", "h")
            await until(pilot, lambda: hm.selected == 0 and ">L0" in text(hm))
    asyncio.run(go())


def test_key_bindings(server):
    async def go():
        app = MoedTop(f"unix:{server.socket_path}", interval=0.05)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.snapshots >= 2)
            order = []
            for _ in range(6):
                order.append(type(app.focused).__name__)
                await pilot.press("tab")
            assert order == ["ThroughputPanel", "RequestsPanel", "TiersPanel", "Heatmap", "DevicesPanel",
                             "CostModelPanel"]
            assert type(app.focused).__name__ == "ThroughputPanel"
            await pilot.press("shift+tab")
            assert type(app.focused).__name__ == "CostModelPanel"
            await pilot.press("p")
            n = app.snapshots
            await pilot.pause(0.5)
            assert app.paused and app.snapshots == n and "[paused]" in text(app.query_one("#conn"))
            await pilot.press("p")
            await until(pilot, lambda: app.snapshots > n)
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            assert not isinstance(app.screen, HelpScreen)
            await pilot.press("q")
            await pilot.pause(0.2)
        assert not app.is_running
    asyncio.run(go())


def test_heatmap_shows_tier_and_bits_of_tiered_experts(moed_server, monkeypatch, tmp_path):
    monkeypatch.setenv("MOED_HOME", str(tmp_path))  # the model is converted to a store there
    srv = moed_server(ram_budget="30%")
    provider = srv.engine.loaded.experts

    async def go():
        app = MoedTop(f"unix:{srv.socket_path}", interval=0.1)
        async with app.run_test(size=SIZE) as pilot:
            hm = app.query_one(Heatmap)
            with Load(f"unix:{srv.socket_path}", threads=1):
                await until(pilot, lambda: sum(map(sum, hm.counts)) > 0 and
                            {t for row in hm.held for t, _ in row} == {"r", "f"})

            def daemon_side() -> list[list[tuple[str, int]]]:
                ram = provider.resident("ram")
                return [[("r", ram[(layer, e)]) if (layer, e) in ram else ("f", 0) for e in range(8)] for layer in (0, 1)]

            await until(pilot, lambda: hm.held == daemon_side())  # idle now: the next snapshots show the residency
            ram = provider.resident("ram")
            assert set(ram.values()) == {8} and 0 < len(ram) < 16
            rows = text(hm).splitlines()
            assert all(re.fullmatch(r"[> ]L\d +((r8|f-){8})", r) for r in rows[1:3]), rows
            in_ram = sum(t == "r" for t, _ in hm.held[0])
            parts = (in_ram and f"ram {in_ram} at 8 bits", in_ram < 8 and f"flash {8 - in_ram}")
            held = ", ".join(p for p in parts if p)
            assert f"held   {held}\n" in text(hm)
            assert "v vram r ram f flash, then bits  cold" in text(hm)
    asyncio.run(go())


def test_devices_panel_without_a_gpu_says_why(server):
    if resources.nvml()[0] is not None:
        pytest.skip("this machine has NVML")

    async def go():
        app = MoedTop(f"unix:{server.socket_path}", interval=0.1)
        async with app.run_test(size=SIZE) as pilot:
            dev = app.query_one(DevicesPanel)
            await until(pilot, lambda: "cpu" in text(dev) and "rss" in text(dev) and app.snapshots > 0)
            lines = text(dev).splitlines()
            assert re.match(r"cpu +(\d+%|n/a)  [\d.]+ [KMG]iB / [\d.]+ GiB  \d+ threads", lines[1]), lines
            assert "gpu     no GPU (NVML: " in text(dev) and "cuda" not in text(dev)
    asyncio.run(go())


class FakeNVML:
    """pynvml's calls for one GPU, as a real driver answers them (PCIe TX not supported on this board)."""

    NVML_PCIE_UTIL_TX_BYTES, NVML_PCIE_UTIL_RX_BYTES = 0, 1

    class NVMLError(Exception):
        pass

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("handle", i)

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"  # bytes from older pynvml, str from newer

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=80 << 30, used=10 << 30, free=70 << 30)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=45, memory=20)

    def nvmlDeviceGetPcieThroughput(self, h, counter):
        if counter == self.NVML_PCIE_UTIL_TX_BYTES:
            raise self.NVMLError("Not Supported")
        return 2 << 20  # KiB/s: 2 GiB/s


def test_devices_panel_shows_a_gpu_read_through_nvml(server, monkeypatch):
    monkeypatch.setattr(resources, "nvml", lambda: (FakeNVML(), ""))  # the daemon's Status reads the fake

    async def go():
        app = MoedTop(f"unix:{server.socket_path}", interval=0.1)
        async with app.run_test(size=SIZE) as pilot:
            dev = app.query_one(DevicesPanel)
            await until(pilot, lambda: "cuda:0" in text(dev))
            assert "cuda:0   45%  10.0 GiB / 80.0 GiB  NVIDIA H100 80GB HBM3" in text(dev)
            assert "pcie  to gpu 2.0 GiB/s  from gpu n/a" in text(dev) and "no GPU" not in text(dev)
    asyncio.run(go())


def test_cost_model_panel_without_and_with_a_profile(server, monkeypatch, tmp_path):
    monkeypatch.setenv("MOED_STATE_DIR", str(tmp_path))  # where `moed profile` stores profile.json

    async def go():
        app = MoedTop(f"unix:{server.socket_path}", interval=0.1)
        async with app.run_test(size=SIZE) as pilot:
            cm = app.query_one(CostModelPanel)
            await until(pilot, lambda: app.snapshots > 1)
            assert text(cm).startswith("no profile (run moed profile)\nall steps p50")
            shutil.copy(PROFILE, tmp_path / "profile.json")
            with Load(f"unix:{server.socket_path}", threads=1):
                await until(pilot, lambda: "decode step predicted" in text(cm))
            lines = text(cm).splitlines()
            assert re.fullmatch(r"decode step predicted [\d.]+ ms  measured [\d.]+ ms  n=\d+", lines[0]), lines
            assert re.fullmatch(r"error +[+-]\d+%  \(predicted - measured\) / measured", lines[1]), lines
            assert re.fullmatch(r"assumes   batch [\d.]+, context ~\d+, 32-bit experts resident", lines[2]), lines
            assert lines[3].startswith("profile   measured on ")
    asyncio.run(go())


@pytest.mark.slow
def test_daemon_restart_shows_disconnected_then_recovers(moed_server):
    srv = moed_server()
    path = str(srv.socket_path)

    async def go():
        app = MoedTop(f"unix:{path}", interval=0.1)
        async with app.run_test(size=SIZE) as pilot:
            conn = app.query_one("#conn")
            await until(pilot, lambda: app.snapshots >= 2)
            await asyncio.to_thread(srv.stop)
            await until(pilot, lambda: "disconnected" in text(conn) and conn.has_class("disconnected"))
            n = app.snapshots
            await asyncio.to_thread(moed_server, socket=path)
            await until(pilot, lambda: app.snapshots > n + 1 and "disconnected" not in text(conn), timeout=30)
            assert not conn.has_class("disconnected")
    asyncio.run(go())


def recorded() -> tuple[pb.StatusResponse, list[pb.MetricsSnapshot]]:
    """A fixed Status and two Watch snapshots of a tiny qwen3_moe daemon under load, its experts tiered (RAM
    budget of half of them at 8 bits, the rest on flash), with this machine's profile and no GPU."""
    cpu = pb.Device(name="cpu", kind="cpu", description="x86_64", memory_total_bytes=16 << 30,
                    memory_used_bytes=5 << 30, threads=2, utilization=0.37)
    st = pb.StatusResponse(version="0.1.0", state=pb.SERVING_STATE_SERVING, devices=[cpu], pid=4242,
                           rss_bytes=612 << 20, gpu_note="no GPU (NVML: NVML Shared Library Not Found)",
                           model=pb.ModelInfo(name="tiny-qwen3_moe", architecture="qwen3_moe",
                                              layers=2, moe_layers=2, experts_per_layer=8))
    snaps = []
    for k in (1, 2):
        use = []
        for layer in (0, 1):
            counts = [k * ((e * 7 + layer * 3) % 11) for e in range(8)]
            in_ram = set(sorted(range(8), key=lambda e: -counts[e])[:4])
            use.append(pb.LayerExpertUse(layer=layer, counts=counts, bits=[8 if e in in_ram else 0 for e in range(8)],
                                         tier=[pb.EXPERT_TIER_RAM if e in in_ram else pb.EXPERT_TIER_FLASH
                                               for e in range(8)]))
        ram = pb.MemoryTier(name="ram", device="cpu", budget_bytes=8 << 20, used_bytes=(6 << 20) + k,
                            experts_resident=8, experts_total=16, hits=600 * k, misses=300 * k, hit_rate=2 / 3,
                            experts_by_bits={8: 8})
        flash = pb.LinkStats(source="flash", target="ram", bytes_moved=(200 << 20) * k, transfers=300 * k,
                             busy_seconds=0.5 * k)
        snaps.append(pb.MetricsSnapshot(
            timestamp=1000.0 + k, uptime_seconds=60.0 + k, window_seconds=10, prefill_tokens_per_second=410.5 * k,
            decode_tokens_per_second=95.25 * k, ttft_seconds=pb.Percentiles(count=12, p50=0.031, p90=0.052, p95=0.061),
            inter_token_seconds=pb.Percentiles(count=340, p50=0.009, p90=0.014, p95=0.017),
            step_seconds=pb.Percentiles(count=400, p50=0.008, p90=0.012, p95=0.015),
            queue=pb.QueueInfo(running=3, waiting=1, max_batch=4, max_queue=16, completed=40 * k, engine_steps=500),
            requests_total=44 * k, finished_by_reason={"length": 40 * k}, prompt_tokens_total=900 * k,
            generated_tokens_total=700 * k, expert_use=use, tiers=[ram], links=[flash], rss_bytes=612 << 20,
            mean_batch_size=2.5, cost_model=pb.CostModelCheck(
                predicted_step_seconds=0.0021, measured_step_seconds=0.0075, relative_error=0.0021 / 0.0075 - 1,
                steps=360, batch=2.5, context=38, bits=8, machine="measured on vm: AMD EPYC, 23.5 GiB RAM, no GPU")))
    return st, snaps


def screen_text(svg: str) -> list[str]:
    """The rows of text in an exported SVG, digits masked, in screen order."""
    rows: dict[float, list[str]] = {}
    for y, body in re.findall(r'<text [^>]*?y="([\d.]+)"[^>]*>(.*?)</text>', svg):
        rows.setdefault(float(y), []).append(html.unescape(body).replace("\xa0", " "))
    return [re.sub(r"\d", "9", "".join(parts)).rstrip() for _, parts in sorted(rows.items())]


def check_snapshot(name: str, svg: str) -> None:
    path = SNAPSHOTS / name
    if UPDATE or not path.exists():
        path.write_text(svg)
    assert screen_text(svg) == screen_text(path.read_text())


async def frozen_app(pilot_fn) -> str:
    app = MoedTop(None)
    async with app.run_test(size=SIZE) as pilot:
        st, snaps = recorded()
        app.show_status(st)
        for s in snaps:
            app.show_snapshot(s)
        await pilot_fn(pilot)
        await pilot.pause()
        return app.export_screenshot()


def test_snapshot_main_screen():
    async def nothing(pilot):
        pass
    svg = asyncio.run(frozen_app(nothing))
    assert "tiny-qwen9_moe" in "\n".join(screen_text(svg))
    check_snapshot("main.svg", svg)


def test_snapshot_help_screen():
    async def help_(pilot):
        await pilot.press("question_mark")
    svg = asyncio.run(frozen_app(help_))
    assert any("pause / resume updates" in row for row in screen_text(svg))
    check_snapshot("help.svg", svg)


@pytest.mark.skipif(not UPDATE, reason="rewrites docs/moed-top.svg; run with MOED_UPDATE_SNAPSHOTS=1")
def test_docs_screenshot(moed_server, monkeypatch, tmp_path):
    """The README's screenshot: a tiered daemon (half its experts' bytes in RAM) under load, this machine's profile."""
    monkeypatch.setenv("MOED_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MOED_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "state").mkdir()
    shutil.copy(PROFILE, tmp_path / "state" / "profile.json")
    srv = moed_server(max_batch=4, max_queue=64, ram_budget="50%")

    async def go():
        app = MoedTop(f"unix:{srv.socket_path}", interval=0.5)
        async with app.run_test(size=SIZE) as pilot:
            cm = app.query_one(CostModelPanel)
            with Load(f"unix:{srv.socket_path}", threads=3):
                await until(pilot, lambda: app.snapshots >= 40 and "decode step predicted" in text(cm), timeout=60)
                (ROOT / "docs" / "moed-top.svg").write_text(app.export_screenshot())
    asyncio.run(go())
