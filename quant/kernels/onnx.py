"""The onnxruntime backend: one session per expert (or dense matrix) built from com.microsoft MatMulNBits nodes.

Each term of b bits becomes a MatMulNBits node (2, 4 or 8 bits, block = group, zero point 2^(b-1), the
middle of its codes); the terms' per-group offsets are added as one matmul of the group sums of x.
accuracy_level 4 (the default) lets MLAS quantise activations to int8, which is the fast path on CPUs;
0 keeps float32 activations (fast for 4 bits only).

Preparing an expert is on the cache-miss path, so it skips protobuf for the weights: the graph (nodes,
shapes, zero points) is serialised once per expert signature, with B, scales and offsets declared as
external data that each session receives from numpy through `SessionOptions.add_external_initializers`
(they are still initializers, so ORT prepacks them; as graph inputs the FFN runs ~30x slower). ORT
copies them into its own buffers and frees those once MatMulNBits/MatMul have prepacked them: the
session holds only the packed weights and keeps no reference to the views (`_held_nbytes` counts it).
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from quant.kernels.base import PooledBackend, PreparedExpert, activation
from quant.views import AffineTerm, ExpertViews, QuantView

ORT_BITS = (2, 4, 8)
OPSET = 21
IR_VERSION = 10
SESSION_BYTES = 256 << 10  # a session's graph, kernels and thread pool
PACKED_GROUP_BYTES_INT8, PACKED_GROUP_BYTES_FP32 = 9, 2  # what MLAS's packed B adds per group over B and scales
SPLIT_ROWS = 256  # a dense matrix is split over the workers in blocks of at least this many rows
SPLIT_BYTES = 16 << 20  # ... and of at most about this many codes
EXTERNAL = "moed-expert-weights"  # external-data location of per-expert initializers: never read, always supplied


@dataclass(frozen=True, slots=True)
class OrtExpert:
    """A session computing a whole expert FFN (or one matrix), and the bytes it holds."""

    session: Any
    nbytes: int


@dataclass(frozen=True, slots=True)
class OrtMatrix:
    """A dense matrix as sessions over blocks of its rows, run side by side; the bytes they hold."""

    parts: tuple[OrtExpert, ...]
    nbytes: int


class OnnxRuntime(PooledBackend, name="onnxruntime"):
    """MatMulNBits (MLAS) on the CPU: single-threaded sessions, run side by side on `threads` workers.

    One thread per session, with callers running independent sessions at the same time (experts of a
    layer, row blocks of a matrix), moves weights from memory faster than one session on all threads:
    no thread-pool wake-ups per call, and each core streams its own weights (measured on 48
    OLMoE-shaped experts, 2 cores: 0.25 ms per expert side by side vs 0.47 ms on a 2-thread pool).
    """

    def __init__(self, accuracy_level: int = 4, threads: int | None = None) -> None:
        super().__init__(threads)
        self.accuracy_level = accuracy_level

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None

    def prepare_expert(self, views: ExpertViews, act: str) -> PreparedExpert:
        activation(act)
        mats = (views.gate, views.up, views.down)
        form = self._session(_skeleton(tuple(_signature(v) for v in mats), act, self.accuracy_level), mats)
        return PreparedExpert((form,), act, views.bits, form.nbytes)

    def ffn(self, x: torch.Tensor, e: PreparedExpert) -> torch.Tensor:
        return self.linear(x, e.forms[0])

    def prepare(self, view: QuantView) -> OrtMatrix:
        """One matrix (dense layers; experts use prepare_expert) as sessions over `threads` blocks of
        rows, each block at least SPLIT_ROWS rows, and more blocks for a large matrix (at most
        SPLIT_BYTES of codes each: ORT copies a session's weights while it packs them, so smaller
        sessions keep a large lm_head's load from holding it three times at once)."""
        n, k = view.shape
        blocks = max(1, min(self.threads, n // SPLIT_ROWS), min(n // SPLIT_ROWS, -(-n * k // SPLIT_BYTES)))
        if blocks > self.threads:  # a whole number of blocks per worker (linear deals them out evenly)
            blocks = min(n // SPLIT_ROWS, -(-blocks // self.threads) * self.threads)
        edges = [n * i // blocks for i in range(blocks + 1)]
        return self._matrix(_rows(view, a, b) for a, b in zip(edges, edges[1:]))

    def prepare_rows(self, blocks: Iterable[QuantView], n: int) -> OrtMatrix:
        """A matrix from blocks of its rows: a session per block, each made as its block arrives (or
        prepare's split of a single block)."""
        it = iter(blocks)
        first, second = next(it), next(it, None)
        if second is None:
            return self.prepare(first)
        return self._matrix(itertools.chain((first, second), it))

    def _matrix(self, blocks: Iterable[QuantView]) -> OrtMatrix:
        """A session per block of rows, each made as its block arrives."""
        parts = tuple(self._session(_skeleton((_signature(v),), None, self.accuracy_level), (v,)) for v in blocks)
        return OrtMatrix(parts, sum(p.nbytes for p in parts))

    def linear(self, x: torch.Tensor, form: OrtExpert | OrtMatrix) -> torch.Tensor:
        feed = {"X": x.detach().float().contiguous().numpy()}
        if isinstance(form, OrtExpert):
            return torch.from_numpy(form.session.run(None, feed)[0])
        if len(form.parts) == 1:
            return torch.from_numpy(form.parts[0].session.run(None, feed)[0])
        return torch.from_numpy(np.concatenate(self.split(lambda p: p.session.run(None, feed)[0], form.parts), axis=1))

    def form_nbytes(self, form: OrtExpert | OrtMatrix) -> int:
        return form.nbytes

    def _session(self, skeleton: tuple[bytes, tuple[str, ...]], mats: tuple[QuantView, ...]) -> OrtExpert:
        """A session of a cached graph with these matrices' weights as its external initializers."""
        import onnxruntime as ort

        model, names = skeleton
        arrays = [a for v in mats for a in _weights(v)]
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1  # callers run sessions side by side (see the class)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.enable_cpu_mem_arena = False  # an arena per session would keep each expert's largest batch's buffers
        # the graph is already as ORT would make it: its optimisers only cost time on the cache-miss path (an
        # OLMoE-shaped expert's session: 11-13 vs 15 ms at 8 bits, 7.5-8.6 vs 8.6-9.4 ms at 4; runs as fast)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.add_external_initializers(list(names), [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        return OrtExpert(sess, _held_nbytes(mats, arrays, self.accuracy_level))


def _rows(view: QuantView, a: int, b: int) -> QuantView:
    """Rows a..b-1 of a matrix's view."""
    if (a, b) == (0, view.shape[0]):
        return view
    return QuantView(tuple(AffineTerm(t.codes[a:b], t.bits, t.scale[a:b], t.zero[a:b]) for t in view.terms),
                     view.bits, view.group)


def _signature(view: QuantView) -> tuple:
    """What a matrix's part of the graph depends on: (N, K), group and the terms' bit-widths."""
    return view.shape, view.group, tuple(t.bits for t in view.terms)


def _container(bits: int) -> int:
    """The MatMulNBits width holding `bits`-bit codes."""
    return next(b for b in ORT_BITS if b >= bits)


def _weights(view: QuantView) -> list[np.ndarray]:
    """A matrix's per-expert initializers, in the order `_Graph.linear` declares them:
    B and scales per term, then the summed offsets [K/G, N]."""
    n, k = view.shape
    out, offset = [], np.zeros((n, k // view.group), dtype=np.float32)
    for t in view.terms:
        scale = np.ascontiguousarray(t.scale.numpy(), dtype=np.float32)
        offset += t.zero.numpy() + scale * (1 << (t.bits - 1))
        out += [_pack(t.codes.numpy(), _container(t.bits), view.group), scale]
    out.append(np.ascontiguousarray(offset.T))
    return out


def _held_nbytes(mats: tuple[QuantView, ...], arrays: list[np.ndarray], accuracy_level: int) -> int:
    """What a session holds once ORT has prepacked (and dropped its copies of) the initializers: about
    their size, plus what the packed B adds per group (int8 path: scales again and a block sum), plus the
    session's own structures. Constants from RSS growth over 40 prepared OLMoE-shaped experts (ORT 1.32)."""
    groups = sum(v.shape[0] * v.shape[1] // v.group * len(v.terms) for v in mats)
    per_group = PACKED_GROUP_BYTES_INT8 if accuracy_level == 4 else PACKED_GROUP_BYTES_FP32
    return sum(a.nbytes for a in arrays) + groups * per_group + SESSION_BYTES


@lru_cache(maxsize=64)
def _skeleton(mats: tuple, act: str | None, accuracy_level: int) -> tuple[bytes, tuple[str, ...]]:
    """The serialised graph for matrices of these signatures, and the names of its external initializers
    (in `_weights` order, matrix by matrix): an expert FFN for (gate, up, down) and an activation, else
    one linear layer."""
    from onnx import TensorProto, helper

    g = _Graph()
    x = "X"
    if act is None:
        y = g.linear(x, *mats[0], accuracy_level, "w")
    else:
        gate = g.linear(x, *mats[0], accuracy_level, "gate")
        up = g.linear(x, *mats[1], accuracy_level, "up")
        h = g.act(gate, act)
        h = g.node("Mul", [h, up])
        y = g.linear(h, *mats[2], accuracy_level, "down")
    (d_out, _), (_, d_in) = mats[-1][0], mats[0][0]
    graph = helper.make_graph(
        g.nodes, "expert", [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["T", d_in])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["T", d_out])], g.inits)
    model = helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[
        helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString(), tuple(g.external)


class _Graph:
    """Accumulates nodes, constant initializers and external (per-expert) initializers of an expert's graph."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: list = []
        self.external: list[str] = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, hint: str, a: np.ndarray) -> str:
        from onnx import numpy_helper
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(a), name))
        return name

    def param(self, hint: str, dtype: np.dtype, shape: tuple[int, ...]) -> str:
        """An initializer declared as external data, supplied per session."""
        from onnx import TensorProto, helper
        name = self.name(hint)
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), dims=shape,
                        data_location=TensorProto.EXTERNAL)
        t.external_data.add(key="location", value=EXTERNAL)
        self.inits.append(t)
        self.external.append(name)
        return name

    def node(self, op: str, inputs: list[str], domain: str = "", **attrs) -> str:
        from onnx import helper
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], domain=domain or None, **attrs))
        return out

    def act(self, x: str, act: str) -> str:
        if act in ("silu", "swish"):
            return self.node("Mul", [x, self.node("Sigmoid", [x])])
        if act == "gelu":
            return self.node("Gelu", [x])
        if act == "relu":
            return self.node("Relu", [x])
        raise ValueError(f"unsupported activation {act!r}")

    def linear(self, x: str, shape: tuple[int, int], group: int, term_bits: tuple[int, ...], accuracy_level: int,
               hint: str) -> str:
        n, k = shape
        outs = []
        for tb in term_bits:
            bits = _container(tb)
            mid = 1 << (tb - 1)  # zero point at the middle of the codes keeps int8 activations accurate
            zp = _pack(np.full((n, k // group), mid, dtype=np.uint8), bits, 1, pad=True)
            q = self.param(f"{hint}_q", np.uint8, (n, k // group, group * bits // 8))
            s = self.param(f"{hint}_s", np.float32, (n, k // group))
            outs.append(self.node("MatMulNBits", [x, q, s, self.const(f"{hint}_zp", zp)], domain="com.microsoft",
                                  K=k, N=n, bits=bits, block_size=group, accuracy_level=accuracy_level))
        shape_ = self.const(f"{hint}_shape", np.array([-1, k // group, group], dtype=np.int64))
        axes = self.const(f"{hint}_axes", np.array([-1], dtype=np.int64))
        sums = self.node("ReduceSum", [self.node("Reshape", [x, shape_]), axes], keepdims=0)  # [T, K/G]
        outs.append(self.node("MatMul", [sums, self.param(f"{hint}_off", np.float32, (k // group, n))]))
        y = outs[0]
        for o in outs[1:]:
            y = self.node("Add", [y, o])
        return y


def _pack(codes: np.ndarray, bits: int, group: int, pad: bool = False) -> np.ndarray:
    """[N, K] codes -> MatMulNBits' B [N, K/G, G*bits/8] (or zero points [N, ceil(K*bits/8)] with pad),
    codes packed low bits first. At 8 bits B is the codes themselves (no copy if contiguous uint8)."""
    n, k = codes.shape
    per = 8 // bits
    if pad:  # zero points: one row of blocks per output, padded to whole bytes
        codes = np.pad(codes, ((0, 0), (0, -k % per)))
        return _pack(codes, bits, per)[:, :, 0]
    q = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    width = bits
    while width < 8:  # neighbouring bytes (a, b) -> a | b << width, read as one little-endian uint16
        pairs = q.view("<u2")
        q = (pairs | (pairs >> (8 - width))).astype(np.uint8)
        width *= 2
    return q.reshape(n, k // group, group * bits // 8)
