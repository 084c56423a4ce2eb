"""Bit-planes of 8-bit codes, most significant plane first, 8 codes per byte, first code in the high bit.

Packing and unpacking are bit-matrix transposes. Unpacking, on every expert read from flash, runs in
quant/native.c where that could be built (5x faster), else in numpy like packing. In numpy they work on
little-endian uint64 words. Row k of an [8, W] array holds plane k (r planes to unpack go in rows
8 - r..7), so column w holds the planes of codes 64w..64w+63. Name a bit of a column (row, byte, bit), 3
bits each, byte and bit counted in the word's value: the bit at (k, b, q) is bit 7 - k of code 8b + 7 - q,
which belongs at (b, 7 - q, 7 - k) once word b holds codes 8b..8b+7 as bytes. Two field swaps of three
delta swaps (mask, shift, xor) each make that rotation, and one [8, W] -> [W, 8] copy puts the words in
order.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from quant import native

PLANES = 8

_WORD = np.dtype("<u8")  # explicit byte order: byte j of a word is value bits 8j..8j+7 on any host
_ONES = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


def _mask(keep) -> np.uint64:
    return np.uint64(sum(1 << p for p in range(64) if keep(p)))


# Delta swaps of index bit i of two fields, as (row distance d, shift, mask) for rows a and a + d, a & d == 0.
# row <-> bit, complemented: bits of row a at mask <-> bits of row a + d at mask << shift.
_ROW_BIT = [(1 << i, np.uint64(1 << i), _mask(lambda p, i=i: not p >> i & 1)) for i in range(3)]
# row <-> byte: bits of row a at mask << shift <-> bits of row a + d at mask.
_ROW_BYTE = [(1 << i, np.uint64(8 << i), _mask(lambda p, i=i: not p >> 3 + i & 1)) for i in range(3)]
# byte <-> bit within each word, complemented, as (shift, mask): bits at mask <-> bits at mask << shift.
_BYTE_BIT = [(np.uint64(9 << i), _mask(lambda p, i=i: not p >> i & 1 and not p >> 3 + i & 1)) for i in range(3)]


_LOCAL = threading.local()


def _scratch(w: int) -> tuple[np.ndarray, np.ndarray]:
    """This thread's work arrays [8, w] and [4, w] of words, reused across calls: unpacking runs on every
    expert read from flash, and fresh multi-MB arrays each time would cost a page fault per 4 KiB."""
    have = getattr(_LOCAL, "words", None)
    if have is None or have.size < PLANES * w + PLANES // 2 * w:
        have = _LOCAL.words = np.empty(PLANES * w + PLANES // 2 * w, dtype=_WORD)
    x = have[:PLANES * w].reshape(PLANES, w)
    tmp = have[PLANES * w:PLANES * w + PLANES // 2 * w].reshape(PLANES // 2, w).view(np.uint64)
    return x, tmp


def plane_nbytes(numel: int) -> int:
    """Bytes of one bit-plane of `numel` codes."""
    if numel % 8:
        raise ValueError(f"bit-planes need a multiple of 8 codes, got {numel}")
    return numel // 8


def _rows_swap(x: np.ndarray, tmp: np.ndarray, z: int, d: int, s: np.uint64, m: np.uint64, complement: bool) -> int:
    """One swap of a row bit (a table entry d, s, m) over x [8, W] whose rows below z stand for zeros: never
    read, only written where paired with a live row (complemented swaps only). z % d == 0 holds for a
    table's swaps in order from any z. Returns the new z."""
    start = z
    if z % (2 * d):  # rows z - d .. z - 1 are zero, their partners z .. z + d - 1 live
        assert complement
        a, b = x[z - d:z], x[z:z + d]
        np.right_shift(b, s, out=a)
        a &= m
        b &= _ONES ^ (m << s)
        start, z = z + d, z - d
    n = (x.shape[0] - start) // (2 * d)
    if n:
        y = x[start:].reshape(n, 2, d, x.shape[1])
        a, b, t = y[:, 0], y[:, 1], tmp[:n * d].reshape(n, d, x.shape[1])
        src, dst = (b, a) if complement else (a, b)  # bits of src at m << s <-> bits of dst at m
        _delta_swap(src, dst, t, s, m)
    return z


def _words_swap(x: np.ndarray, tmp: np.ndarray, s: np.uint64, m: np.uint64) -> None:
    """One complemented swap within every word of x: bits at m <-> bits at m << s."""
    _delta_swap(x, x, tmp[:x.shape[0]], s, m)


def _delta_swap(src: np.ndarray, dst: np.ndarray, t: np.ndarray, s: np.uint64, m: np.uint64) -> None:
    """Swap the bits of src at m << s with the bits of dst at m, in place (t: scratch of their shape)."""
    np.right_shift(src, s, out=t)
    t ^= dst
    t &= m
    dst ^= t
    t <<= s
    src ^= t


def pack_planes(codes: torch.Tensor, planes: int = PLANES) -> torch.Tensor:
    """uint8 codes (any shape, numel % 8 == 0) -> [planes, numel/8] uint8; plane 0 holds bit 7."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if not 1 <= planes <= PLANES:
        raise ValueError(f"planes must be in 1..8, got {planes}")
    flat = codes.reshape(-1).numpy()
    nbytes = plane_nbytes(flat.size)
    w = -(-nbytes // 8)
    if flat.size != 64 * w:
        flat = np.concatenate([flat, np.zeros(64 * w - flat.size, dtype=np.uint8)])
    x = np.empty((PLANES, w), dtype=_WORD)
    x[...] = flat.view(_WORD).reshape(w, PLANES).T
    tmp = np.empty((PLANES // 2, w), dtype=np.uint64)
    for d, s, m in _ROW_BYTE:  # the swaps of unpack_planes in reverse; each is its own inverse
        _rows_swap(x, tmp, 0, d, s, m, False)
    for d, s, m in _ROW_BIT:
        _rows_swap(x, tmp, 0, d, s, m, True)
    return torch.from_numpy(np.ascontiguousarray(x.view(np.uint8)[:planes, :nbytes]))


def unpack_planes(planes: torch.Tensor | np.ndarray | Sequence, shape: tuple[int, ...]) -> torch.Tensor:
    """The first r planes ([r, numel/8], or r arrays of numel/8) -> codes of r bits (the 8-bit code >> (8 - r))
    of `shape`."""
    rows = [x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in planes]
    r = len(rows)
    numel = int(np.prod(shape)) if shape else 1
    nbytes = plane_nbytes(numel)
    if not 1 <= r <= PLANES or any(x.shape != (nbytes,) for x in rows):
        raise ValueError(f"planes of shape {[x.shape for x in rows]} do not hold codes of shape {tuple(shape)}")
    if (bad := next((x.dtype for x in rows if x.dtype != np.uint8), None)) is not None:
        raise TypeError(f"planes must be uint8, got {bad}")
    if r == 1:
        return torch.from_numpy(np.unpackbits(rows[0], bitorder="big")).reshape(shape)
    out = np.empty(numel, dtype=np.uint8)
    if native.unpack_planes([np.ascontiguousarray(x) for x in rows], out):  # quant/native.c where it is built
        return torch.from_numpy(out).reshape(shape)
    w = -(-nbytes // 8)
    x, tmp = _scratch(w)  # plane i in row 8 - r + i: the r-bit code's bit r-1-i is bit 7-row
    z = PLANES - r  # rows below z stand for zeros (left unset)
    xb = x.view(np.uint8)
    for i, row in enumerate(rows):
        xb[z + i, :nbytes] = row
    xb[z:, nbytes:] = 0
    if r > 4:  # (row, byte, bit) -> (~bit, byte, ~row) -> (byte, ~bit, ~row)
        for d, s, m in _ROW_BIT:
            z = _rows_swap(x, tmp, z, d, s, m, True)
        for d, s, m in _ROW_BYTE:
            _rows_swap(x, tmp, 0, d, s, m, False)
    else:  # (row, byte, bit) -> (row, ~bit, ~byte) -> (byte, ~bit, ~row): fewer live rows to work on first
        for s, m in _BYTE_BIT:
            _words_swap(x[z:], tmp, s, m)
        for d, s, m in _ROW_BIT:
            z = _rows_swap(x, tmp, z, d, s, m, True)
    out = np.empty((w, PLANES), dtype=_WORD)
    out[...] = x.T
    return torch.from_numpy(out.view(np.uint8).reshape(-1)[:numel]).reshape(shape)


@dataclass(frozen=True, slots=True)
class PackedCodes:
    """Codes of `shape` left as their first r bit-planes (r arrays of numel/8 bytes, most significant first), as
    unpack_planes takes them: a kernel that reads planes itself (Backend.reads_planes) makes its form from them
    without an array of all the codes in between."""

    planes: tuple[np.ndarray, ...]
    shape: tuple[int, int]
