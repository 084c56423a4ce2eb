"""Machine facts: work with no GPU and no NVML; NVML answers are read when there are some."""

from __future__ import annotations

import json
import types

from profiler.hardware import gpu_facts, machine_facts


def test_facts_without_nvml_library(tmp_path):
    f = machine_facts(tmp_path)
    assert f.cpu.logical_cores >= 1 and f.cpu.physical_cores >= 1 and f.cpu.model
    assert f.ram_total_bytes > f.ram_available_bytes > 0
    if not f.gpus:
        assert f.nvml != "ok"  # the reason is recorded
    assert f.disk is not None and f.disk.total_bytes > 0 and f.disk.fstype
    json.dumps(f.to_dict())


def test_missing_module_is_a_reason_not_an_error(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_pynvml(name, *a, **kw):
        if name == "pynvml":
            raise ImportError("no pynvml")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    assert gpu_facts() == ((), "nvidia-ml-py is not installed")


def fake_nvml(fail_init: bool = False, fail_pcie: bool = False) -> types.ModuleType:
    m = types.ModuleType("pynvml")
    calls = []

    class NVMLError(Exception):
        pass

    def init():
        if fail_init:
            raise NVMLError("Driver Not Loaded")
        calls.append("init")

    def pcie(v):
        def f(h):
            if fail_pcie:
                raise NVMLError("not supported")
            return v
        return f

    m.nvmlInit = init
    m.nvmlShutdown = lambda: calls.append("shutdown")
    m.nvmlSystemGetDriverVersion = lambda: b"550.54"
    m.nvmlDeviceGetCount = lambda: 2
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetName = lambda h: ["NVIDIA GeForce RTX 4090", "NVIDIA RTX A6000"][h]
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=24 << 30, free=20 << 30, used=4 << 30)
    m.nvmlDeviceGetCurrPcieLinkGeneration = pcie(4)
    m.nvmlDeviceGetCurrPcieLinkWidth = pcie(16)
    m.nvmlDeviceGetMaxPcieLinkGeneration = pcie(4)
    m.nvmlDeviceGetMaxPcieLinkWidth = pcie(16)
    m.nvmlDeviceGetCudaComputeCapability = lambda h: (8, 9)
    m.calls = calls
    return m


def test_nvml_facts_are_read():
    nvml = fake_nvml()
    gpus, status = gpu_facts(nvml)
    assert status == "ok" and nvml.calls == ["init", "shutdown"]
    assert [g.name for g in gpus] == ["NVIDIA GeForce RTX 4090", "NVIDIA RTX A6000"]
    g = gpus[0]
    assert (g.memory_total_bytes, g.pcie_generation, g.pcie_width, g.driver, g.cuda_capability) == \
        (24 << 30, 4, 16, "550.54", "8.9")


def test_nvml_failures_degrade_gracefully(tmp_path):
    gpus, status = gpu_facts(fake_nvml(fail_init=True))
    assert gpus == () and "Driver Not Loaded" in status
    gpus, status = gpu_facts(fake_nvml(fail_pcie=True))
    assert status == "ok" and gpus[0].pcie_generation is None
    assert machine_facts(tmp_path, nvml=fake_nvml()).gpus[1].name == "NVIDIA RTX A6000"
