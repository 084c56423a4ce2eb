"""Build a model from a checkpoint: meta-device construction, checked weights, expert provider."""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from daemon.config import moed_home
from daemon.errors import FormatError, MoedError
from daemon.loaders import open_checkpoint
from daemon.loaders.checkpoint import Checkpoint
from daemon.models import architecture
from daemon.models.args import ModelArgs
from daemon.models.moe import ExpertProvider, ExpertWeights, InMemoryExperts
from daemon.models.qdense import DENSE_BITS, RowsEmbedding, quantize_dense
from daemon.models.transformer import CausalLM
from daemon.tokenizer import Tokenizer
from offload.manifest import MANIFEST
from offload.tiered import OffloadOptions, return_freed_memory
from quant.kernels import fast_cpu_backend, get_backend


@dataclass(slots=True)
class LoadedModel:
    """A ready model with its tokenizer and the provider of its routed experts."""

    model: CausalLM
    tokenizer: Tokenizer
    args: ModelArgs
    experts: InMemoryExperts | ExpertProvider  # a store's provider (offload.provider.StoreExperts) for moed stores
    source: str


def hf_names(name: str, renames: tuple[tuple[str, str], ...]) -> list[str]:
    """Candidate checkpoint names for a moed parameter name (undoing the arch's renames)."""
    out = [name]
    for theirs, ours in renames:
        if ours in name:
            out.append(name.replace(ours, theirs))
    return out


def skeleton(ckpt: Checkpoint) -> tuple[ModuleType, ModelArgs, CausalLM]:
    """The checkpoint's architecture module, its args, and the model built on the meta device."""
    model_type = ckpt.config.get("model_type")
    if not isinstance(model_type, str):
        raise MoedError("config has no model_type", ckpt.path)
    arch = architecture(model_type, str(ckpt.path))
    args = arch.Args.from_config(ckpt.config, str(ckpt.path))
    if args.num_experts_per_tok > args.num_experts:
        raise MoedError(f"num_experts_per_tok={args.num_experts_per_tok} exceeds num_experts={args.num_experts}",
                        ckpt.path)
    try:
        with torch.device("meta"), _no_init():
            model = arch.Model(args)
    except ValueError as e:
        raise MoedError(f"unsupported configuration: {e}", ckpt.path) from None
    return arch, args, model


@contextmanager
def _no_init() -> Iterator[None]:
    """torch.nn.init's functions as no-ops: a module built on the meta device has no values to fill, and
    filling them there goes through torch's reference ops, which import torch._dynamo and sympy (~40 MiB
    held for the process's life, and seconds of import)."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *a, **k: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def stored_copy(source: Path) -> Path:
    """A moed store of a Hugging Face folder or GGUF file, converted on first use into moed's data
    directory and found again by the source's path, size and modification time."""
    from daemon.convert import convert

    files = sorted(source.rglob("*")) if source.is_dir() else [source]
    ident = [str(source.resolve())] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                                       for f in files if f.is_file()]
    digest = hashlib.sha256("\n".join(ident).encode()).hexdigest()[:16]
    out = moed_home() / "stores" / f"{source.name.removesuffix('.gguf')}-{digest}"
    if not (out / MANIFEST).exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(source, out, force=True)
    return out


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, bits: int | None = None,
               kernel: str | None = None, offload: OffloadOptions | None = None,
               dense_bits: int | None = None) -> LoadedModel:
    """Load a Hugging Face folder, GGUF file or moed store into a runnable model.

    `bits` (1..8) and `kernel` (a quant backend name) apply to moed stores: every routed expert is
    read at that many bits and computed by that backend. `offload` holds the experts within memory
    budgets (a Hugging Face folder or GGUF file is converted to a store first, once, see stored_copy).
    `dense_bits` 8 (or 4) holds the dense weights (attention, shared and dense MLPs, lm_head; the embedding at
    8) at that many bits (daemon.models.qdense); None keeps them in `dtype`.
    """
    if dense_bits not in (None, *DENSE_BITS):
        raise MoedError(f"dense bits must be 4 or 8 (got {dense_bits})")
    if dense_bits or offload is not None:  # the lean modes: a freed block's memory goes back to the system
        return_freed_memory()
    if offload is not None:
        try:
            offload.validate()
        except ValueError as e:
            raise MoedError(str(e)) from None
    ckpt = open_checkpoint(path)
    store = hasattr(ckpt, "expert_provider")
    if offload is not None and not store:
        ckpt = open_checkpoint(stored_copy(ckpt.path))
        store = True
    if bits is not None and not store:
        raise MoedError("--bits needs a moed model directory (make one with `moed convert`)", ckpt.path)
    arch, args, model = skeleton(ckpt)
    renames = getattr(arch, "RENAMES", ())
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}

    def source(name: str) -> str:  # a tied lm_head is the embedding
        return "model.embed_tokens.weight" if name == "lm_head.weight" and args.tie_word_embeddings else name

    def fetch(name: str) -> torch.Tensor:
        return checked_tensor(ckpt, source(name), shapes[name], renames)

    def rows(name: str, verify_now: bool = True):
        """A store's matrix, its rows read when asked for (offload.store.TensorRows): verified now, or as
        quantize_dense reads it in blocks, in order (the file is read once)."""
        return checked_tensor(ckpt, source(name), shapes[name], renames, lambda n: ckpt.rows(n, verify_now))

    if hasattr(ckpt, "rows") and not args.tie_word_embeddings:  # the table stays in the store: rows read on use
        model.model.embed_tokens = RowsEmbedding(rows("model.embed_tokens.weight"), dtype)
    backends = []
    if dense_bits:  # each weight is read, quantised and dropped in turn: the float weights are never all held
        backends.append(get_backend(fast_cpu_backend()))
        quantize_dense(model, backends[0].name, dtype, fetch,
                       rows=functools.partial(rows, verify_now=False) if hasattr(ckpt, "rows") else None,
                       bits=dense_bits)
    tied = args.tie_word_embeddings
    names = list(model.state_dict())  # what is left to load: the quantised layers hold their own weights
    state = {name: fetch(name).to(dtype) for name in names if not (tied and name == "lm_head.weight")}
    if tied and "lm_head.weight" in names:  # one tensor for both, as in the checkpoint
        emb = state.get("model.embed_tokens.weight")
        state["lm_head.weight"] = emb if emb is not None else fetch("lm_head.weight").to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    if hasattr(ckpt, "check_unread"):
        ckpt.check_unread()
    if store:  # quantised experts stay in the store's form
        provider = ckpt.expert_provider(args, model.moe_layers, bits, kernel, offload)
        if hasattr(provider, "attach_routers"):
            provider.attach_routers({i: model.model.layers[i].mlp.gate for i in model.moe_layers})
        if hasattr(provider, "backend"):
            backends.append(provider.backend)
        return _finish(model, provider, ckpt, args, backends)
    layers = {}
    e, d = args.num_experts, args.hidden_size
    inter = args.moe_intermediate_size
    for i in model.moe_layers:
        prefix = hf_names(f"model.layers.{i}.mlp.experts", renames)[-1]
        w = ckpt.experts(i, prefix, arch.EXPERT_NAMES, e)
        if w is None:
            raise FormatError(f"routed experts of layer {i} are missing ({prefix}.*)", ckpt.path)
        for part, want in (("gate", (e, inter, d)), ("up", (e, inter, d)), ("down", (e, d, inter))):
            got = tuple(getattr(w, part).shape)
            if got != want:
                raise FormatError(f"layer {i} expert {part} weights have shape {got} but the config implies {want}",
                                  ckpt.path)
        layers[i] = ExpertWeights(w.gate.to(dtype), w.up.to(dtype), w.down.to(dtype))
    return _finish(model, InMemoryExperts(layers, args.hidden_act), ckpt, args, backends)


def _finish(model: CausalLM, provider, ckpt: Checkpoint, args: ModelArgs, backends: list) -> LoadedModel:
    if any(b.concurrent for b in backends):
        # the backend's workers run its sessions side by side on the CPU threads torch was given; torch's own
        # (small) ops then take one thread: its OpenMP workers spinning between them would slow the
        # backend's (measured: 31 vs 22 decode tok/s, bench/offload_cpu.py's model at a 100% budget)
        torch.set_num_threads(1)
    model.attach_experts(provider)
    model.report_timings(getattr(provider, "timings", None))  # tiered experts: the cost model's inbox
    model.eval()
    tokenizer = ckpt.tokenizer()
    if tokenizer.vocab_size > args.vocab_size:
        raise FormatError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {args.vocab_size}", ckpt.path)
    if not tokenizer.eos_ids and args.eos_ids:
        tokenizer.eos_ids = args.eos_ids
    return LoadedModel(model, tokenizer, args, provider, str(ckpt.path))


def checked_tensor(ckpt: Checkpoint, name: str, shape: tuple[int, ...], renames, get=None) -> torch.Tensor:
    """The checkpoint's tensor for a moed parameter name, as stored, after checking its shape (`get`, by
    checkpoint name, instead of ckpt.tensor: anything with a shape)."""
    for cand in hf_names(name, renames):
        t = (get or ckpt.tensor)(cand)
        if t is not None:
            if tuple(t.shape) != shape:
                raise FormatError(f"tensor {cand} has shape {tuple(t.shape)} but the config implies {shape}",
                                  ckpt.where(cand))
            return t
    raise FormatError(f"tensor {name} is missing", ckpt.path)
