"""OLMoE (OLMoE-1B-7B): q/k RMSNorm over the whole projection, optional QKV clipping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from daemon.models.args import ModelArgs
from daemon.models.attention import Attention
from daemon.models.moe import MoEBlock, Router
from daemon.models.rope import Rope
from daemon.models.transformer import CausalLM, DecoderLayer

EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
RENAMES: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Args(ModelArgs):
    rms_norm_eps: float = 1e-5
    clip_qkv: float | None = None

    # OLMoE's experts are its MLPs: their width is `intermediate_size`
    ALIASES: ClassVar[dict[str, tuple[str, ...]]] = {
        **ModelArgs.ALIASES, "moe_intermediate_size": ("intermediate_size",)}


class Model(CausalLM):
    def __init__(self, args: Args) -> None:
        a = args
        layers = []
        for i in range(a.num_hidden_layers):
            attn = Attention(i, a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                             qkv_bias=a.attention_bias, o_bias=a.attention_bias, qk_norm="full",
                             eps=a.rms_norm_eps, clip_qkv=a.clip_qkv)
            mlp = MoEBlock(i, Router(a.hidden_size, a.num_experts, a.num_experts_per_tok, a.norm_topk_prob))
            layers.append(DecoderLayer(attn, mlp, a.hidden_size, a.rms_norm_eps))
        super().__init__(a, layers, Rope(a.head_dim, a.rope_theta, a.rope_scaling, a.max_position_embeddings))
