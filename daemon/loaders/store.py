"""moed model directories (written by `moed convert`) as checkpoints: dense weights, tokenizer, and
a provider that serves the quantised experts at a chosen bit-width."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer

from daemon.costcheck import profile_costs
from daemon.errors import FormatError
from daemon.loaders.checkpoint import Checkpoint
from daemon.models.args import ModelArgs
from daemon.models.moe import ExpertWeights
from daemon.tokenizer import Tokenizer
from offload.layout import MATRICES
from offload.manifest import MANIFEST
from offload.provider import StoreExperts
from offload.tiered import OffloadOptions, TieredExperts, tiered_experts
from offload.store import DenseReader, Store, TensorRows
from quant.kernels import fast_cpu_backend
from quant.planes import PLANES

DEFAULT_KERNEL = "reference"


class StoreCheckpoint(Checkpoint):
    """A moed store: the manifest is checked on open, dense weights when first asked for."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.store = Store(self.path)
        self.config = dict(self.store.manifest.config)
        self._dense: DenseReader | None = None

    def tensor(self, name: str) -> torch.Tensor | None:
        """A dense tensor, read and verified when asked for (the loader asks for each once)."""
        if self._dense is None:
            self._dense = self.store.dense()
        return self._dense.tensor(name)

    def rows(self, name: str, verify_now: bool = True) -> TensorRows | None:
        """A dense matrix left in the file, its rows read when asked for (None if absent; DenseReader.rows)."""
        if self._dense is None:
            self._dense = self.store.dense()
        return self._dense.rows(name, verify_now)

    def check_unread(self) -> None:
        """Verify the dense file's extents no tensor() call read."""
        if self._dense is None:
            self._dense = self.store.dense()
        self._dense.check_unread()

    def where(self, name: str) -> Path:
        return self.path / "dense.safetensors"

    def experts(self, layer: int, prefix: str, names: tuple[str, str, str], n_experts: int) -> ExpertWeights | None:
        """The layer's experts dequantised from their full 8-bit view (the store's highest precision)."""
        if layer not in self.store.layers:
            return None
        parts: list[list[torch.Tensor]] = [[], [], []]
        for e in range(n_experts):
            views = self.store.views(self.store.read_expert(layer, e, PLANES), PLANES)
            for i, v in enumerate((views.gate, views.up, views.down)):
                parts[i].append(v.dequantize())
        return ExpertWeights(*(torch.stack(p) for p in parts))

    def tokenizer(self) -> Tokenizer:
        info = self.store.manifest.tokenizer
        try:
            tok = HFTokenizer.from_str(self.store.tokenizer_json())
        except Exception as e:  # tokenizers raises its own exception types
            raise FormatError(f"cannot read tokenizer: {e}", self.path / "tokenizer.json") from None
        return Tokenizer(tok, info.get("bos_id"), tuple(info.get("eos_ids") or ()), bool(info.get("add_bos")),
                         info.get("chat_template"), dict(info.get("special") or {}))

    def expert_provider(self, args: ModelArgs, moe_layers: list[int], bits: int | None,
                        kernel: str | None, offload: OffloadOptions | None = None) -> StoreExperts | TieredExperts:
        """Every routed expert at `bits` bits (default 8), read and checked now, computed by `kernel`;
        with `offload`, experts held within its budgets and read on demand instead."""
        where = self.path / MANIFEST
        if self.store.layers != list(moe_layers):
            raise FormatError(f"the experts file has layers {self.store.layers} but the config implies "
                              f"{list(moe_layers)}", where)
        d, i = args.hidden_size, args.moe_intermediate_size
        want = ((MATRICES[0], (i, d)), (MATRICES[1], (i, d)), (MATRICES[2], (d, i)))
        if tuple((n, tuple(s)) for n, s in self.store.manifest.matrices) != want:
            raise FormatError(f"expert matrices {self.store.manifest.matrices} disagree with the config's {want}",
                              where)
        for layer in moe_layers:
            if self.store.n_experts(layer) != args.num_experts or not all(
                    self.store.has(layer, e) for e in range(args.num_experts)):
                raise FormatError(f"layer {layer} has {self.store.n_experts(layer)} experts in the store "
                                  f"but the config says {args.num_experts}", where)
        try:
            if offload is not None:
                if bits is not None:
                    offload = dataclasses.replace(offload, bits=bits)
                return tiered_experts(self.store, offload, kernel or fast_cpu_backend(), args.hidden_act,
                                      functools.partial(profile_costs, self.config))
            provider = StoreExperts(self.store, PLANES if bits is None else bits, kernel or DEFAULT_KERNEL,
                                    args.hidden_act)
        except ValueError as e:
            raise FormatError(str(e), self.path) from None
        provider.preload()
        return provider
