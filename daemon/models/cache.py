"""Key/value cache: one growable buffer pair per layer."""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys and values [B, H, L, d]; `length` counts committed positions."""

    def __init__(self, n_layers: int, capacity: int = 256) -> None:
        self.length = 0
        self.capacity = capacity
        self._k: list[torch.Tensor | None] = [None] * n_layers
        self._v: list[torch.Tensor | None] = [None] * n_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new k/v [B, H, T, d] after the committed ones; return all so far."""
        end = self.length + k.shape[2]
        kb, vb = self.reserve(layer, end, k, v)
        kb[:, :, self.length:end] = k
        vb[:, :, self.length:end] = v
        return kb[:, :, :end], vb[:, :, :end]

    def reserve(self, layer: int, end: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's key and value buffers [B, H, capacity, d] (contiguous), grown to hold `end` positions;
        k/v [B, H, T, d] give their shape and dtype. The committed positions are kept."""
        kb, vb = self._k[layer], self._v[layer]
        if kb is None or kb.shape[2] < end:
            cap = max(self.capacity, end)
            while cap < end:
                cap *= 2
            kb = _grow(kb, k, cap, self.length)
            vb = _grow(vb, v, cap, self.length)
            self._k[layer], self._v[layer] = kb, vb
        return kb, vb

    def advance(self, t: int) -> None:
        """Commit t positions written by the last forward."""
        self.length += t
        self.capacity = max(self.capacity, self.length)

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on (for reuse of a common prefix)."""
        self.length = min(self.length, length)


def _grow(old: torch.Tensor | None, like: torch.Tensor, cap: int, keep: int) -> torch.Tensor:
    b, h, _, d = like.shape
    new = like.new_empty((b, h, cap, d))
    if old is not None and keep:
        new[:, :, :keep] = old[:, :, :keep]
    return new
