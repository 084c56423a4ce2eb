"""Mixtral (Mixtral-8x7B, 8x22B): Llama attention, 8 experts top-2, optional sliding window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from daemon.models.args import ModelArgs
from daemon.models.attention import Attention
from daemon.models.moe import MoEBlock, Router
from daemon.models.transformer import CausalLM, decoder_layers

EXPERT_NAMES = ("w1", "w3", "w2")  # gate, up, down
RENAMES = ((".block_sparse_moe.", ".mlp."),)


@dataclass(frozen=True, slots=True)
class Args(ModelArgs):
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None
    ALIASES: ClassVar[dict[str, tuple[str, ...]]] = ModelArgs.EXPERTS_ARE_MLPS


class Model(CausalLM):
    def __init__(self, a: Args) -> None:
        def mlp(i: int) -> MoEBlock:
            return MoEBlock(i, Router(a.hidden_size, a.num_experts, a.num_experts_per_tok, norm_topk=True))

        super().__init__(a, decoder_layers(a, lambda i: Attention.from_args(i, a), mlp))
        self.sliding_window = a.sliding_window
