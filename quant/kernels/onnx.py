"""The onnxruntime backend: one session per expert built from com.microsoft MatMulNBits nodes.

Each term becomes a MatMulNBits node (2, 4 or 8 bits, block = group, default zero point 2^(bits-1),
weights as initializers so ORT prepacks them); the terms' per-group offsets are added as one matmul
of the group sums of x. accuracy_level 4 (the default) lets MLAS quantise activations to int8, which
is the fast path on CPUs; 0 keeps float32 activations (fast for 4 bits only).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from quant.kernels.base import Backend, PreparedExpert, activation
from quant.views import ExpertViews, QuantView

ORT_BITS = (2, 4, 8)
OPSET = 21
IR_VERSION = 10


@dataclass(frozen=True, slots=True)
class OrtExpert:
    """A session computing the whole expert FFN, and the bytes of its initializers."""

    session: Any
    nbytes: int


class OnnxRuntime(Backend, name="onnxruntime"):
    """MatMulNBits (MLAS) on the CPU."""

    def __init__(self, accuracy_level: int = 4, threads: int | None = None) -> None:
        self.accuracy_level = accuracy_level
        self.threads = threads or torch.get_num_threads()

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None

    def prepare_expert(self, views: ExpertViews, act: str) -> PreparedExpert:
        activation(act)
        import onnxruntime as ort
        from onnx import TensorProto, helper

        g = _Graph()
        x = "X"
        gate = g.linear(x, views.gate, self.accuracy_level, "gate")
        up = g.linear(x, views.up, self.accuracy_level, "up")
        h = g.act(gate, act)
        h = g.node("Mul", [h, up])
        y = g.linear(h, views.down, self.accuracy_level, "down")
        d = views.gate.shape[1]
        graph = helper.make_graph(
            g.nodes, "expert", [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["T", d])],
            [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["T", views.down.shape[0]])], g.inits)
        model = helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[
            helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads must not steal torch's
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        form = OrtExpert(sess, g.nbytes)
        return PreparedExpert((form,), act, views.bits, g.nbytes)

    def ffn(self, x: torch.Tensor, e: PreparedExpert) -> torch.Tensor:
        out = e.forms[0].session.run(None, {"X": x.detach().float().contiguous().numpy()})[0]
        return torch.from_numpy(out)

    def prepare(self, view: QuantView) -> Any:
        raise NotImplementedError("the onnxruntime backend prepares whole experts (prepare_expert)")

    def linear(self, x: torch.Tensor, form: Any) -> torch.Tensor:
        raise NotImplementedError("the onnxruntime backend runs whole experts (ffn)")


class _Graph:
    """Accumulates nodes and initializers of one expert's graph."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: list = []
        self.nbytes = 0
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, hint: str, a: np.ndarray) -> str:
        from onnx import numpy_helper
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(a), name))
        self.nbytes += a.nbytes
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

    def linear(self, x: str, view: QuantView, accuracy_level: int, hint: str) -> str:
        n, k = view.shape
        group = view.group
        outs, offset = [], np.zeros((n, k // group), dtype=np.float32)
        for t in view.terms:
            bits = next(b for b in ORT_BITS if b >= t.bits)
            scale = t.scale.numpy().astype(np.float32)
            mid = 1 << (t.bits - 1)  # zero point at the middle of the codes keeps int8 activations accurate
            offset += t.zero.numpy() + scale * mid
            zp = _pack(np.full((n, k // group), mid, dtype=np.uint8), bits, 1, pad=True)
            outs.append(self.node("MatMulNBits", [x, self.const(f"{hint}_q", _pack(t.codes.numpy(), bits, group)),
                                                  self.const(f"{hint}_s", scale), self.const(f"{hint}_zp", zp)],
                                  domain="com.microsoft", K=k, N=n, bits=bits, block_size=group,
                                  accuracy_level=accuracy_level))
        shape = self.const(f"{hint}_shape", np.array([-1, k // group, group], dtype=np.int64))
        axes = self.const(f"{hint}_axes", np.array([-1], dtype=np.int64))
        sums = self.node("ReduceSum", [self.node("Reshape", [x, shape]), axes], keepdims=0)  # [T, K/G]
        outs.append(self.node("MatMul", [sums, self.const(f"{hint}_off", offset.T)]))
        y = outs[0]
        for o in outs[1:]:
            y = self.node("Add", [y, o])
        return y


def _pack(codes: np.ndarray, bits: int, group: int, pad: bool = False) -> np.ndarray:
    """[N, K] codes -> MatMulNBits' B [N, K/G, G*bits/8] (or zero points [N, ceil(K*bits/8)] with pad),
    codes packed low bits first."""
    n, k = codes.shape
    per = 8 // bits
    if pad:  # zero points: one row of blocks per output, padded to whole bytes
        codes = np.pad(codes, ((0, 0), (0, -k % per)))
        return _pack(codes, bits, per)[:, :, 0]
    q = codes.reshape(n, k // group, group * bits // 8, per).astype(np.uint8)
    out = np.zeros(q.shape[:-1], dtype=np.uint8)
    for i in range(per):
        out |= q[..., i] << np.uint8(i * bits)
    return out
