"""Shared fixtures: tiny random models of real architectures, built once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `cuda` tests cleanly where there is no GPU."""
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """tiny_model(arch) -> path of a tiny random HF folder for that architecture (seed 0)."""
    from daemon.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = make_tiny_model(arch, root / arch, seed=0)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def loaded(tiny_model):
    """loaded(arch) -> moed's LoadedModel of the tiny model (cached)."""
    from daemon.loaders.build import load_model

    cache: dict[str, object] = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = load_model(tiny_model(arch))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def moed_server(tiny_model):
    """moed_server(arch="qwen3_moe", load=True, **config) -> a real daemon Server in this process.

    It listens on a fresh unix socket (and on loopback TCP when config has `tcp`); stopped at the end.
    """
    import shutil
    import tempfile

    from daemon.config import Config
    from daemon.engine import Engine
    from daemon.metrics import Metrics
    from daemon.server import Server

    def start(arch: str = "qwen3_moe", load: bool = True, **config) -> Server:
        folder = tempfile.mkdtemp(prefix="moed-test-", dir="/tmp")  # short: unix socket paths are limited
        config.setdefault("socket", f"{folder}/moed.sock")
        config.setdefault("keep_alive", -1)
        cfg = Config(model=str(tiny_model(arch)), **config)
        metrics = Metrics()
        engine = Engine(cfg, metrics)
        server = Server(cfg, engine, metrics)
        engine.on_state = server.on_engine_state
        folders.append(folder)
        server.start()
        servers.append(server)
        engine.start()
        if load:
            engine.load(cfg.model)
        return server

    servers, folders = [], []
    yield start
    for s in servers:
        s.stop()
    for f in folders:
        shutil.rmtree(f, ignore_errors=True)


@pytest.fixture(scope="session")
def patch_gguf_tensor():
    """patch_gguf_tensor(path, tensor, part, value): rewrite one tensor-info field (4: type id, 5: offset)."""
    from gguf import GGUFReader

    def patch(path: Path, name: str, part: int, value: int) -> None:
        r = GGUFReader(path, "r+")
        t = next(t for t in r.tensors if t.name == name)
        t.field.parts[part][0] = value
        r.data.flush()
        del r

    return patch
