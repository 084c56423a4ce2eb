"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): per-head q/k RMSNorm, no shared expert."""

from __future__ import annotations

from dataclasses import dataclass

from daemon.models.args import ModelArgs
from daemon.models.attention import Attention
from daemon.models.moe import MLP, MoEBlock, Router, is_sparse_layer
from daemon.models.transformer import CausalLM, decoder_layers

EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
RENAMES: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Args(ModelArgs):
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()


class Model(CausalLM):
    def __init__(self, a: Args) -> None:
        def attn(i: int) -> Attention:
            return Attention.from_args(i, a, qkv_bias=a.attention_bias, o_bias=a.attention_bias, qk_norm="head")

        def mlp(i: int):
            if is_sparse_layer(i, a.decoder_sparse_step, a.mlp_only_layers):
                return MoEBlock(i, Router(a.hidden_size, a.num_experts, a.num_experts_per_tok, a.norm_topk_prob))
            return MLP(a.hidden_size, a.intermediate_size, a.hidden_act)

        super().__init__(a, decoder_layers(a, attn, mlp))
