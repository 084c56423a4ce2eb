"""Qwen2-MoE / Qwen1.5-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): QKV bias, gated shared expert."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from daemon.models.args import ModelArgs
from daemon.models.attention import Attention
from daemon.models.moe import MLP, MoEBlock, Router, is_sparse_layer
from daemon.models.transformer import CausalLM, decoder_layers

EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
RENAMES = ((".mlp.shared_expert.", ".mlp.shared."), (".mlp.shared_expert_gate.", ".mlp.shared_gate."))


@dataclass(frozen=True, slots=True)
class Args(ModelArgs):
    shared_expert_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    qkv_bias: bool = True


class Model(CausalLM):
    def __init__(self, a: Args) -> None:
        def mlp(i: int):
            if not is_sparse_layer(i, a.decoder_sparse_step, a.mlp_only_layers):
                return MLP(a.hidden_size, a.intermediate_size, a.hidden_act)
            shared = gate = None
            if a.shared_expert_intermediate_size:
                shared = MLP(a.hidden_size, a.shared_expert_intermediate_size, a.hidden_act)
                gate = nn.Linear(a.hidden_size, 1, bias=False)
            router = Router(a.hidden_size, a.num_experts, a.num_experts_per_tok, a.norm_topk_prob)
            return MoEBlock(i, router, shared, gate)

        super().__init__(a, decoder_layers(a, lambda i: Attention.from_args(i, a, qkv_bias=a.qkv_bias), mlp))
