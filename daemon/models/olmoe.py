"""OLMoE (OLMoE-1B-7B): q/k RMSNorm over the whole projection, optional QKV clipping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from daemon.models.args import ModelArgs
from daemon.models.attention import Attention
from daemon.models.moe import MoEBlock, Router
from daemon.models.transformer import CausalLM, decoder_layers

EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
RENAMES: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Args(ModelArgs):
    rms_norm_eps: float = 1e-5
    clip_qkv: float | None = None
    ALIASES: ClassVar[dict[str, tuple[str, ...]]] = ModelArgs.EXPERTS_ARE_MLPS


class Model(CausalLM):
    def __init__(self, a: Args) -> None:
        def attn(i: int) -> Attention:
            return Attention.from_args(i, a, qkv_bias=a.attention_bias, o_bias=a.attention_bias, qk_norm="full",
                                       clip_qkv=a.clip_qkv)

        def mlp(i: int) -> MoEBlock:
            return MoEBlock(i, Router(a.hidden_size, a.num_experts, a.num_experts_per_tok, a.norm_topk_prob))

        super().__init__(a, decoder_layers(a, attn, mlp))
