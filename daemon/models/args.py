"""Model hyper-parameters read from a Hugging Face style config dict."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from daemon.errors import MoedError


@dataclass(frozen=True, slots=True)
class ModelArgs:
    """Fields every supported MoE architecture has; architectures subclass it."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    num_key_value_heads: int = 0
    head_dim: int = 0
    intermediate_size: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    norm_topk_prob: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    # config.json spellings that differ between architectures: ours -> theirs
    ALIASES: ClassVar[dict[str, tuple[str, ...]]] = {
        "num_experts": ("n_routed_experts", "num_local_experts"),
    }

    # for architectures whose experts are their MLPs (Mixtral, OLMoE): width is `intermediate_size`
    EXPERTS_ARE_MLPS: ClassVar[dict[str, tuple[str, ...]]] = {
        "num_experts": ("n_routed_experts", "num_local_experts"),
        "moe_intermediate_size": ("intermediate_size",),
    }

    @classmethod
    def from_config(cls, cfg: dict[str, Any], source: str | None = None) -> "ModelArgs":
        """Build the args from a config dict, filling derived fields."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "raw":
                continue
            for key in (f.name, *cls.ALIASES.get(f.name, ())):
                if key in cfg and cfg[key] is not None:
                    values[f.name] = cfg[key]
                    break
        rope = cfg.get("rope_parameters") or {}
        if "rope_theta" not in values and "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        if "rope_scaling" not in values and rope.get("rope_type", "default") != "default":
            values["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in values
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise MoedError(f"config lacks required field(s): {', '.join(missing)}", source)
        values.setdefault("num_key_value_heads", values["num_attention_heads"])
        if not values.get("head_dim"):
            values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
        values["raw"] = dict(cfg)
        try:
            return cls(**cls.normalise(values))
        except (TypeError, ValueError) as e:
            raise MoedError(f"bad config: {e}", source) from e

    @classmethod
    def normalise(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Architecture hook to fix up values before construction."""
        return values

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """End-of-sequence token ids as a tuple."""
        e = self.eos_token_id
        if e is None:
            return ()
        return tuple(e) if isinstance(e, (list, tuple)) else (int(e),)
