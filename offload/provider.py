"""An ExpertProvider serving routed experts from a store at one fixed bit-width.

Each expert is read (its r-bit prefix, one aligned read) and turned into its backend's compute form on
first use, or all at once by `preload`. `ensure(layer, expert, bits)` raises an expert to more bits by
reading only the planes it lacks; the tiered provider (a later issue) grows from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from offload.routing import group_by_expert, scatter_add
from offload.store import Store
from quant.kernels import Backend, PreparedExpert, get_backend
from quant.planes import PLANES


@dataclass(frozen=True, slots=True)
class Resident:
    """An expert in memory: its stored sections read so far (head, planes) and its compute form."""

    bits: int
    sections: list
    form: PreparedExpert


class StoreExperts:
    """Routed experts from a Store at `bits` bits, computed by a kernel backend."""

    def __init__(self, store: Store, bits: int = PLANES, backend: str | Backend = "reference",
                 act: str = "silu") -> None:
        if not 1 <= bits <= PLANES:
            raise ValueError(f"bits must be in 1..{PLANES}, got {bits}")
        self.store = store
        self.bits = bits
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        self.act = act
        self._resident: dict[tuple[int, int], Resident] = {}
        self._layers: dict[int, LayerExperts] = {}

    def experts(self, layer: int) -> "LayerExperts":
        """The callable routed experts of one MoE layer."""
        return layer_experts(self, layer, LayerExperts)

    def ensure(self, layer: int, expert: int, bits: int | None = None) -> Resident:
        """The expert resident at >= `bits` (default: the provider's); reads only the sections it lacks."""
        bits = self.bits if bits is None else bits
        r = self._resident.get((layer, expert))
        if r is not None and r.bits >= bits:
            return r
        if r is None:
            sections = self.store.read_expert(layer, expert, bits)
        else:  # planes r.bits .. bits-1 are sections r.bits+1 .. bits
            sections = r.sections + self.store.read_sections(layer, expert, r.bits + 1, bits + 1)
        form = self.store.form(self.backend, sections, bits, self.act)
        r = Resident(bits, sections, form)
        self._resident[(layer, expert)] = r
        return r

    def preload(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Make every expert of every layer resident at the provider's bit-width."""
        keys = [(layer, e) for layer in self.store.layers for e in range(self.store.n_experts(layer))]
        for i, (layer, e) in enumerate(keys):
            self.ensure(layer, e)
            if progress is not None:
                progress(i + 1, len(keys))

    def drop(self) -> None:
        """Forget every resident expert (the next use reads it again)."""
        self._resident.clear()

    def resident(self, layer: int, expert: int) -> Resident | None:
        """The resident copy of an expert, if any."""
        return self._resident.get((layer, expert))

    @property
    def bytes_read(self) -> int:
        """Bytes read from the experts file so far."""
        return self.store.reader.bytes_read

    @property
    def resident_bytes(self) -> int:
        """Bytes held by the resident experts' compute forms."""
        return sum(r.form.nbytes for r in self._resident.values())


def layer_experts(provider, layer: int, cls: type):
    """provider's callable experts of one layer (made once, kept in provider._layers)."""
    if layer not in provider._layers:
        if layer not in provider.store.layers:
            raise KeyError(f"the store has no experts for layer {layer}")
        provider._layers[layer] = cls(provider, layer)
    return provider._layers[layer]


class LayerExperts:
    """One layer's routed experts: x [T, D], routing -> sum_k w[t, k] * expert_k(x[t])."""

    def __init__(self, provider: StoreExperts, layer: int) -> None:
        self.provider = provider
        self.layer = layer

    def __call__(self, x: torch.Tensor, routing) -> torch.Tensor:
        out = torch.zeros_like(x)
        p = self.provider
        for e, tok, wt in group_by_expert(routing):
            y = p.backend.ffn(x[tok], p.ensure(self.layer, e).form)  # [n, D]
            scatter_add(out, tok, y.to(x.dtype) * wt[:, None])
        return out
