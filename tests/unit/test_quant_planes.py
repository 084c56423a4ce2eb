"""Bit-planes and r-bit views: bit-exact properties over random shapes, group sizes and codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant.groups import GROUP_SIZES, dequantize, quantize
from quant.planes import pack_planes, unpack_planes
from quant.schemes import scheme
from quant.views import msb_view

pytestmark = pytest.mark.cpu


@st.composite
def matrices(draw) -> tuple[torch.Tensor, int]:
    """A random float [N, K] matrix whose rows split into groups of a supported size."""
    group = draw(st.sampled_from(GROUP_SIZES))
    n = draw(st.integers(1, 12))
    k = group * draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["normal", "laplace", "t3", "constant", "tiny"]))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if kind == "laplace":
        w = torch.sign(w) * torch.empty(n, k).exponential_(generator=g)
    elif kind == "t3":
        w = w / torch.sqrt((torch.randn(3, n, k, generator=g) ** 2).sum(dim=0) / 3)
    elif kind == "constant":
        w = torch.full((n, k), float(w[0, 0]))
    elif kind == "tiny":
        w = w * 1e-6
    return w, group


@st.composite
def codes(draw) -> torch.Tensor:
    """Random uint8 codes of a random shape whose size is a multiple of 8."""
    shape = draw(st.sampled_from([(8,), (3, 16), (5, 32), (2, 3, 64), (1, 8)]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=shape, dtype=np.uint8))


@settings(max_examples=200, deadline=None)
@given(codes())
def test_pack_unpack_is_bit_exact(q):
    planes = pack_planes(q)
    assert planes.shape == (8, q.numel() // 8) and planes.dtype == torch.uint8
    assert torch.equal(unpack_planes(planes, tuple(q.shape)), q)


@settings(max_examples=200, deadline=None)
@given(codes(), st.integers(1, 8))
def test_first_r_planes_are_the_top_r_bits(q, r):
    planes = pack_planes(q)
    assert torch.equal(unpack_planes(planes[:r], tuple(q.shape)), q >> (8 - r))


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 300), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_planes_match_packbits_for_any_length_and_input_kind(n8, r, seed):
    """Lengths that are not a multiple of 64 codes (or zero), each r, and plane inputs that are a
    non-contiguous tensor or a read-only numpy view of bytes, against np.packbits."""
    q = np.random.default_rng(seed).integers(0, 256, size=8 * n8, dtype=np.uint8)
    ref = np.packbits((q[None, :] >> np.arange(7, -1, -1, dtype=np.uint8)[:, None]) & 1, axis=1, bitorder="big")
    planes = pack_planes(torch.from_numpy(q.reshape(n8, 8).T.copy()).t())  # non-contiguous codes, same order
    assert planes.dtype == torch.uint8 and np.array_equal(planes.numpy(), ref)
    assert np.array_equal(pack_planes(torch.from_numpy(q), r).numpy(), ref[:r])
    want = torch.from_numpy(q >> (8 - r)).reshape(2, 4 * n8)
    wide = torch.zeros(r, 2 * n8, dtype=torch.uint8)
    wide[:, ::2] = planes[:r]
    read_only = np.frombuffer(ref[:r].tobytes(), dtype=np.uint8).reshape(r, n8)
    for given_planes in (planes[:r], wide[:, ::2], read_only):
        got = unpack_planes(given_planes, (2, 4 * n8))
        assert got.dtype == torch.uint8 and torch.equal(got, want)


def test_plane_order_is_msb_first_and_high_bit_first_in_a_byte():
    q = torch.tensor([0b10000000, 0, 0, 0, 0, 0, 0, 0b00000001], dtype=torch.uint8)
    planes = pack_planes(q)
    assert planes[0].tolist() == [0b10000000]  # plane 0 = bit 7; code 0 in the byte's high bit
    assert planes[7].tolist() == [0b00000001]
    assert planes[1:7].sum().item() == 0


@settings(max_examples=150, deadline=None)
@given(matrices(), st.integers(1, 8))
def test_r_bit_view_from_planes_equals_slice_of_the_8_bit_code(wg, r):
    w, group = wg
    msb = scheme("msb")
    enc = msb.encode(w, group)
    q8 = quantize(w, 8, group)
    assert torch.equal(unpack_planes(enc.planes, tuple(w.shape)), q8.codes)
    from_planes = msb.view(enc, r)  # reads only the first r planes
    from_code = msb_view(q8.codes, q8.scale, q8.minimum, r, group)
    (a,), (b,) = from_planes.terms, from_code.terms
    assert a.bits == b.bits == r
    assert torch.equal(a.codes, q8.codes >> (8 - r))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
    assert torch.equal(from_planes.dequantize(), from_code.dequantize())


@settings(max_examples=100, deadline=None)
@given(matrices())
def test_8_bit_view_is_the_reference_dequantisation_exactly(wg):
    w, group = wg
    q8 = quantize(w, 8, group)
    view = scheme("msb").view(scheme("msb").encode(w, group), 8)
    assert torch.equal(view.dequantize(), dequantize(q8.codes, q8.scale, q8.minimum, group))


@settings(max_examples=100, deadline=None)
@given(matrices(), st.integers(1, 8))
def test_r_bit_view_lies_in_the_middle_of_its_bucket(wg, r):
    w, group = wg
    q8 = quantize(w, 8, group)
    got = msb_view(q8.codes, q8.scale, q8.minimum, r, group).dequantize()
    step = 1 << (8 - r)
    lo = dequantize((q8.codes >> (8 - r)) * step, q8.scale, q8.minimum, group)  # first code of the bucket
    hi = dequantize((q8.codes >> (8 - r)) * step + (step - 1), q8.scale, q8.minimum, group)  # last
    assert torch.allclose(got, (lo + hi) / 2, rtol=1e-6, atol=1e-6 * float(w.abs().max()) + 1e-12)


@settings(max_examples=60, deadline=None)
@given(matrices(), st.sampled_from(["msb", "residual"]), st.integers(1, 8))
def test_stored_bytes_round_trip(wg, name, r):
    w, group = wg
    s = scheme(name)
    enc = s.encode(w, group)
    head = enc.head_bytes()
    planes = [enc.plane_bytes(i) for i in range(r)]
    assert len(head) == s.head_nbytes(tuple(w.shape), group)
    assert [len(p) for p in planes] == [s.plane_nbytes(i, tuple(w.shape), group) for i in range(r)]
    back = s.decode(tuple(w.shape), group, head, planes)
    assert torch.equal(s.view(back, r).dequantize(), s.view(enc, r).dequantize())


def test_unpack_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        unpack_planes(torch.zeros(3, 4, dtype=torch.uint8), (5, 8))
    with pytest.raises(ValueError):
        pack_planes(torch.zeros(7, dtype=torch.uint8))
    with pytest.raises(TypeError):
        unpack_planes(torch.zeros(2, 1, dtype=torch.int8), (8,))


def test_native_unpack_builds_where_there_is_a_compiler():
    """quant/native.c is built and loaded on any machine with a C compiler (CI's has one: it builds llama.cpp)."""
    import shutil

    from quant import native
    if not (shutil.which("cc") or shutil.which("gcc")) or not native.enabled():
        pytest.skip("no C compiler, or MOED_NATIVE=0")
    assert native.library() is not None


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 300), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_native_and_numpy_unpack_agree_bit_for_bit(n8, r, seed):
    """The native transpose and its numpy twin give the same codes for every r and length."""
    from quant import native
    q = np.random.default_rng(seed).integers(0, 256, size=8 * n8, dtype=np.uint8)
    planes = pack_planes(torch.from_numpy(q))[:r]
    out = np.full(q.size, 0xAA, dtype=np.uint8)
    if not native.unpack_planes([np.ascontiguousarray(p) for p in planes.numpy()], out):
        pytest.skip("native helpers unavailable here")
    orig = native.unpack_planes
    try:
        native.unpack_planes = lambda *a: False  # the numpy path of unpack_planes
        numpy_codes = unpack_planes(planes, (q.size,))
    finally:
        native.unpack_planes = orig
    assert np.array_equal(out, q >> (8 - r)) and np.array_equal(numpy_codes.numpy(), out)


def test_native_disabled_or_unbuildable_falls_back_with_a_clear_error(tmp_path, monkeypatch):
    from quant import native
    monkeypatch.setenv("CC", "/bin/false")
    with pytest.raises(RuntimeError, match="/bin/false failed"):
        native.build(tmp_path)
    assert not list(tmp_path.iterdir())  # no partial library left behind
    monkeypatch.setenv("MOED_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert native.library() is None
        q = torch.arange(64, dtype=torch.uint8)
        assert torch.equal(unpack_planes(pack_planes(q)[:5], (64,)), q >> 3)  # numpy's path
    finally:
        native.library.cache_clear()
