"""Facts of this machine: CPU, RAM, GPUs (through NVML when there is one) and the disk of the model store."""

from __future__ import annotations

import dataclasses
import os
import platform
import socket
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import psutil

CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile",
             "amx_bf16", "amx_int8", "asimd", "sve")


@dataclass(frozen=True, slots=True)
class CpuFacts:
    """The CPU: model, cores, clock, the vector extensions kernels care about."""

    model: str
    physical_cores: int
    logical_cores: int
    freq_max_mhz: float | None
    freq_current_mhz: float | None
    flags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GpuFacts:
    """One NVIDIA GPU as NVML reports it."""

    index: int
    name: str
    memory_total_bytes: int
    memory_free_bytes: int
    pcie_generation: int | None  # current link generation
    pcie_width: int | None
    pcie_max_generation: int | None
    pcie_max_width: int | None
    driver: str
    cuda_capability: str | None


@dataclass(frozen=True, slots=True)
class DiskFacts:
    """The disk holding a path (the model store)."""

    path: str
    device: str
    mountpoint: str
    fstype: str
    total_bytes: int
    free_bytes: int
    rotational: bool | None
    model: str | None


@dataclass(frozen=True, slots=True)
class MachineFacts:
    """Everything moed knows about the machine without timing anything."""

    hostname: str
    platform: str
    python: str
    cpu: CpuFacts
    ram_total_bytes: int
    ram_available_bytes: int
    gpus: tuple[GpuFacts, ...]
    nvml: str  # "ok", or why there are no GPU facts
    disk: DiskFacts | None

    def to_dict(self) -> dict:
        """A JSON-ready record."""
        return dataclasses.asdict(self)


def cpu_facts() -> CpuFacts:
    """CPU model, core counts, clock and vector flags."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                model = val.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(val.split())
    except OSError:
        pass
    freq = None
    try:
        freq = psutil.cpu_freq()
    except (OSError, NotImplementedError, FileNotFoundError):
        pass
    return CpuFacts(model, psutil.cpu_count(logical=False) or os.cpu_count() or 1,
                    psutil.cpu_count(logical=True) or os.cpu_count() or 1,
                    (freq.max or None) if freq else None, (freq.current or None) if freq else None,
                    tuple(f for f in CPU_FLAGS if f in flags))


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def gpu_facts(nvml: ModuleType | None = None) -> tuple[tuple[GpuFacts, ...], str]:
    """(GPUs, status) from NVML; no GPUs and the reason when NVML is missing or fails."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return (), "nvidia-ml-py is not installed"
    try:
        nvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return (), f"NVML unavailable: {type(e).__name__}: {e}"
    gpus = []
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)

            def opt(fn, *a):
                try:
                    return fn(*a)
                except Exception:
                    return None

            cc = opt(nvml.nvmlDeviceGetCudaComputeCapability, h)
            gpus.append(GpuFacts(i, _text(nvml.nvmlDeviceGetName(h)), int(mem.total), int(mem.free),
                                 opt(nvml.nvmlDeviceGetCurrPcieLinkGeneration, h),
                                 opt(nvml.nvmlDeviceGetCurrPcieLinkWidth, h),
                                 opt(nvml.nvmlDeviceGetMaxPcieLinkGeneration, h),
                                 opt(nvml.nvmlDeviceGetMaxPcieLinkWidth, h), driver,
                                 f"{cc[0]}.{cc[1]}" if cc else None))
    except Exception as e:
        return tuple(gpus), f"NVML error: {type(e).__name__}: {e}"
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
    return tuple(gpus), "ok"


def disk_facts(path: str | os.PathLike) -> DiskFacts | None:
    """The partition and block device holding `path` (the nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    best = None
    for part in psutil.disk_partitions(all=True):
        mp = part.mountpoint
        inside = str(p) == mp or str(p).startswith(mp.rstrip("/") + "/")
        if inside and (best is None or len(mp) > len(best.mountpoint)):
            best = part
    if best is None:
        return None
    usage = psutil.disk_usage(str(p))
    rotational, model = None, None
    dev = Path(best.device).name
    block = Path("/sys/class/block") / dev
    if block.exists():
        base = block.resolve()
        if (base / "partition").exists():  # a partition: facts live on its parent disk
            base = base.parent
        try:
            rotational = (base / "queue/rotational").read_text().strip() == "1"
        except OSError:
            pass
        try:
            model = (base / "device/model").read_text().strip() or None
        except OSError:
            pass
    return DiskFacts(str(p), best.device, best.mountpoint, best.fstype, usage.total, usage.free, rotational, model)


def machine_facts(store: str | os.PathLike | None = None, nvml: ModuleType | None = None) -> MachineFacts:
    """The facts of this machine; `store` names the folder whose disk holds the models."""
    vm = psutil.virtual_memory()
    gpus, status = gpu_facts(nvml)
    return MachineFacts(socket.gethostname(), platform.platform(), platform.python_version(), cpu_facts(),
                        vm.total, vm.available, gpus, status, disk_facts(store) if store is not None else None)


def describe() -> dict:
    """A short description of this machine for benchmark results (no timing)."""
    cpu = cpu_facts()
    out = {"cpu": cpu.model, "logical_cpus": cpu.logical_cores,
           "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
           "platform": platform.platform(), "load_average": [round(x, 2) for x in os.getloadavg()]}
    try:
        import torch
        out.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    return out
