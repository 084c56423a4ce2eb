"""Qwen2-MoE / Qwen1.5-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): QKV bias, gated shared expert."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from daemon.models.args import ModelArgs
from daemon.models.attention import Attention
from daemon.models.moe import MLP, MoEBlock, Router, is_sparse_layer
from daemon.models.rope import Rope
from daemon.models.transformer import CausalLM, DecoderLayer

EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
RENAMES = ((".mlp.shared_expert.", ".mlp.shared."), (".mlp.shared_expert_gate.", ".mlp.shared_gate."))


@dataclass(frozen=True, slots=True)
class Args(ModelArgs):
    shared_expert_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    qkv_bias: bool = True


class Model(CausalLM):
    def __init__(self, args: Args) -> None:
        a = args
        layers = []
        for i in range(a.num_hidden_layers):
            attn = Attention(i, a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                             qkv_bias=a.qkv_bias, eps=a.rms_norm_eps)
            if is_sparse_layer(i, a.decoder_sparse_step, a.mlp_only_layers):
                shared = gate = None
                if a.shared_expert_intermediate_size:
                    shared = MLP(a.hidden_size, a.shared_expert_intermediate_size, a.hidden_act)
                    gate = nn.Linear(a.hidden_size, 1, bias=False)
                router = Router(a.hidden_size, a.num_experts, a.num_experts_per_tok, a.norm_topk_prob)
                mlp = MoEBlock(i, router, shared, gate)
            else:
                mlp = MLP(a.hidden_size, a.intermediate_size, a.hidden_act)
            layers.append(DecoderLayer(attn, mlp, a.hidden_size, a.rms_norm_eps))
        super().__init__(a, layers, Rope(a.head_dim, a.rope_theta, a.rope_scaling, a.max_position_embeddings))
