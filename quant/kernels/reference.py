"""The reference backend: dequantise each view to float32, then an ordinary matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quant.kernels.base import Backend
from quant.views import QuantView


class Reference(Backend, name="reference"):
    """Dequantise-then-matmul in float32; the yardstick the other backends are tested against."""

    def prepare(self, view: QuantView) -> torch.Tensor:
        return view.dequantize()  # [N, K] float32

    def linear(self, x: torch.Tensor, form: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), form)
