"""The decoder stack shared by every architecture; architectures supply its parts."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import torch
from torch import nn

from daemon.models.args import ModelArgs
from daemon.models.attention import AttnInputs, RaggedInputs, causal_mask
from daemon.models.cache import KVCache
from daemon.models.moe import ExpertProvider, MoEBlock, RoutingObserver
from daemon.models.norms import RMSNorm
from daemon.models.rope import Rope

# a gap between one forward's end and the next's start up to this is a decode step's own (sampling, the
# generate loop): its head timing counts it; a longer one is idle time between requests
HEAD_GAP_S = 0.25


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden: int, eps: float) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.timings: deque | None = None  # set by CausalLM.report_timings

    def forward(self, x: torch.Tensor, a: AttnInputs) -> torch.Tensor:
        t = time.perf_counter()
        h = x + self.self_attn(self.input_layernorm(x), a)
        out = h + self.mlp(self.post_attention_layernorm(h))
        if self.timings is not None and x.shape[-2] == 1 and isinstance(a, AttnInputs) \
                and isinstance(self.mlp, MoEBlock):  # one token's MoE layer: all but its routed experts
            self.timings.append(("attn", a.cache.length + 1, time.perf_counter() - t - self.mlp.experts_seconds))
        return out


def decoder_layers(a: ModelArgs, attn: Callable[[int], nn.Module],
                   mlp: Callable[[int], nn.Module]) -> list[DecoderLayer]:
    """One DecoderLayer per layer index from the architecture's attention and MLP factories."""
    return [DecoderLayer(attn(i), mlp(i), a.hidden_size, a.rms_norm_eps) for i in range(a.num_hidden_layers)]


class Body(nn.Module):
    """Embeddings, decoder layers and the final norm (`model.*` in checkpoints)."""

    def __init__(self, args: ModelArgs, layers: list[DecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class CausalLM(nn.Module):
    """A decoder-only MoE language model; architectures subclass it to build layers."""

    def __init__(self, args: ModelArgs, layers: list[DecoderLayer], rope: Rope | None = None) -> None:
        super().__init__()
        if rope is None:
            rope = Rope(args.head_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings)
        self.args = args
        self.model = Body(args, layers)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rope = rope
        self.sliding_window: int | None = None
        self.timings: deque | None = None
        self._layers_s = 0.0  # the last forward's time in its decoder layers
        self._ended: float | None = None  # when the last forward ended

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the layers whose MLP is an MoE block."""
        return [i for i, l in enumerate(self.model.layers) if isinstance(l.mlp, MoEBlock)]

    def attach_experts(self, provider: ExpertProvider) -> None:
        """Give every MoE block the provider of its routed experts."""
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoEBlock):
                layer.mlp.provider = provider

    def report_timings(self, sink: deque | None) -> None:
        """Append what the cost model times (profiler.machine.CostTimes.observe) to sink as (kind, x, seconds):
        each one-token MoE layer's work but its routed experts ("attn", positions attended: norms, attention,
        router) and each decode step's work outside its layers ("head", positions given logits: embedding,
        rope, final norm, lm_head, and the sampling and loop since the last forward, _logits); None: stop.
        (The routed experts report their own time.)"""
        self.timings = sink
        for layer in self.model.layers:
            layer.timings = sink

    def _layers(self, x: torch.Tensor, a: AttnInputs | RaggedInputs) -> torch.Tensor:
        t = time.perf_counter()
        for layer in self.model.layers:
            x = layer(x, a)
        self._layers_s = time.perf_counter() - t
        return x

    def _logits(self, h: torch.Tensor, since: float, decode: bool) -> torch.Tensor:
        """lm_head of final-norm hidden states [..., D]; a decode step (one new token per sequence) reports its
        time since `since` outside its layers (a prefill's grows with the prompt: not the op the model times),
        and the time from the last forward's end to `since` if under HEAD_GAP_S: the sampling and the loop
        around the model, which a token's time also counts."""
        out = self.lm_head(h)
        end = time.perf_counter()
        if self.timings is not None and decode:
            gap = since - self._ended if self._ended is not None and 0 <= since - self._ended < HEAD_GAP_S else 0.0
            self.timings.append(("head", h.numel() // h.shape[-1], end - since - self._layers_s + gap))
        self._ended = end
        return out

    def observe_routing(self, observer: RoutingObserver | None) -> None:
        """Call observer(layer, routing) after every MoE block routes (None: stop)."""
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoEBlock):
                layer.mlp.observer = observer

    def new_cache(self, capacity: int = 256) -> KVCache:
        """An empty KV cache for this model."""
        return KVCache(len(self.model.layers), capacity)

    def hidden(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Final-norm hidden states [B, T, D] for tokens [B, T] after the cached ones."""
        t = tokens.shape[1]
        start = cache.length
        cos, sin = self.rope.span(start, t, tokens.device)
        a = AttnInputs(cos, sin, causal_mask(t, start, tokens.device, self.sliding_window), cache)
        x = self._layers(self.model.embed_tokens(tokens), a)
        cache.advance(t)
        return self.model.norm(x)

    def step(self, seqs: list[tuple[torch.Tensor, KVCache]]) -> torch.Tensor:
        """Logits [N, V] of the last new token of each sequence: new tokens [T_i] after its own cache.

        The sequences' tokens run as one row [1, sum T] through the dense and MoE parts; attention
        runs per sequence with its own positions, mask and cache.
        """
        if len(seqs) == 1:
            tokens, cache = seqs[0]
            return self(tokens[None], cache, last_only=True)[:, -1]
        since = time.perf_counter()
        lengths = [len(t) for t, _ in seqs]
        device = seqs[0][0].device
        pos = torch.cat([torch.arange(c.length, c.length + n, device=device) for (_, c), n in zip(seqs, lengths)])
        cos, sin = self.rope.tables(pos)  # [sum T, d_rope]
        parts = [AttnInputs(c_, s_, causal_mask(n, cache.length, device, self.sliding_window), cache)
                 for c_, s_, n, (_, cache) in zip(cos.split(lengths), sin.split(lengths), lengths, seqs)]
        x = self.model.embed_tokens(torch.cat([t for t, _ in seqs])[None])  # [1, sum T, D]
        x = self._layers(x, RaggedInputs(parts, lengths))
        for (_, cache), n in zip(seqs, lengths):
            cache.advance(n)
        last = torch.tensor(lengths, device=device).cumsum(0) - 1  # [N]
        return self._logits(self.model.norm(x[0, last]), since, max(lengths) == 1)

    def forward(self, tokens: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] (or [B, 1, V] with last_only) for tokens [B, T]."""
        since = time.perf_counter()
        h = self.hidden(tokens, cache)
        if last_only:
            h = h[:, -1:]
        return self._logits(h, since, tokens.shape[1] == 1)
