"""Normalisation layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quant import native


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 as the reference does."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype == w.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous() \
                and not torch.is_grad_enabled() and (lib := native.library()) is not None:
            out = torch.empty_like(x)  # one native call (quant/native.c), where torch takes three ops
            lib.moed_rms_norm(x.data_ptr(), w.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], self.eps,
                              out.data_ptr())
            return out
        # torch's fused rms_norm: one op where x * rsqrt(mean(x^2) + eps) took five
        return w * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)
