"""What the machine and the daemon hold: devices, process memory, the tiers experts live in."""

from __future__ import annotations

import functools
import os
import resource
import threading
from dataclasses import dataclass
from types import ModuleType

import psutil
import torch

from offload.views import LinkView, TierView
from profiler.hardware import cpu_facts
from quant import native

__all__ = ["CpuMeter", "DeviceView", "LinkView", "TierView", "cpu_description", "cpu_model", "devices", "gpu_note",
           "nvml", "ram_tier", "rss_bytes"]


@dataclass(frozen=True, slots=True)
class DeviceView:
    """One compute device and its memory."""

    name: str
    kind: str
    description: str
    memory_total: int
    memory_used: int
    threads: int = 0
    utilization: float | None = None  # busy share 0..1; None: unknown
    pcie_tx: int | None = None  # bytes/s device -> host (NVML); None: unknown
    pcie_rx: int | None = None  # bytes/s host -> device


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (read once: it does not change while the daemon runs)."""
    return cpu_facts().model


def cpu_description() -> str:
    """The CPU's model, and the path moed's native kernels take on it once they are loaded (AVX512-VNNI, AVX2 or
    plain C: a 2-4x difference in speed; a status never waits for them to be built)."""
    simd = native.simd() if native.library.cache_info().currsize else None
    return cpu_model() + (f" (moed kernels: {simd})" if simd else "")


class CpuMeter:
    """Busy share of all CPUs between successive readings, whichever thread reads (psutil.cpu_percent keeps
    its previous sample per thread, and RPCs run on any thread of a pool)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = psutil.cpu_times()

    @staticmethod
    def _total_busy(t) -> tuple[float, float]:
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)  # guest time is in user's
        return total, total - t.idle - getattr(t, "iowait", 0.0)

    def busy(self) -> float | None:
        """Share 0..1 of the CPU time since the previous reading (or since made) that was busy; None if none passed."""
        now = psutil.cpu_times()
        with self._lock:
            last, self._last = self._last, now
        (t1, b1), (t0, b0) = self._total_busy(now), self._total_busy(last)
        return min(max((b1 - b0) / (t1 - t0), 0.0), 1.0) if t1 > t0 else None


@functools.cache
def nvml() -> tuple[ModuleType | None, str]:
    """(the initialised pynvml module, "") or (None, why NVML is unavailable); initialised once per process."""
    try:
        import pynvml
    except ImportError:
        return None, "no GPU data (nvidia-ml-py not installed)"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return None, f"no GPU (NVML: {e})"
    return pynvml, ""


def nvml_devices(nv: ModuleType) -> list[DeviceView]:
    """Every GPU NVML sees: memory, utilisation and PCIe throughput (fields NVML does not support: None).

    Named by NVML's index (PCI bus order; CUDA numbers them alike with CUDA_DEVICE_ORDER=PCI_BUS_ID).
    """
    def read(fn, *args):
        try:
            return fn(*args)
        except nv.NVMLError:  # e.g. NVML_ERROR_NOT_SUPPORTED on some boards
            return None

    out = []
    for i in range(nv.nvmlDeviceGetCount()):
        h = nv.nvmlDeviceGetHandleByIndex(i)
        name = nv.nvmlDeviceGetName(h)
        mem = read(nv.nvmlDeviceGetMemoryInfo, h)
        util = read(nv.nvmlDeviceGetUtilizationRates, h)
        tx, rx = (read(nv.nvmlDeviceGetPcieThroughput, h, c) for c in (nv.NVML_PCIE_UTIL_TX_BYTES,
                                                                         nv.NVML_PCIE_UTIL_RX_BYTES))
        out.append(DeviceView(f"cuda:{i}", "cuda", name.decode() if isinstance(name, bytes) else name,
                              mem.total if mem else 0, mem.used if mem else 0, 0,
                              util.gpu / 100 if util else None,
                              tx * 1024 if tx is not None else None, rx * 1024 if rx is not None else None))  # KiB/s
    return out


def devices(cpu: CpuMeter | None = None) -> list[DeviceView]:
    """The CPU (system RAM; busy share from `cpu`), then the GPUs: from NVML where it works, else the CUDA
    devices torch sees."""
    vm = psutil.virtual_memory()
    out = [DeviceView("cpu", "cpu", cpu_description(), vm.total, vm.total - vm.available, torch.get_num_threads(),
                      cpu.busy() if cpu is not None else None)]
    nv, _ = nvml()
    if nv is not None:
        try:
            return out + nvml_devices(nv)
        except nv.NVMLError:  # a GPU fell off the bus, the driver went away: ask torch instead
            pass
    if torch.cuda.is_available():  # e.g. a Jetson, which has no NVML
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out.append(DeviceView(f"cuda:{i}", "cuda", torch.cuda.get_device_name(i), total, total - free))
    return out


def gpu_note(listed: list[DeviceView]) -> str:
    """Why the devices() list `listed` has no GPU ("" when it has one)."""
    if any(d.kind == "cuda" for d in listed):
        return ""
    return nvml()[1] or "no GPU (NVML sees none)"


def rss_bytes() -> tuple[int, int]:
    """(current, peak) resident set size of this process in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return psutil.Process(os.getpid()).memory_info().rss, peak


def ram_tier(expert_bytes: int, experts_total: int, uses: int, bits: int) -> TierView:
    """The RAM tier when every routed expert is held in memory: all uses are hits."""
    return TierView("ram", "cpu", psutil.virtual_memory().total, expert_bytes, experts_total, experts_total,
                    hits=uses, misses=0, experts_by_bits={bits: experts_total} if experts_total else {})
