"""The MoE block: router, shared expert, and routed experts from a provider."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from offload.routing import Routing, group_by_expert, scatter_add

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function a config names."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}") from None


class MLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)); dense layers and shared experts."""

    def __init__(self, hidden: int, inter: int, act: str = "silu") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Softmax top-k router (Qwen, Mixtral, OLMoE); `norm_topk` renormalises the k weights."""

    def __init__(self, hidden: int, n_experts: int, top_k: int, norm_topk: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, hidden))
        self.top_k, self.norm_topk = top_k, norm_topk

    def forward(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x, self.weight)  # [T, E]
        probs = logits.float().softmax(dim=-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        if self.norm_topk:
            w = w / w.sum(dim=-1, keepdim=True)
        return Routing(idx, w.to(x.dtype), logits)


RoutingObserver = Callable[[int, Routing], None]  # (layer, routing) after a block routes


class Experts(Protocol):
    """The routed experts of one layer, wherever they live."""

    def __call__(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x [T, D] -> sum_k w[t,k] * expert_{idx[t,k]}(x[t]), [T, D]."""
        ...


class ExpertProvider(Protocol):
    """Hands the model the experts of a layer; offload/ implements tiered ones."""

    def experts(self, layer: int) -> Experts: ...


@dataclass(slots=True)
class ExpertWeights:
    """One layer's routed experts, stacked: gate/up [E, I, D], down [E, D, I]."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @property
    def n_experts(self) -> int:
        return self.gate.shape[0]


class StackedExperts:
    """Experts held as full-precision stacked tensors in memory (the reference path)."""

    def __init__(self, w: ExpertWeights, act: str = "silu") -> None:
        self.w = w
        self.act = activation(act)

    def __call__(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e, tok, wt in group_by_expert(routing):
            xs = x[tok]  # [n, D]
            h = self.act(F.linear(xs, self.w.gate[e])) * F.linear(xs, self.w.up[e])
            scatter_add(out, tok, F.linear(h, self.w.down[e]) * wt[:, None])
        return out


class InMemoryExperts:
    """An ExpertProvider over stacked weights per MoE layer."""

    def __init__(self, layers: dict[int, ExpertWeights], act: str = "silu") -> None:
        self._layers = {i: StackedExperts(w, act) for i, w in layers.items()}

    def experts(self, layer: int) -> Experts:
        return self._layers[layer]

    def weights(self, layer: int) -> ExpertWeights:
        """The stacked weights of one layer."""
        return self._layers[layer].w


class MoEBlock(nn.Module):
    """Routes each token to k experts (from the provider) plus an optional shared expert."""

    def __init__(self, layer: int, router: nn.Module, shared: nn.Module | None = None,
                 shared_gate: nn.Module | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.gate = router
        if shared is not None:
            self.shared = shared
        if shared_gate is not None:
            self.shared_gate = shared_gate
        self.provider: ExpertProvider | None = None
        self.observer: RoutingObserver | None = None
        self.experts_seconds = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, D]
        routing = self.gate(x)
        if self.observer is not None:
            self.observer(self.layer, routing)
        t = time.perf_counter()
        out = self.provider.experts(self.layer)(x, routing)
        self.experts_seconds = time.perf_counter() - t  # the routed experts' part (DecoderLayer's timings)
        if hasattr(self, "shared"):
            s = self.shared(x)
            if hasattr(self, "shared_gate"):
                s = torch.sigmoid(self.shared_gate(x)) * s
            out = out + s
        return out.reshape(shape)


def is_sparse_layer(layer: int, step: int = 1, dense_layers: tuple[int, ...] | list[int] = ()) -> bool:
    """Qwen-style choice of MoE layers: every `step`-th layer except `dense_layers`."""
    return layer not in dense_layers and (layer + 1) % step == 0
