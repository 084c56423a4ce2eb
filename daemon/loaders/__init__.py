"""Checkpoint readers (Hugging Face folders, GGUF files) and the model builder."""

from __future__ import annotations

import os
from pathlib import Path

from daemon.errors import MoedError
from daemon.loaders.checkpoint import Checkpoint


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a Hugging Face model folder, a GGUF file, or a moed model directory."""
    p = Path(path)
    if not p.exists():
        raise MoedError("no such file or directory", p)
    if p.is_dir():
        if (p / "manifest.json").exists():  # a moed model directory (`moed convert`)
            from daemon.loaders.store import StoreCheckpoint
            return StoreCheckpoint(p)
        from daemon.loaders.hf import HFCheckpoint
        return HFCheckpoint(p)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF" or p.suffix.lower() == ".gguf":  # a bad magic in a .gguf is the reader's error
        from daemon.loaders.gguf import GGUFCheckpoint
        return GGUFCheckpoint(p)
    raise MoedError("not a model: expected a Hugging Face model folder or a GGUF file", p)
