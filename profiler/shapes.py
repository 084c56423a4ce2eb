"""The shapes of an MoE model that costs depend on, read from a config dict (no torch)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

# Scale and minimum per group of 128 weights, fp16 each: what the matryoshka store keeps beside the planes.
GROUP = 128
GROUP_OVERHEAD_BITS = 32


@dataclass(frozen=True, slots=True)
class ModelShape:
    """Layer counts and widths of an MoE model: what the simulator and probes need of it."""

    name: str
    hidden: int
    moe_inter: int
    num_experts: int
    top_k: int
    num_layers: int
    moe_layers: tuple[int, ...]
    heads: int
    kv_heads: int
    head_dim: int
    shared_inter: int = 0  # total width of the shared expert(s); 0: none
    dense_inter: int = 0  # MLP width of the layers that are not MoE
    vocab: int = 0  # output projection rows (lm_head); 0: not known, the step's head is not timed

    @property
    def expert_params(self) -> int:
        """Weights of one routed expert (gate, up, down)."""
        return 3 * self.hidden * self.moe_inter

    def expert_bytes(self, bits: int) -> int:
        """Bytes of one routed expert held at `bits` (planes plus per-group scale and minimum)."""
        if bits >= 16:
            return self.expert_params * bits // 8
        return math.ceil(self.expert_params * (bits + GROUP_OVERHEAD_BITS / GROUP) / 8)

    @property
    def head_params(self) -> int:
        """Weights of the output projection (lm_head) every step runs once per token it samples."""
        return self.vocab * self.hidden

    @property
    def attn_params(self) -> int:
        """Weights of one attention layer (q, k, v, o projections)."""
        return self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)

    def to_dict(self) -> dict:
        """A JSON-ready record."""
        d = dataclasses.asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelShape":
        """Inverse of to_dict (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["moe_layers"] = tuple(kw.get("moe_layers", ()))
        return cls(**kw)

    @classmethod
    def from_config(cls, cfg: dict, name: str | None = None) -> "ModelShape":
        """The shape of a Hugging Face config.json of a supported MoE architecture."""
        mt = cfg.get("model_type", "")
        experts = cfg.get("num_experts") or cfg.get("n_routed_experts") or cfg.get("num_local_experts")
        if not experts:
            raise ValueError(f"config of model_type {mt!r} names no routed experts")
        hidden, layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
        experts_are_mlps = mt in ("mixtral", "olmoe")
        moe_inter = int(cfg["intermediate_size"] if experts_are_mlps else cfg["moe_intermediate_size"])
        heads = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or cfg.get("v_head_dim") or hidden // heads)
        if mt == "deepseek_v2":
            first_dense = int(cfg.get("first_k_dense_replace", 0))
            freq = int(cfg.get("moe_layer_freq", 1))
            moe = tuple(i for i in range(layers) if i >= first_dense and i % freq == 0)
            shared = int(cfg.get("n_shared_experts") or 0) * moe_inter
        else:
            step = int(cfg.get("decoder_sparse_step") or 1)
            dense = set(cfg.get("mlp_only_layers") or ())
            moe = tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)
            shared = int(cfg.get("shared_expert_intermediate_size") or 0)
        dense_inter = 0 if experts_are_mlps else int(cfg.get("intermediate_size") or 0)
        return cls(name or mt, hidden, moe_inter, int(experts), int(cfg["num_experts_per_tok"]), layers, moe,
                   heads, kv, head_dim, shared, dense_inter, int(cfg.get("vocab_size") or 0))


# Published configs (their config.json), reduced to the fields above.
PRESETS: dict[str, ModelShape] = {
    "qwen3-30b-a3b": ModelShape("Qwen3-30B-A3B", 2048, 768, 128, 8, 48, tuple(range(48)), 32, 4, 128,
                                vocab=151936),
    "qwen1.5-moe-a2.7b": ModelShape("Qwen1.5-MoE-A2.7B", 2048, 1408, 60, 4, 24, tuple(range(24)), 16, 16, 128,
                                    shared_inter=5632, vocab=151936),
    "mixtral-8x7b": ModelShape("Mixtral-8x7B", 4096, 14336, 8, 2, 32, tuple(range(32)), 32, 8, 128, vocab=32000),
    "olmoe-1b-7b": ModelShape("OLMoE-1B-7B", 2048, 1024, 64, 8, 16, tuple(range(16)), 16, 16, 128, vocab=50304),
    "deepseek-v2-lite": ModelShape("DeepSeek-V2-Lite", 2048, 1408, 64, 6, 27, tuple(range(1, 27)), 16, 16, 128,
                                   shared_inter=2 * 1408, dense_inter=10944, vocab=102400),
}


def preset(name: str) -> ModelShape:
    """A preset shape by name."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model shape {name!r} (presets: {', '.join(PRESETS)})") from None
