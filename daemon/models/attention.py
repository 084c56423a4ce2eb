"""Grouped-query attention with rotary embeddings and a KV cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from daemon.models.cache import KVCache
from daemon.models.norms import RMSNorm
from daemon.models.rope import apply_rope
from quant import native


@dataclass(slots=True)
class AttnInputs:
    """What every attention layer needs for one forward: rope tables, mask, cache."""

    cos: torch.Tensor  # [T, d_rope]
    sin: torch.Tensor  # [T, d_rope]
    mask: torch.Tensor | None  # [T, L] bool, True = attend; None = attend to all
    cache: KVCache

    def per_sequence(self, fn: Callable[..., torch.Tensor], *xs: torch.Tensor) -> torch.Tensor:
        """fn(*xs, self): the whole row is one sequence (or a batch sharing positions)."""
        return fn(*xs, self)


@dataclass(slots=True)
class RaggedInputs:
    """Several sequences flattened into one row [1, sum T]: each its own positions, mask and cache."""

    parts: list[AttnInputs]
    lengths: list[int]  # new tokens of each sequence, in row order

    def per_sequence(self, fn: Callable[..., torch.Tensor], *xs: torch.Tensor) -> torch.Tensor:
        """fn(*slices, part) for each sequence's slice of xs [1, sum T, ...] (dim 1), concatenated."""
        chunks = zip(*(x.split(self.lengths, dim=1) for x in xs))
        return torch.cat([fn(*c, p) for c, p in zip(chunks, self.parts)], dim=1)


def causal_mask(t: int, start: int, device: torch.device, window: int | None = None) -> torch.Tensor | None:
    """Boolean mask [T, start+T] for queries at start..start+T-1; None when not needed."""
    if t == 1 and window is None:
        return None
    q = torch.arange(start, start + t, device=device)[:, None]
    k = torch.arange(start + t, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= (q - k) < window
    return mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over [B, H, T, d] with k/v heads grouped; returns [B, T, H*dv]."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    b, h, t, d = out.shape
    return out.transpose(1, 2).reshape(b, t, h * d)


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads (Qwen, Mixtral, OLMoE)."""

    def __init__(self, layer: int, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 *, qkv_bias: bool = False, o_bias: bool = False, qk_norm: str | None = None,
                 eps: float = 1e-6, clip_qkv: float | None = None) -> None:
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.head_dim = layer, n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=o_bias)
        self.qkv: nn.Module | None = None  # q, k and v as one matrix (daemon.models.qdense fuses them)
        self.qk_norm = qk_norm  # None, "head" (per head, Qwen3) or "full" (whole projection, OLMoE)
        if qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        elif qk_norm == "full":
            self.q_norm = RMSNorm(n_heads * head_dim, eps)
            self.k_norm = RMSNorm(n_kv_heads * head_dim, eps)
        self.clip_qkv = clip_qkv
        self.scale = head_dim ** -0.5

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        """Output widths of q, k and v (their rows in a fused qkv matrix)."""
        kv = self.n_kv * self.head_dim
        return self.n_heads * self.head_dim, kv, kv

    @classmethod
    def from_args(cls, layer: int, a, **options) -> "Attention":
        """Attention sized by model args; options as in __init__."""
        return cls(layer, a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                   eps=a.rms_norm_eps, **options)

    def forward(self, x: torch.Tensor, a: AttnInputs) -> torch.Tensor:
        b, t, _ = x.shape  # x [B, T, D]
        if self.qkv is not None:
            q, k, v = self.qkv(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (z.clamp(-self.clip_qkv, self.clip_qkv) for z in (q, k, v))
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        v = v.view(b, t, self.n_kv, self.head_dim)
        return self.o_proj(a.per_sequence(self._attend, q, k, v))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: AttnInputs) -> torch.Tensor:
        """Rope, cache and attention for one sequence: q [B, T, H, d], k/v [B, T, Hkv, d] -> [B, T, H*d]."""
        if q.shape[:2] == (1, 1) and a.mask is None and q.dtype == torch.float32 and q.device.type == "cpu" \
                and (lib := native.library()) is not None:  # one decode token: one native call
            return self._attend_native(lib, q, k, v, a)
        q = apply_rope(q.transpose(1, 2), a.cos, a.sin)  # [B, H, T, d]
        k = apply_rope(k.transpose(1, 2), a.cos, a.sin)  # [B, Hkv, T, d]
        k, v = a.cache.update(self.layer, k, v.transpose(1, 2))
        return attend(q, k, v, a.mask, self.scale)

    def _attend_native(self, lib, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: AttnInputs) -> torch.Tensor:
        """_attend for one token of one sequence in quant/native.c (rope, cache write, attention): the same
        arithmetic as the torch path, in one call instead of some twenty small ops."""
        d, pos = self.head_dim, a.cache.length
        q, k, v = (z.reshape(-1, d).contiguous() for z in (q, k, v))  # [H, d], [Hkv, d]
        kb, vb = a.cache.reserve(self.layer, pos + 1, k.view(1, self.n_kv, 1, d), v.view(1, self.n_kv, 1, d))
        cos, sin = a.cos.float().contiguous(), a.sin.float().contiguous()
        out = torch.empty(1, 1, self.n_heads * d)
        lib.moed_decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                  kb.data_ptr(), vb.data_ptr(), kb.shape[2], pos, self.n_heads, self.n_kv, d,
                                  self.scale, out.data_ptr())
        return out
