"""`moed convert`: a Hugging Face folder or GGUF file -> a moed model directory with bit-plane experts."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from daemon.errors import FormatError, MoedError
from daemon.loaders import open_checkpoint
from daemon.loaders.build import checked_tensor, hf_names, skeleton
from offload.layout import MATRICES
from offload.manifest import TOKENIZER, Manifest
from offload.writer import StoreWriter
from quant.groups import DEFAULT_GROUP, GROUP_SIZES
from quant.schemes import scheme_names

STORED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Progress = Callable[[int, int, int], None]  # (experts done, experts in all, bytes written)


def convert(source: str | os.PathLike, out: str | os.PathLike, group_size: int = DEFAULT_GROUP,
            scheme: str = "msb", force: bool = False, progress: Progress | None = None) -> Path:
    """Write `out` from `source`: dense weights as the source has them, experts quantised to bit-planes."""
    if group_size not in GROUP_SIZES:
        raise MoedError(f"group size {group_size} is not one of {', '.join(map(str, GROUP_SIZES))}")
    if scheme not in scheme_names():
        raise MoedError(f"unknown scheme {scheme!r} (known: {', '.join(scheme_names())})")
    ckpt = open_checkpoint(source)
    if hasattr(ckpt, "expert_provider"):
        raise MoedError("already a moed model directory", source)
    arch, args, model = skeleton(ckpt)
    model_type = args.model_type
    d, i, n_exp = args.hidden_size, args.moe_intermediate_size, args.num_experts
    if d % group_size or i % group_size:
        raise MoedError(f"group size {group_size} does not divide the expert widths (hidden {d}, "
                        f"intermediate {i}); choose one of {', '.join(map(str, GROUP_SIZES))} that does")
    renames = getattr(arch, "RENAMES", ())
    dense = {}
    for name, p in model.state_dict().items():
        if not (name == "lm_head.weight" and args.tie_word_embeddings):
            t = checked_tensor(ckpt, name, tuple(p.shape), renames)
            dense[name] = t if t.dtype in STORED_DTYPES else t.float()
    tok = ckpt.tokenizer()
    kind = "gguf" if ckpt.path.is_file() else "hf"
    manifest = Manifest(
        architecture=model_type, config=_jsonable(ckpt.config),
        source={"path": str(Path(source).resolve()), "kind": kind,
                "dense_dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in dense.values()})},
        tokenizer={"file": TOKENIZER, "from": "gguf metadata" if kind == "gguf" else "tokenizer.json",
                   "bos_id": tok.bos_id, "eos_ids": list(tok.eos_ids), "add_bos": tok.add_bos,
                   "chat_template": tok.chat_template, "special": dict(tok.special)},
        scheme=scheme, group_size=group_size, alignment=4096,
        matrices=((MATRICES[0], (i, d)), (MATRICES[1], (i, d)), (MATRICES[2], (d, i))), section_lengths=())
    layers = model.moe_layers
    total = len(layers) * n_exp
    with StoreWriter(out, manifest, force=force) as w:
        w.write_dense(dense)
        w.write_tokenizer(tok.tok.to_str())
        done = 0
        for layer in layers:
            prefix = hf_names(f"model.layers.{layer}.mlp.experts", renames)[-1]
            ew = ckpt.experts(layer, prefix, arch.EXPERT_NAMES, n_exp)
            if ew is None:
                raise FormatError(f"routed experts of layer {layer} are missing ({prefix}.*)", ckpt.path)
            for e in range(n_exp):
                w.add_expert(layer, e, ew.gate[e], ew.up[e], ew.down[e])
                done += 1
                if progress is not None:
                    progress(done, total, w.bytes_written)
            del ew
        return w.commit()


def _jsonable(cfg: dict) -> dict:
    """The config as plain JSON values (GGUF metadata may hold numpy scalars)."""
    def default(o):
        if hasattr(o, "item"):
            return o.item()
        if hasattr(o, "tolist"):
            return o.tolist()
        raise TypeError(f"config value {o!r} is not JSON")
    return json.loads(json.dumps(cfg, default=default))
