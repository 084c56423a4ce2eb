"""Per-group asymmetric min-max quantisation along the input dimension of a [N, K] matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP = 128
PARAM_DTYPE = torch.float16  # scales and minimums as stored
FP16_MAX = 65504.0


@dataclass(frozen=True, slots=True)
class GroupCodes:
    """Codes of a [N, K] matrix at `bits` bits with one scale and minimum per group of `group` along K."""

    codes: torch.Tensor  # [N, K] uint8 in [0, 2**bits)
    scale: torch.Tensor  # [N, K/G] PARAM_DTYPE
    minimum: torch.Tensor  # [N, K/G] PARAM_DTYPE
    bits: int
    group: int

    def dequantize(self) -> torch.Tensor:
        """The float32 matrix these codes stand for: scale * q + minimum."""
        return dequantize(self.codes, self.scale, self.minimum, self.group)


def check_group(k: int, group: int) -> None:
    """Raise ValueError unless `group` is a supported size dividing the row length `k`."""
    if group not in GROUP_SIZES:
        raise ValueError(f"group size {group} is not supported (choose one of {', '.join(map(str, GROUP_SIZES))})")
    if k % group:
        raise ValueError(f"rows of length {k} do not split into groups of {group}")


def grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """[N, K] -> [N, K/G, G] view, after checking the group size."""
    if w.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(w.shape)}")
    check_group(w.shape[1], group)
    return w.reshape(w.shape[0], w.shape[1] // group, group)


def expand(p: torch.Tensor, group: int) -> torch.Tensor:
    """Per-group params [N, K/G] -> float32 [N, K] (each repeated `group` times)."""
    return p.float().repeat_interleave(group, dim=1)


def quantize(w: torch.Tensor, bits: int, group: int = DEFAULT_GROUP,
             param_dtype: torch.dtype = PARAM_DTYPE) -> GroupCodes:
    """Min-max round each group to `bits` bits; codes are chosen against the params as stored."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    g = grouped(w.float(), group)  # [N, K/G, G]
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # [N, K/G]; NaN and infinities show up here
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("weights contain NaN or infinity")
    if param_dtype == torch.float16 and max(hi.abs().max().item(), lo.abs().max().item()) > FP16_MAX:
        raise ValueError("weights exceed the float16 range of the stored scales and minimums")
    levels = (1 << bits) - 1
    minimum = lo.to(param_dtype)
    scale = ((hi - minimum.float()) / levels).to(param_dtype)
    s = scale.float()
    inv = torch.where(s > 0, 1 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))  # 0: constant group
    q = (g - minimum.float()[..., None]).mul_(inv[..., None]).round_()
    codes = q.clamp_(0, levels).to(torch.uint8).reshape(w.shape)
    return GroupCodes(codes, scale, minimum, bits, group)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group: int) -> torch.Tensor:
    """scale * q + minimum per group, in float32 ([N, K])."""
    return expand(scale, group) * codes.float() + expand(minimum, group)


def minmax_roundtrip(w: torch.Tensor, bits: int, group: int = DEFAULT_GROUP) -> torch.Tensor:
    """Direct min-max rounding at `bits` bits with float32 params: the baseline views are judged against."""
    return quantize(w, bits, group, param_dtype=torch.float32).dequantize()
