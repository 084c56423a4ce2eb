"""Hugging Face model folders: config.json, *.safetensors, tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from daemon.errors import FormatError, MoedError
from daemon.loaders.checkpoint import Checkpoint
from daemon.models.moe import ExpertWeights
from daemon.tokenizer import Tokenizer


def read_json(path: Path) -> dict:
    """A JSON object from a file, or a MoedError naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MoedError("file not found", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"not valid JSON: {e}", path) from None
    if not isinstance(data, dict):
        raise FormatError("expected a JSON object", path)
    return data


class HFCheckpoint(Checkpoint):
    """A folder as `save_pretrained` writes it (safetensors only; no pickle)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.config = read_json(path / "config.json")
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise MoedError("no *.safetensors files in the model folder", path)
        self._index: dict[str, Path] = {}
        self._handles = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise FormatError(f"cannot read safetensors file: {e}", f) from None
            self._handles[f] = h
            for k in h.keys():
                self._index[k] = f

    def tensor(self, name: str) -> torch.Tensor | None:
        f = self._index.get(name)
        if f is None:
            return None
        try:
            return self._handles[f].get_tensor(name)
        except Exception as e:
            raise FormatError(f"cannot read tensor {name}: {e}", f) from None

    def where(self, name: str) -> Path:
        return self._index.get(name, self.path)

    def experts(self, layer: int, prefix: str, names: tuple[str, str, str], n_experts: int) -> ExpertWeights | None:
        return self.stack_experts(prefix, names, n_experts)

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_hf_folder(self.path, self.config)
