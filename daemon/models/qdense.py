"""Dense weights at 8 (or 4) bits: a model's linear layers and token embedding quantised per group at load.

The routed experts have their own store and kernels; this is the rest of the model (attention
projections, shared experts, dense MLP layers, lm_head, embedding), which a llama.cpp Q8_0 file
also holds at 8 bits (a Q4_0 file at 4: `bits` 4 makes the linear layers 4-bit; the embedding, whose rows
are only looked up, stays at 8). Each matrix is min-max quantised per group of the largest of 128, 64, 32
dividing its rows (quant.groups.quantize); a matrix with no such group stays as it is, and so do the
routers and gates of fewer than MIN_OUTPUTS outputs (a routing decision is worth more than the bytes).
Linear layers run on a quant kernel backend (onnxruntime's MatMulNBits where available); an attention
layer's q, k and v become one matrix of their rows (groups are per row, so its codes are theirs: one
call instead of three per token); the embedding dequantises the rows it looks up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from quant.groups import GROUP_SIZES, GroupCodes, quantize
from quant.kernels import Backend, fast_cpu_backend, get_backend
from quant.views import AffineTerm, QuantView

MIN_OUTPUTS = 16  # a linear layer with fewer outputs is a gate (e.g. Qwen2-MoE's shared-expert gate): kept
DENSE_BITS = (4, 8)  # the bit-widths dense weights can be held at


class QuantLinear(nn.Module):
    """y = x @ W^T (+ bias) with W held in a backend's compute form of its 8-bit codes."""

    def __init__(self, backend: Backend, form, in_features: int, out_features: int, bias: torch.Tensor | None,
                 nbytes: int) -> None:
        super().__init__()
        self.backend, self.form = backend, form
        self.in_features, self.out_features = in_features, out_features
        # a buffer, not a parameter: the loader fetched it with the weight (a fused qkv's is not in any checkpoint)
        self.register_buffer("bias", bias, persistent=False)
        self.nbytes = nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.backend.linear(x.reshape(-1, self.in_features).float(), self.form).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.backend.name}"


class QuantEmbedding(nn.Module):
    """An embedding table as 8-bit codes per group; looked-up rows are dequantised."""

    def __init__(self, q: GroupCodes) -> None:
        super().__init__()
        self.register_buffer("codes", q.codes, persistent=False)
        self.register_buffer("scale", q.scale, persistent=False)
        self.register_buffer("minimum", q.minimum, persistent=False)
        self.group = q.group
        self.num_embeddings, self.embedding_dim = q.codes.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        c = self.codes[flat].float().reshape(flat.numel(), -1, self.group)
        rows = c * self.scale[flat].float()[..., None] + self.minimum[flat].float()[..., None]
        return rows.reshape(*ids.shape, self.embedding_dim)

    @property
    def nbytes(self) -> int:
        """Bytes held: codes and per-group params."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.minimum))


class RowsEmbedding(nn.Module):
    """An embedding table left in the model's file: the rows a forward looks up are read then (a token's
    row is a few KiB; the table, vocabulary x hidden, need not be held). `rows[ids]` gives them as stored."""

    def __init__(self, rows, dtype: torch.dtype) -> None:
        super().__init__()
        self.rows, self.dtype = rows, dtype
        self.num_embeddings, self.embedding_dim = rows.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows[ids].to(self.dtype)

    nbytes = 0  # bytes held


def group_for(k: int) -> int | None:
    """The largest supported group size dividing a row of length k, or None."""
    return next((g for g in sorted(GROUP_SIZES, reverse=True) if k % g == 0), None)


def quantize_rows(w: torch.Tensor, group: int, codes: int = 1 << 20, bits: int = 8) -> GroupCodes:
    """quantize(w, bits, group) a block of rows (about `codes` weights) at a time: one block in float32 at once
    (and quantize's temporaries of it), not the whole matrix."""
    rows = max(1, codes // max(1, w.shape[1]))
    parts = [quantize(w[i:i + rows], bits, group) for i in range(0, w.shape[0], rows)]
    return GroupCodes(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                      torch.cat([p.minimum for p in parts]), bits, group)


# a matrix read in row blocks (see quantize_dense's rows) is made in blocks of about this many codes
BLOCK_CODES = 4 << 20
BLOCK_ROWS = 64  # ... of a multiple of this many rows (a kernel's form may be laid out in blocks of rows)
FUSED = ("q_proj", "k_proj", "v_proj")  # an attention layer's projections of its input, fused into `qkv`


def fusable(model: nn.Module) -> Iterator[tuple[str, nn.Module, int]]:
    """(qualified name, module, group) of every module whose FUSED linear layers quantize_dense fuses."""
    for name, m in model.named_modules():
        parts = [getattr(m, n, None) for n in FUSED]
        if (hasattr(m, "qkv") and all(isinstance(p, nn.Linear) for p in parts)
                and len({(p.in_features, p.bias is None) for p in parts}) == 1
                and all(p.out_features >= MIN_OUTPUTS for p in parts)
                and (group := group_for(parts[0].in_features)) is not None):
            yield name, m, group


def replaceable(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Module, int]]:
    """(qualified name, parent, attribute, module, group) of every layer quantize_dense replaces."""
    for pname, parent in model.named_modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and child.out_features >= MIN_OUTPUTS:
                group = group_for(child.in_features)
            elif isinstance(child, nn.Embedding):
                group = group_for(child.embedding_dim)
            else:
                continue
            if group is not None:
                yield f"{pname}.{name}" if pname else name, parent, name, child, group


def quantize_dense(model: nn.Module, kernel: str | None = None, dtype: torch.dtype = torch.float32,
                   fetch: Callable[[str], torch.Tensor] | None = None, fuse: bool = True,
                   rows: Callable[[str], Any] | None = None, bits: int = 8) -> dict[str, int]:
    """Replace the model's linear layers (routers and small gates excepted) with `bits`-bit ones (8 or 4) and
    the token embedding with an 8-bit one, in place; biases become `dtype`. `fetch(name)` gives a parameter
    by its state-dict name (default: the module's own), so a loader can read each weight just before it is
    quantised. `fuse` makes each attention layer's q, k and v one matrix (`qkv`). `rows(name)`, where given,
    reads a weight of BLOCK_CODES or more a block of rows at a time (`.shape`, `.block(a, b)`, as
    offload.store.TensorRows), and each block is quantised and made into the backend's form in turn: a large
    matrix (lm_head) is then never held whole in float or as codes while it loads.

    Returns {"quantized": layers replaced, "bytes": bytes the replacements hold}.
    """
    if bits not in DENSE_BITS:
        raise ValueError(f"dense weights are held at {' or '.join(map(str, DENSE_BITS))} bits (got {bits})")
    backend = get_backend(kernel or fast_cpu_backend())
    out = {"quantized": 0, "bytes": 0}

    def get(qname: str, child: nn.Module, what: str) -> torch.Tensor:
        return (fetch(f"{qname}.{what}") if fetch else getattr(child, what)).detach()

    def view(w: torch.Tensor, group: int):
        q = quantize_rows(w, group, bits=bits)
        return QuantView((AffineTerm(q.codes, bits, q.scale.float(), q.minimum.float()),), bits, group)

    def linear(form, shape: tuple[int, int], bias: torch.Tensor | None) -> QuantLinear:
        bias = None if bias is None else bias.to(dtype)
        return QuantLinear(backend, form, shape[1], shape[0], bias, backend.form_nbytes(form))

    def blocks(src, group: int) -> Iterator:
        n, k = src.shape
        step = max(BLOCK_ROWS, BLOCK_CODES // k // BLOCK_ROWS * BLOCK_ROWS)
        for a in range(0, n, step):
            yield view(src.block(a, min(n, a + step)), group)

    for mname, m, group in list(fusable(model)) if fuse else ():
        parts = [(f"{mname}.{n}" if mname else n, getattr(m, n)) for n in FUSED]
        w = torch.cat([get(qn, p, "weight") for qn, p in parts])
        bias = None if parts[0][1].bias is None else torch.cat([get(qn, p, "bias") for qn, p in parts])
        m.qkv = linear(backend.prepare(view(w, group)), w.shape, bias)
        del w
        for n in FUSED:
            delattr(m, n)
        out["quantized"] += len(FUSED)
        out["bytes"] += m.qkv.nbytes
    for qname, parent, name, child, group in list(replaceable(model)):
        if isinstance(child, nn.Embedding):
            setattr(parent, name, QuantEmbedding(quantize_rows(get(qname, child, "weight"), group)))
        else:
            big = rows is not None and child.in_features * child.out_features >= BLOCK_CODES
            src = rows(f"{qname}.weight") if big else None
            form = backend.prepare_rows(blocks(src, group), src.shape[0]) if src is not None else \
                backend.prepare(view(get(qname, child, "weight"), group))
            bias = None if child.bias is None else get(qname, child, "bias")
            setattr(parent, name, linear(form, (child.out_features, child.in_features), bias))
        out["quantized"] += 1
        out["bytes"] += getattr(parent, name).nbytes
    return out
