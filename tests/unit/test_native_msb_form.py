"""The native backend's form of an MSB expert made straight from its stored bytes (prepare_msb, one C call a
matrix) is the views' form (prepare_expert) byte for byte, at every bit-width; the store takes that path for
MSB stores only, and bad parameters fail as they do on the views' path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from daemon.convert import convert
from offload.store import Store
from quant.kernels import get_backend
from quant.kernels.base import MsbMatrix
from quant.schemes import MSB
from quant.views import ExpertViews

pytestmark = pytest.mark.skipif(not get_backend("native").available(), reason="no native library here")


def encoded(n: int, k: int, group: int, seed: int, scale: float = 1.0):
    """An MSB encoding of a random [n, k] matrix, its head and planes as contiguous arrays (kept alive)."""
    g = torch.Generator().manual_seed(seed)
    w = scale * torch.randn(n, k, generator=g) + torch.randn(n, 1, generator=g)  # rows off centre too
    enc = MSB().encode(w, group)
    head = np.ascontiguousarray(enc.head.numpy())
    planes = [np.ascontiguousarray(p.numpy() if isinstance(p, torch.Tensor) else p) for p in enc.planes]
    return enc, head, planes


def by_address(enc, head, planes) -> MsbMatrix:
    n, k = enc.shape
    return MsbMatrix(n, k, enc.group, head.ctypes.data, tuple(p.ctypes.data for p in planes))


# (d, f): gate/up are [f, d], down [d, f] (both a multiple of the group: quant.groups.GROUP_SIZES)
@pytest.mark.parametrize("d,f,group", [(64, 96, 32), (96, 32, 32), (128, 64, 64), (256, 128, 128)])
@pytest.mark.parametrize("bits", range(1, 9))
def test_form_from_bytes_is_the_views_form_byte_for_byte(d, f, group, bits):
    be = get_backend("native")
    mats = [encoded(f, d, group, 1), encoded(f, d, group, 2), encoded(d, f, group, 3)]
    views = ExpertViews(*(MSB().view(e, bits, packed=True) for e, _, _ in mats))
    want = be.prepare_expert(views, "silu")
    got = be.prepare_msb([by_address(*m) for m in mats], bits, "silu")
    assert got.bits == want.bits == bits and got.nbytes == want.nbytes
    assert got.slab.nbytes == want.slab.nbytes and np.array_equal(got.slab, want.slab)
    for a, b in zip(got.forms, want.forms):
        assert (a.n, a.k, a.group) == (b.n, b.k, b.group)
        for ta, tb in zip(a.terms, b.terms):
            for x, y in ((ta.codes, tb.codes), (ta.scale, tb.scale), (ta.offset, tb.offset), (ta.sums, tb.sums)):
                assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
    x = torch.randn(3, d)
    assert torch.equal(be.ffn(x, got), be.ffn(x, want))


def test_a_group_of_negative_zeros_gets_the_views_positive_zero_offset():
    be = get_backend("native")
    enc, head, planes = encoded(32, 64, 32, 5)
    enc.head[0, 2, 0], enc.head[1, 2, 0] = -0.0, -0.0  # scale -0 and minimum -0: offset -0 + -0 * 128 = -0
    head[...] = enc.head.numpy()
    for bits in (1, 4, 8):
        want = be.prepare_expert(ExpertViews(*[MSB().view(enc, bits, packed=True)] * 3), "silu")
        got = be.prepare_msb([by_address(enc, head, planes)] * 3, bits, "silu")
        assert want.forms[0].terms[0].offset[0, 0, 2].view(np.uint16) == 0  # +0: the views add their sum to 0
        assert np.array_equal(got.slab, want.slab)


def test_a_scale_beyond_float16_fails_as_on_the_views_path():
    be = get_backend("native")
    enc, head, planes = encoded(32, 64, 32, 4)
    # a group of scale 400 from 0: its offset at 8 bits 400 * 128 = 51200 fits a float16, at 1 bit
    # 400 * 63.5 + 400 * 128 * 1 = 76600 does not (both paths read the head the same: the encoding's own)
    enc.head[0, 5, 1], enc.head[1, 5, 1] = 400.0, 0.0
    head[...] = enc.head.numpy()
    mats = [by_address(enc, head, planes)] * 3
    views = ExpertViews(*[MSB().view(enc, 1, packed=True)] * 3)
    with pytest.raises(ValueError, match="float16 range"):
        be.prepare_expert(views, "silu")
    with pytest.raises(ValueError, match="float16 range"):
        be.prepare_msb(mats, 1, "silu")
    assert be.prepare_msb(mats, 8, "silu").bits == 8  # at 8 bits the same scale fits
    with pytest.raises(ValueError, match="no 4-bit native form"):
        be.prepare_msb([MsbMatrix(32, 64, 32, head.ctypes.data, tuple(p.ctypes.data for p in planes[:3]))] * 3,
                       4, "silu")


@pytest.mark.parametrize("name", ["msb", "residual"])
def test_the_store_forms_msb_experts_from_their_bytes_only(name, tiny_model, tmp_path, monkeypatch):
    store = Store(convert(tiny_model("qwen3_moe"), tmp_path / name, group_size=32, scheme=name))
    be = get_backend("native")
    calls = []
    fast = be.prepare_msb
    monkeypatch.setattr(be, "prepare_msb", lambda *a: calls.append(a[1]) or fast(*a), raising=False)
    layer = store.layers[-1]
    for bits in (2, 5, 8):
        sections = store.read_expert(layer, 1, bits)
        got = store.form(be, sections, bits, "silu")
        want = be.prepare_expert(store.views(sections, bits, True), "silu")
        assert np.array_equal(got.slab, want.slab)
    assert calls == ([2, 5, 8] if name == "msb" else [])
    if name == "residual":
        with pytest.raises(ValueError, match="not msb"):
            store.msb_matrices(sections, 8)


def test_plain_c_form_from_bytes_is_the_vector_one(tmp_path):
    """moed_form_msb built without AVX2 or F16C (its float16 reads and writes in plain C) makes the same bytes,
    with heads from float16 subnormals to hundreds, signed zeros among them."""
    import ctypes

    from quant import native
    lib = native.library()
    if not lib.moed_simd():
        pytest.skip("needs the native library built with a vector path to compare against")
    plain = native.bind(ctypes.CDLL(str(native.build(tmp_path, extra=("-mno-avx2", "-mno-avx512vnni",
                                                                          "-mno-f16c")))))
    n, k, group = 64, 128, 32
    rng = np.random.default_rng(6)
    head = (rng.standard_normal((2, n, k // group)) * 4.0 ** rng.integers(-9, 4, (2, n, k // group)))
    head = head.astype(np.float16)
    head[0, :3, 0], head[1, :3, 0] = [0.0, -0.0, 2.0 ** -24], [-0.0, 0.0, -(2.0 ** -20)]
    planes = [rng.integers(0, 256, n * k // 8, dtype=np.uint8) for _ in range(8)]
    ptrs = (ctypes.c_void_p * 8)(*(p.ctypes.data for p in planes))
    for bits in range(1, 9):
        outs = []
        for impl in (lib, plain):
            codes = np.full(n * k // (2 if bits <= 4 else 1), 7, np.uint8)
            sums, s, z = (np.full(n * (k // group), 7, t) for t in (np.int16, np.uint16, np.uint16))
            rc = impl.moed_form_msb(head.ctypes.data, ptrs, bits, n, k, group, codes.ctypes.data, sums.ctypes.data,
                                    s.ctypes.data, z.ctypes.data, 1)
            outs.append((rc, codes, sums, s, z))
        assert outs[0][0] == outs[1][0] == 0
        for a, b in zip(outs[0][1:], outs[1][1:]):
            assert np.array_equal(a, b), bits
