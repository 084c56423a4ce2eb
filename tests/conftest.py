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
