"""DeepSeek-V2 (DeepSeek-V2, V2-Lite, Coder-V2): multi-head latent attention, grouped top-k routing."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from daemon.models.args import ModelArgs
from daemon.models.attention import AttnInputs, attend
from daemon.models.moe import MLP, MoEBlock, Router, Routing
from daemon.models.norms import RMSNorm
from daemon.models.rope import Rope, apply_rope
from daemon.models.transformer import CausalLM, DecoderLayer

EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
RENAMES = ((".mlp.shared_experts.", ".mlp.shared."),)
TOPK_METHODS = ("greedy", "group_limited_greedy")


@dataclass(frozen=True, slots=True)
class Args(ModelArgs):
    intermediate_size: int = 11008
    max_position_embeddings: int = 2048
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_shared_experts: int = 2
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    scoring_func: str = "softmax"
    mlp_bias: bool = False

    @classmethod
    def normalise(cls, values: dict[str, Any]) -> dict[str, Any]:
        """An explicit `q_lora_rank: null` (V2-Lite) means no query compression, not the default."""
        raw = values["raw"]
        if "q_lora_rank" in raw:
            values["q_lora_rank"] = raw["q_lora_rank"]
        return values

    @property
    def softmax_scale(self) -> float:
        """q_head_dim**-0.5, times YaRN's mscale(factor, mscale_all_dim)**2 as transformers applies it."""
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        rs = self.rope_scaling or {}
        kind = rs.get("rope_type") or rs.get("type") or "default"
        factor = float(rs.get("factor") or 1.0)
        if kind != "default" and rs.get("mscale_all_dim") and factor > 1:
            m = 0.1 * rs["mscale_all_dim"] * math.log(factor) + 1.0
            scale *= m * m
        return scale


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[x0, x1, x2, x3, ...] -> [x0, x2, ..., x1, x3, ...] over the last dim.

    DeepSeek rotates adjacent pairs (complex form); applying the same permutation to q and k
    turns that into the half-split rotation of `apply_rope` without changing q.k.
    """
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


class LatentAttention(nn.Module):
    """Multi-head latent attention: low-rank (optionally) queries and a shared compressed KV."""

    def __init__(self, layer: int, a: Args) -> None:
        super().__init__()
        self.layer, self.n_heads = layer, a.num_attention_heads
        self.nope, self.rope = a.qk_nope_head_dim, a.qk_rope_head_dim
        self.dv, self.rank = a.v_head_dim, a.kv_lora_rank
        dq = self.nope + self.rope
        if a.q_lora_rank is None:
            self.q_proj = nn.Linear(a.hidden_size, self.n_heads * dq, bias=False)
        else:
            self.q_a_proj = nn.Linear(a.hidden_size, a.q_lora_rank, bias=a.attention_bias)
            self.q_a_layernorm = RMSNorm(a.q_lora_rank)  # default eps, not rms_norm_eps, as in the reference
            self.q_b_proj = nn.Linear(a.q_lora_rank, self.n_heads * dq, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(a.hidden_size, self.rank + self.rope, bias=a.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank)
        self.kv_b_proj = nn.Linear(self.rank, self.n_heads * (self.nope + self.dv), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.dv, a.hidden_size, bias=a.attention_bias)
        self.q_lora = a.q_lora_rank is not None
        self.scale = a.softmax_scale

    def forward(self, x: torch.Tensor, a: AttnInputs) -> torch.Tensor:
        b, t, _ = x.shape  # x [B, T, D]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.view(b, t, self.n_heads, -1)  # [B, T, H, nope+rope]
        kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)  # [B, T, r], [B, T, rope]
        kv = self.kv_b_proj(self.kv_a_layernorm(kv)).view(b, t, self.n_heads, -1)  # [B, T, H, nope+dv]
        return self.o_proj(a.per_sequence(self._attend, q, kv, k_pe))

    def _attend(self, q: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor, a: AttnInputs) -> torch.Tensor:
        """Rope, cache and attention for one sequence's q, kv [B, T, H, *] and k_pe [B, T, rope]."""
        q_nope, q_pe = q.transpose(1, 2).split([self.nope, self.rope], dim=-1)  # [B, H, T, *]
        k_nope, v = kv.transpose(1, 2).split([self.nope, self.dv], dim=-1)  # [B, H, T, nope], [B, H, T, dv]
        q_pe = apply_rope(deinterleave(q_pe), a.cos, a.sin)  # [B, H, T, rope]
        k_pe = apply_rope(deinterleave(k_pe)[:, None], a.cos, a.sin)  # [B, 1, T, rope], shared by the heads
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe.expand(-1, self.n_heads, -1, -1)), dim=-1)  # [B, H, T, nope+rope]
        k, v = a.cache.update(self.layer, k, v)
        return attend(q, k, v, a.mask, self.scale)


class GroupRouter(Router):
    """Softmax router with greedy or group-limited top-k, weights times `routed_scaling_factor`.

    As in transformers, the k weights are never renormalised (`norm_topk_prob` is ignored; every
    published DeepSeek-V2 sets it false).
    """

    def __init__(self, a: Args) -> None:
        super().__init__(a.hidden_size, a.num_experts, a.num_experts_per_tok, norm_topk=False)
        if a.topk_method not in TOPK_METHODS:
            raise ValueError(f"DeepSeek-V2 topk_method {a.topk_method!r} (supported: {', '.join(TOPK_METHODS)})")
        if a.scoring_func != "softmax":
            raise ValueError(f"DeepSeek-V2 scoring_func {a.scoring_func!r} (supported: softmax)")
        self.grouped = a.topk_method == "group_limited_greedy"
        if self.grouped and not (a.n_group and a.topk_group and a.num_experts % a.n_group == 0
                                 and a.topk_group <= a.n_group):
            raise ValueError(f"group_limited_greedy needs n_group dividing {a.num_experts} experts and "
                             f"topk_group <= n_group (got n_group={a.n_group}, topk_group={a.topk_group})")
        self.n_group, self.topk_group, self.scaling = a.n_group, a.topk_group, a.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        scores = logits.softmax(dim=-1)
        if self.grouped:
            groups = scores.unflatten(-1, (self.n_group, -1)).amax(dim=-1)  # [T, G]
            keep = groups.topk(self.topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
            mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
            scores = scores.masked_fill(~mask.repeat_interleave(scores.shape[-1] // self.n_group, dim=-1), 0.0)
        w, idx = scores.topk(self.top_k, dim=-1, sorted=False)  # [T, K]
        return Routing(idx, (w * self.scaling).to(x.dtype), logits.to(x.dtype))


class Model(CausalLM):
    def __init__(self, args: Args) -> None:
        a = args
        if a.mlp_bias:
            raise ValueError("DeepSeek-V2 with mlp_bias=true")
        if a.moe_layer_freq < 1:
            raise ValueError(f"moe_layer_freq must be >= 1 (got {a.moe_layer_freq})")
        layers = []
        for i in range(a.num_hidden_layers):
            # transformers ignores moe_layer_freq (every published config has 1); DeepSeek's rule
            if i >= a.first_k_dense_replace and i % a.moe_layer_freq == 0:
                shared = MLP(a.hidden_size, a.moe_intermediate_size * a.n_shared_experts, a.hidden_act) \
                    if a.n_shared_experts else None
                mlp = MoEBlock(i, GroupRouter(a), shared)
            else:
                mlp = MLP(a.hidden_size, a.intermediate_size, a.hidden_act)
            layers.append(DecoderLayer(LatentAttention(i, a), mlp, a.hidden_size, a.rms_norm_eps))
        super().__init__(a, layers, Rope(a.qk_rope_head_dim, a.rope_theta, a.rope_scaling,
                                         a.max_position_embeddings))
