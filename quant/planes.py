"""Bit-planes of 8-bit codes, most significant plane first, 8 codes per byte, first code in the high bit."""

from __future__ import annotations

import numpy as np
import torch

PLANES = 8


def plane_nbytes(numel: int) -> int:
    """Bytes of one bit-plane of `numel` codes."""
    if numel % 8:
        raise ValueError(f"bit-planes need a multiple of 8 codes, got {numel}")
    return numel // 8


def pack_planes(codes: torch.Tensor, planes: int = PLANES) -> torch.Tensor:
    """uint8 codes (any shape, numel % 8 == 0) -> [planes, numel/8] uint8; plane 0 holds bit 7."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if not 1 <= planes <= PLANES:
        raise ValueError(f"planes must be in 1..8, got {planes}")
    flat = codes.reshape(-1).numpy()
    plane_nbytes(flat.size)
    shifts = np.arange(7, 7 - planes, -1, dtype=np.uint8)[:, None]  # [planes, 1]
    bits = (flat[None, :] >> shifts) & 1  # [planes, numel]
    return torch.from_numpy(np.packbits(bits, axis=1, bitorder="big"))


def unpack_planes(planes: torch.Tensor | np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """The first r planes [r, numel/8] -> codes of r bits (the 8-bit code >> (8 - r)) of `shape`."""
    p = planes.numpy() if isinstance(planes, torch.Tensor) else np.asarray(planes)
    r = p.shape[0]
    numel = int(np.prod(shape)) if shape else 1
    if not 1 <= r <= PLANES or p.ndim != 2 or p.shape[1] != plane_nbytes(numel):
        raise ValueError(f"planes of shape {p.shape} do not hold codes of shape {tuple(shape)}")
    bits = np.unpackbits(p, axis=1, bitorder="big")  # [r, numel] of 0/1
    out = np.zeros(numel, dtype=np.uint8)
    for i in range(r):
        out |= bits[i] << np.uint8(r - 1 - i)
    return torch.from_numpy(out).reshape(shape)
