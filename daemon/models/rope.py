"""Rotary position embeddings: tables of cos/sin and their application."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, d] by the tables cos/sin [T, d] (half-split pairs)."""
    return x * cos + rotate_half(x) * sin


@dataclass(slots=True)
class Rope:
    """cos/sin tables for a rotary dimension, with optional YaRN scaling."""

    dim: int
    theta: float
    scaling: dict | None = None
    max_positions: int = 4096
    inv_freq: torch.Tensor = field(init=False, repr=False)
    attention_factor: float = field(init=False, default=1.0)
    _cache: dict = field(init=False, repr=False, default_factory=dict)  # inv_freq per device
    _tables: dict = field(init=False, repr=False, default_factory=dict)  # span's cos, sin per device

    def __post_init__(self) -> None:
        # explicit CPU device: models are built on the meta device
        idx = torch.arange(0, self.dim, 2, dtype=torch.int64, device="cpu").float()
        inv_freq = 1.0 / (self.theta ** (idx / self.dim))
        self.attention_factor = 1.0
        kind = (self.scaling or {}).get("rope_type") or (self.scaling or {}).get("type")
        if kind == "yarn":
            inv_freq, self.attention_factor = _yarn(inv_freq, self.dim, self.theta, self.scaling,
                                                    self.max_positions)
        elif kind not in (None, "default"):
            raise ValueError(f"unsupported rope scaling type {kind!r}")
        self.inv_freq = inv_freq

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, dim] for integer positions [T]."""
        inv = self._cache.get(positions.device)
        if inv is None:
            inv = self._cache[positions.device] = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor

    def span(self, start: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, dim] for positions start..start+n-1: views of tables kept for the positions so far (a
        decode step's rows without the seven small ops that computing them takes, ~45 us on a CPU); the same
        numbers as tables() to float rounding (the same elementwise ops, over a longer row)."""
        kept = self._tables.get(device)
        if kept is None or kept[0].shape[0] < start + n:  # grown to twice what it held, or what is asked
            have = 0 if kept is None else kept[0].shape[0]
            kept = self._tables[device] = self.tables(torch.arange(max(start + n, 2 * have, 64), device=device))
        return kept[0][start:start + n], kept[1][start:start + n]


def _yarn(inv_freq: torch.Tensor, dim: int, base: float, cfg: dict,
          max_positions: int) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023) frequencies and attention factor, as transformers computes them."""
    factor = float(cfg["factor"])
    original = cfg.get("original_max_position_embeddings") or max_positions
    beta_fast = float(cfg.get("beta_fast") or 32)
    beta_slow = float(cfg.get("beta_slow") or 1)
    mscale = cfg.get("mscale")
    mscale_all_dim = cfg.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = cfg.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = correction_dim(beta_fast)
    high = correction_dim(beta_slow)
    if cfg.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = (torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)
    extrapolation = 1 - ramp.clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    interp = 1.0 / (factor * pos_freqs)
    extra = 1.0 / pos_freqs
    inv = interp * (1 - extrapolation) + extra * extrapolation
    return inv, float(attention_factor)
