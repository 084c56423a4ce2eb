"""What a model builder needs from a checkpoint, whatever its format."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from daemon.models.moe import ExpertWeights
from daemon.tokenizer import Tokenizer


class Checkpoint(ABC):
    """Tensors under Hugging Face names, the model config, and the tokenizer."""

    path: Path
    config: dict

    @abstractmethod
    def tensor(self, name: str) -> torch.Tensor | None:
        """The tensor stored under a Hugging Face name, or None if absent."""

    @abstractmethod
    def experts(self, layer: int, prefix: str, names: tuple[str, str, str], n_experts: int) -> ExpertWeights | None:
        """Layer's routed experts stacked; `prefix`/`names` give per-expert HF names."""

    @abstractmethod
    def tokenizer(self) -> Tokenizer:
        """The tokenizer that ships with the checkpoint."""

    def where(self, name: str) -> Path:
        """The file a tensor lives in (for error messages)."""
        return self.path

    def stack_experts(self, prefix: str, names: tuple[str, str, str], n_experts: int) -> ExpertWeights | None:
        """Stack per-expert tensors `{prefix}.{e}.{name}.weight`, or split a fused layout."""
        first = self.tensor(f"{prefix}.0.{names[0]}.weight")
        if first is not None:
            parts = []
            for name in names:
                ts = []
                for e in range(n_experts):
                    t = self.tensor(f"{prefix}.{e}.{name}.weight")
                    if t is None:
                        return None
                    ts.append(t)
                parts.append(torch.stack(ts))
            return ExpertWeights(*parts)
        gate_up = self.tensor(f"{prefix}.gate_up_proj")  # transformers 5 fused [E, 2I, D]
        down = self.tensor(f"{prefix}.down_proj")
        if gate_up is None or down is None:
            return None
        gate, up = gate_up.chunk(2, dim=1)
        return ExpertWeights(gate.contiguous(), up.contiguous(), down)
