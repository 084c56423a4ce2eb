"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): per-head q/k RMSNorm, no shared expert."""

from __future__ import annotations

from dataclasses import dataclass

from daemon.models.args import ModelArgs
from daemon.models.attention import Attention
from daemon.models.moe import MLP, MoEBlock, Router, is_sparse_layer
from daemon.models.rope import Rope
from daemon.models.transformer import CausalLM, DecoderLayer

EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
RENAMES: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Args(ModelArgs):
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()


class Model(CausalLM):
    def __init__(self, args: Args) -> None:
        a = args
        layers = []
        for i in range(a.num_hidden_layers):
            attn = Attention(i, a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                             qkv_bias=a.attention_bias, o_bias=a.attention_bias, qk_norm="head",
                             eps=a.rms_norm_eps)
            if is_sparse_layer(i, a.decoder_sparse_step, a.mlp_only_layers):
                mlp = MoEBlock(i, Router(a.hidden_size, a.num_experts, a.num_experts_per_tok, a.norm_topk_prob))
            else:
                mlp = MLP(a.hidden_size, a.intermediate_size, a.hidden_act)
            layers.append(DecoderLayer(attn, mlp, a.hidden_size, a.rms_norm_eps))
        super().__init__(a, layers, Rope(a.head_dim, a.rope_theta, a.rope_scaling, a.max_position_embeddings))
