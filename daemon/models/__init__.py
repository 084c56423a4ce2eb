"""Model architectures, found by the config's `model_type` (one module each)."""

from __future__ import annotations

import importlib
from types import ModuleType

from daemon.errors import UnsupportedError

SUPPORTED = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v2")


def architecture(model_type: str, source: str | None = None) -> ModuleType:
    """The module implementing `model_type`: it defines `Args` and `Model`."""
    if model_type not in SUPPORTED:
        raise UnsupportedError(
            f"unknown architecture {model_type!r} (supported: {', '.join(SUPPORTED)})", source)
    return importlib.import_module(f"daemon.models.{model_type}")
