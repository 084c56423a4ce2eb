"""What the machine and the daemon hold: devices, process memory, the tiers experts live in."""

from __future__ import annotations

import functools
import os
import resource
from dataclasses import dataclass

import psutil
import torch

from offload.views import LinkView, TierView
from profiler.hardware import cpu_facts

__all__ = ["DeviceView", "LinkView", "TierView", "cpu_model", "devices", "ram_tier", "rss_bytes"]


@dataclass(frozen=True, slots=True)
class DeviceView:
    """One compute device and its memory."""

    name: str
    kind: str
    description: str
    memory_total: int
    memory_used: int
    threads: int = 0


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (read once: it does not change while the daemon runs)."""
    return cpu_facts().model


def devices() -> list[DeviceView]:
    """The CPU (system RAM) and every CUDA device torch sees."""
    vm = psutil.virtual_memory()
    out = [DeviceView("cpu", "cpu", cpu_model(), vm.total, vm.total - vm.available, torch.get_num_threads())]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out.append(DeviceView(f"cuda:{i}", "cuda", torch.cuda.get_device_name(i), total, total - free))
    return out


def rss_bytes() -> tuple[int, int]:
    """(current, peak) resident set size of this process in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return psutil.Process(os.getpid()).memory_info().rss, peak


def ram_tier(expert_bytes: int, experts_total: int, uses: int, bits: int) -> TierView:
    """The RAM tier when every routed expert is held in memory: all uses are hits."""
    return TierView("ram", "cpu", psutil.virtual_memory().total, expert_bytes, experts_total, experts_total,
                    hits=uses, misses=0, experts_by_bits={bits: experts_total} if experts_total else {})
