"""The CUDA backend: codes and params moved to the GPU, dequantised there, matmul in half precision."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quant.kernels.base import Backend
from quant.views import QuantView


class Cuda(Backend, name="cuda"):
    """Dequantise-then-matmul on an NVIDIA GPU (float16 weights and activations, float32 output)."""

    device = "cuda"

    def __init__(self, dtype: torch.dtype = torch.float16) -> None:
        self.dtype = dtype

    @classmethod
    def available(cls) -> bool:
        return torch.cuda.is_available()

    def prepare(self, view: QuantView) -> torch.Tensor:
        dev = torch.device("cuda")
        w = None
        for t in view.terms:  # the same arithmetic as QuantView.dequantize, on the device
            s = t.scale.to(dev).repeat_interleave(view.group, dim=1)
            z = t.zero.to(dev).repeat_interleave(view.group, dim=1)
            part = s * t.codes.to(dev).float() + z
            w = part if w is None else w + part
        return w.to(self.dtype)

    def linear(self, x: torch.Tensor, form: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(form.device, self.dtype), form).float()

    def ffn(self, x, e):
        return super().ffn(x, e).to(x.device)
