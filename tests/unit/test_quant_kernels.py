"""Every kernel backend's expert FFN against the reference dequantise-then-matmul, per bit-width.

Tolerance = relative L2 error of the FFN output, ||y - y_ref|| / ||y_ref||, stated per backend and
bit-width below. Where they come from: torch's CPU int4/int8 kernels take bfloat16 activations and
scales (bfloat16 alone costs ~5e-3 on this FFN); onnxruntime at accuracy_level 4 quantises activations
to int8 per block (~2-3e-2 measured), and so does moed's native kernel, with the same arithmetic; at
accuracy_level 0 onnxruntime stays in float32; CUDA runs float16.
"""

from __future__ import annotations

import pytest
import torch

from quant.kernels import available_backends, backend_names, fast_cpu_backend, get_backend
from quant.schemes import scheme
from quant.views import AffineTerm, ExpertViews, QuantView

BITS = range(1, 9)
TOLERANCE: dict[str, dict[int, float]] = {
    "torch": {r: (2e-2 if r <= 4 else 1.5e-2) for r in BITS},
    "onnxruntime": {r: 5e-2 for r in BITS},
    "native": {r: 5e-2 for r in BITS},
    "onnxruntime-fp32": {r: 1e-5 for r in BITS},
    "cuda": {r: 1e-2 for r in BITS},
}
OPTIONS = {"onnxruntime-fp32": ("onnxruntime", {"accuracy_level": 0})}
D, I = 256, 128


def expert(name: str, bits: int, group: int, seed: int = 0) -> ExpertViews:
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(I, D, generator=g) * D ** -0.5, torch.randn(I, D, generator=g) * D ** -0.5,
          torch.randn(D, I, generator=g) * I ** -0.5]
    s = scheme(name)
    return ExpertViews(*(s.view(s.encode(w, group), bits) for w in ws))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


def backend(key: str):
    name, opts = OPTIONS.get(key, (key, {}))
    if name not in available_backends():
        pytest.skip(f"backend {name} is not available here")
    return get_backend(name, **opts)


def check(key: str, name: str, bits: int, group: int, act: str, tokens: int) -> None:
    views = expert(name, bits, group, seed=bits)
    x = torch.randn(tokens, D, generator=torch.Generator().manual_seed(100 + tokens))
    ref = get_backend("reference")
    want = ref.ffn(x, ref.prepare_expert(views, act))
    b = backend(key)
    got = b.ffn(x, b.prepare_expert(views, act))
    assert got.shape == want.shape and got.dtype == torch.float32 and got.device == x.device
    err = rel_err(got, want)
    assert err <= TOLERANCE[key][bits], f"{key} {name} r={bits}: relative error {err:.2e}"


@pytest.mark.cpu
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("name", ["msb", "residual"])
@pytest.mark.parametrize("key", ["torch", "onnxruntime", "onnxruntime-fp32", "native"])
def test_cpu_backend_ffn_matches_reference(key, name, bits):
    check(key, name, bits, 128, "silu", tokens=5)


@pytest.mark.cpu
@pytest.mark.parametrize("key", ["torch", "onnxruntime", "onnxruntime-fp32", "native"])
@pytest.mark.parametrize("act,group,tokens", [("gelu", 32, 1), ("relu", 64, 9), ("silu", 32, 1)])
def test_cpu_backend_other_activations_groups_and_batches(key, act, group, tokens):
    for bits in (8, 4, 2):
        check(key, "msb", bits, group, act, tokens)


@pytest.mark.cuda
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("name", ["msb", "residual"])
def test_cuda_backend_ffn_matches_reference(name, bits):
    check("cuda", name, bits, 128, "silu", tokens=5)


@pytest.mark.cpu
def test_reference_backend_is_dequantise_then_matmul():
    views = expert("msb", 4, 128)
    x = torch.randn(3, D)
    ref = get_backend("reference")
    w = [v.dequantize() for v in (views.gate, views.up, views.down)]
    want = torch.nn.functional.silu(x @ w[0].T) * (x @ w[1].T) @ w[2].T
    assert torch.allclose(ref.ffn(x, ref.prepare_expert(views, "silu")), want, rtol=1e-5, atol=1e-6)


@pytest.mark.cpu
def test_torch_backend_pads_rows_to_its_kernel_multiple():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (40, 64), dtype=torch.uint8, generator=g)  # 40 rows: not a multiple of 16
    view = QuantView((AffineTerm(codes, 4, torch.rand(40, 2, generator=g) * 0.1, torch.randn(40, 2, generator=g)),),
                     4, 32)
    b = get_backend("torch")
    x = torch.randn(2, 64, generator=g)
    want = x @ view.dequantize().T
    assert rel_err(b.linear(x, b.prepare(view)), want) < 1e-2


def test_backends_register_by_name():
    assert {"reference", "torch", "onnxruntime", "native", "cuda"} <= set(backend_names())
    assert "reference" in available_backends()
    with pytest.raises(ValueError, match="unknown kernel backend"):
        get_backend("nope")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            get_backend("cuda")


@pytest.mark.cpu
@pytest.mark.parametrize("key", ["onnxruntime", "native"])
def test_cpu_expert_keeps_no_reference_to_its_views(key):
    """An expert's compute form owns its weights (onnxruntime: sessions of one shape share a cached graph,
    each copies and packs its weights; native: codes regrouped into new arrays), so the views' buffers may
    be reused or freed once prepared."""
    b = backend(key)
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(7))
    ref = get_backend("reference")
    views = [expert("msb", 8, 128, seed=s) for s in (1, 2)]
    want = [ref.ffn(x, ref.prepare_expert(v, "silu")) for v in views]
    forms = [b.prepare_expert(v, "silu") for v in views]
    for v in views:
        for m in (v.gate, v.up, v.down):
            for t in m.terms:
                t.codes.fill_(0)
                t.scale.fill_(1.0)
                t.zero.fill_(0.0)
    for f, w in zip(forms, want):
        assert rel_err(b.ffn(x, f), w) <= TOLERANCE[key][8]


def test_shared_instances_and_fastest_cpu_backend():
    assert get_backend("reference") is get_backend("reference")  # one set of workers per process
    have = available_backends()
    assert fast_cpu_backend() == next(b for b in ("native", "onnxruntime", "torch") if b in have)


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_onnxruntime_splits_a_dense_matrix_over_its_workers(bits):
    """A matrix of many rows becomes one session per worker; rows computed apart give the same output."""
    if "onnxruntime" not in available_backends():
        pytest.skip("onnxruntime is not available here")
    g = torch.Generator().manual_seed(bits)
    s = scheme("msb")
    view = s.view(s.encode(torch.randn(1024, 256, generator=g), 128), bits)
    x = torch.randn(3, 256, generator=g)
    one, two = get_backend("onnxruntime", threads=1), get_backend("onnxruntime", threads=2)
    try:
        f1, f2 = one.prepare(view), two.prepare(view)
        assert len(f1.parts) == 1 and len(f2.parts) == 2 and two.concurrent
        y1, y2 = one.linear(x, f1), two.linear(x, f2)
        assert y2.shape == (3, 1024) and torch.equal(y1, y2)
        assert rel_err(y2, x @ view.dequantize().T) < TOLERANCE["onnxruntime"][bits]
    finally:
        one.close()
        two.close()


@pytest.mark.parametrize("bits", [8, 5, 2])
def test_native_splits_a_large_matrix_over_its_workers(bits):
    """A matrix of SPLIT_CODES or more runs as row blocks on the workers; rows past a multiple of 16 are
    padding. Each row is computed alone, so one worker and two give the same output bit for bit."""
    if "native" not in available_backends():
        pytest.skip("the native kernels are not built here")
    from quant.kernels.native import SPLIT_CODES
    g = torch.Generator().manual_seed(bits)
    s = scheme("msb")
    n, k = 1000, 4352  # 1000 rows: not a multiple of 16
    assert n * k >= SPLIT_CODES
    view = s.view(s.encode(torch.randn(n, k, generator=g), 128), bits)
    x = torch.randn(3, k, generator=g)
    one, two = get_backend("native", threads=1), get_backend("native", threads=2)
    try:
        form = one.prepare(view)
        y1, y2 = one.linear(x, form), two.linear(x, form)
        assert y2.shape == (3, n) and torch.equal(y1, y2)
        assert rel_err(y2, x @ view.dequantize().T) < TOLERANCE["native"][bits]
    finally:
        one.close()
        two.close()


def test_native_plain_c_path_computes_what_the_vector_path_does(tmp_path):
    """The kernels' plain-C loops (CPUs without AVX2) against the vector path this CPU takes (AVX512-VNNI or
    AVX2): the same integer dot products, the float steps in another order (within 1e-5). Codes at both ends
    of their range and activations at +-max (x + 128 at 1 and 255) are in, where an int16 sum would saturate."""
    import ctypes

    import numpy as np

    from quant import native
    lib = native.library()
    if lib is None or not lib.moed_simd():
        pytest.skip("needs the native library built with a vector path to compare against")
    plain = ctypes.CDLL(str(native.build(tmp_path, extra=("-mno-avx2", "-mno-avx512vnni", "-mno-f16c"))))
    native.bind(plain)
    assert plain.moed_simd() == 0
    s = scheme("msb")
    gen = torch.Generator().manual_seed(3)
    extreme = torch.where(torch.rand(40, 256, generator=gen) < 0.5, -1.0, 1.0)  # codes 0 and 2^b - 1 only
    for bits in (8, 4):  # one byte a code; two
        for w in (torch.randn(40, 256, generator=gen), extreme):
            view = s.view(s.encode(w, 64), bits)
            form = get_backend("native").prepare(view)
            assert form.terms[0].codes.nbytes == 48 * 256 // (1 if bits > 4 else 2)
            rng = np.random.default_rng(4)
            x = rng.standard_normal((13, 256)).astype(np.float32)  # 8 + 4 + 1 tokens
            x[8:] = np.sign(x[8:])  # every activation at its group's +-max
            ys = []
            for impl in (lib, plain):
                y = np.empty((13, 40), dtype=np.float32)
                impl.moed_qgemm_mt(x.ctypes.data, 13, *form.terms[0].args(), 40, 256, 64, bits, 0, form.blocks,
                                   y.ctypes.data, 40, 0, 1)
                ys.append(y)
            assert np.allclose(ys[0], ys[1], rtol=1e-5, atol=1e-5 * np.abs(ys[0]).max()), (bits, ys[0] - ys[1])
    # the form itself, byte for byte: whole and partial blocks of rows, rows of a multiple of 32 codes or not,
    # groups of a multiple of 32 or not
    for bits, n, k, g in ((8, 40, 256, 64), (6, 33, 320, 40), (8, 16, 264, 8), (4, 40, 256, 64), (5, 32, 96, 96)):
        codes = np.random.default_rng(bits + n).integers(0, 1 << bits, (n, k), dtype=np.uint8)
        forms = []
        for impl in (lib, plain):
            out = np.full(-(-n // 16) * 16 * k // (2 if bits <= 4 else 1), 7, dtype=np.int8)
            sums = np.full(-(-n // 16) * (k // g) * 16, 7, dtype=np.int16)
            impl.moed_interleave(codes.ctypes.data, n, k, g, bits, out.ctypes.data, sums.ctypes.data)
            forms.append((out, sums))
        assert np.array_equal(forms[0][0], forms[1][0]) and np.array_equal(forms[0][1], forms[1][1]), (bits, n, k, g)
    # float16 parameters without F16C: rounded to nearest even as the vector instruction (and numpy) do, from
    # subnormals to the edge of the range; beyond it, an error
    tiny = 2.0 ** -24  # the least float16 subnormal
    spread = np.random.default_rng(5).standard_normal(4000) * 4.0 ** (np.arange(4000) % 12 - 8)
    edges = [0.0, -0.0, tiny, tiny * 1.5, tiny * 2.5, -tiny * 0.49, 65504.0, -65504.0, 65519.0, 1 + 2.0 ** -11,
             1 + 3 * 2.0 ** -11, 2.0 ** -14 * (1 - 2.0 ** -11)]  # ties to even, the largest finite, subnormal edge
    p = np.concatenate([spread, edges]).astype(np.float32)
    want = p.astype(np.float16).view(np.uint16)
    for impl in (lib, plain):
        out = np.empty(p.size * 16, dtype=np.uint16)  # one group a row: [blocks][1][16]
        assert impl.moed_interleave_params(p.ctypes.data, p.size, 1, out.ctypes.data) == 0
        assert np.array_equal(out[:p.size], want), impl
        over = np.array([65520.0], dtype=np.float32)
        assert impl.moed_interleave_params(over.ctypes.data, 1, 1, out.ctypes.data) == -1


@pytest.mark.parametrize("bits", [8, 4])
def test_native_form_parameters_are_16_bit_and_exact(bits):
    """A group's parameters take 6 bytes a row in the native form: the scale as stored (float16, exactly), the
    offset rounded once to float16, and the exact int16 sum of the group's centred codes."""
    if "native" not in available_backends():
        pytest.skip("the native kernels are not built here")
    import numpy as np

    s, g = scheme("msb"), 64
    view = s.view(s.encode(torch.randn(40, D, generator=torch.Generator().manual_seed(bits)), g), bits)
    term, form = view.terms[0], get_backend("native").prepare(view).terms[0]
    blocks, ng = 3, D // g  # 40 rows: 3 blocks of 16, the last with 8 padding rows
    assert form.scale.dtype == form.offset.dtype == np.float16 and form.sums.dtype == np.int16
    assert form.scale.shape == form.sums.shape == (blocks, ng, 16)
    assert form.codes.nbytes + 3 * form.scale.nbytes == blocks * 16 * ((D // 2 if bits <= 4 else D) + 6 * ng)
    rows = lambda a: np.asarray(a).transpose(0, 2, 1).reshape(blocks * 16, ng)[:40]  # [blocks, ng, 16] -> [N, ng]
    assert np.array_equal(rows(form.scale).astype(np.float32), term.scale.numpy())
    mid = 1 << (bits - 1)
    offset = (term.zero + term.scale * mid).numpy()
    assert np.array_equal(rows(form.offset), offset.astype(np.float16))
    centred = term.codes.numpy().astype(np.int32).reshape(40, ng, g) - mid
    assert np.array_equal(rows(form.sums), centred.sum(-1))
    assert not np.asarray(form.sums)[-1, :, 8:].any() and not np.asarray(form.scale)[-1, :, 8:].any()


def test_native_runs_several_experts_in_one_call_as_it_runs_each():
    """ffn_many (a layer's share of one-token experts in one C call) gives each expert's ffn bit for bit, at
    mixed bit-widths; an expert of several terms a matrix (residual) is computed as three linears."""
    if "native" not in available_backends():
        pytest.skip("the native kernels are not built here")
    b = get_backend("native")
    experts = [b.prepare_expert(expert("msb", bits, 128, seed=bits), "silu") for bits in (8, 4, 6)]
    experts.append(b.prepare_expert(expert("residual", 5, 128, seed=9), "silu"))
    assert [e.call is not None for e in experts] == [True, True, True, False]
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(11))
    many = b.ffn_many(x, experts)
    assert len(many) == 4 and all(torch.equal(y, b.ffn(x, e)) for y, e in zip(many, experts))
    two = get_backend("native", threads=2)  # the experts dealt to quant/native.c's threads: the same outputs
    for i in range(50):  # every other call after the workers are told to sleep at once (idle: a read to wait for)
        if i % 2:
            two.idle()
        assert all(torch.equal(y, z) for y, z in zip(two.ffn_many(x, experts * 3, parallel=True), many * 3))
    ref = get_backend("reference")
    want = ref.ffn(x, ref.prepare_expert(expert("residual", 5, 128, seed=9), "silu"))
    assert rel_err(many[3], want) <= TOLERANCE["native"][5]
    assert b.ffn_many(x, []) == []


def packed_expert(bits: int, seed: int = 0) -> tuple[ExpertViews, ExpertViews]:
    """An msb expert at `bits`: its views with codes unpacked, and with codes left as planes (PackedCodes, what
    Store.views(packed=True) gives)."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(I, D, generator=g), torch.randn(I, D, generator=g), torch.randn(D, I, generator=g)]
    s = scheme("msb")
    enc = [s.encode(w, 32) for w in ws]
    return (ExpertViews(*(s.view(e, bits) for e in enc)), ExpertViews(*(s.view(e, bits, packed=True) for e in enc)))


@pytest.mark.parametrize("bits", BITS)
def test_native_form_from_planes_is_the_form_from_codes(bits):
    """The native backend makes its form straight from the bit-planes (16 rows unpacked at a time, no array of
    all the codes): every array equal to the one made from the unpacked codes, padding rows included."""
    if "native" not in available_backends():
        pytest.skip("the native kernels are not built here")
    import numpy as np

    from quant.planes import PackedCodes

    b = get_backend("native")
    unpacked, packed = packed_expert(bits, seed=bits)
    assert isinstance(packed.gate.terms[0].codes, PackedCodes) and packed.gate.shape == (I, D)
    a, p = b.prepare_expert(unpacked, "silu"), b.prepare_expert(packed, "silu")
    assert a.nbytes == p.nbytes == p.slab.nbytes
    s, w = scheme("msb"), torch.randn(40, D, generator=torch.Generator().manual_seed(bits))
    enc = s.encode(w, 32)  # 40 rows: the last block of 16 has 8 padding rows
    for fa, fp in zip(a.forms + (b.prepare(s.view(enc, bits)),), p.forms + (b.prepare(s.view(enc, bits, True)),)):
        for ta, tp in zip(fa.terms, fp.terms):
            for x, y in zip(ta.args(), tp.args()):
                assert x != y  # distinct arrays...
            for x, y in zip((ta.codes, ta.scale, ta.offset, ta.sums), (tp.codes, tp.scale, tp.offset, tp.sums)):
                assert x.dtype == y.dtype and np.array_equal(x, y)  # ...of equal contents
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(5))
    assert torch.equal(b.ffn(x, a), b.ffn(x, p))


@pytest.mark.parametrize("bits", (2, 4, 8))
def test_native_form_made_from_row_blocks_is_the_form_of_the_whole(bits):
    """prepare_rows writes each block of rows into the final arrays (no copy of all the codes besides the form):
    every array equals prepare's of the whole matrix, the last block short; blocks of rows not a multiple of 16
    are joined first, to the same form; blocks that do not add up to the matrix are an error."""
    if "native" not in available_backends():
        pytest.skip("the native kernels are not built here")
    import numpy as np

    b = get_backend("native")
    s = scheme("msb")
    whole = s.view(s.encode(torch.randn(100, D, generator=torch.Generator().manual_seed(bits)), 32), bits)

    def rows(a: int, z: int) -> QuantView:
        return QuantView(tuple(AffineTerm(t.codes[a:z], t.bits, t.scale[a:z], t.zero[a:z]) for t in whole.terms),
                         whole.bits, whole.group)

    ref = b.prepare(whole)
    for edges in ((0, 32, 64, 96, 100), (0, 48, 100), (0, 30, 60, 100)):
        form = b.prepare_rows((rows(a, z) for a, z in zip(edges, edges[1:])), 100)
        assert (form.n, form.k, form.group) == (ref.n, ref.k, ref.group) and form.nbytes == ref.nbytes
        for tf, tr in zip(form.terms, ref.terms, strict=True):
            for x, y in zip((tf.codes, tf.scale, tf.offset, tf.sums), (tr.codes, tr.scale, tr.offset, tr.sums)):
                assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(2))
    assert torch.equal(b.linear(x, form), b.linear(x, ref))
    with pytest.raises(ValueError, match="blocks of 96 rows for a matrix of 100"):
        b.prepare_rows((rows(a, z) for a, z in ((0, 32), (32, 96))), 100)


def test_native_reuses_a_recycled_form_buffer_only_once_nothing_refers_to_it():
    """A form let go (Backend.recycle) leaves its buffer for the next form of the same size, but not while any
    array of the old form is still referred to; the form made in a reused buffer computes what a fresh one
    does."""
    if "native" not in available_backends():
        pytest.skip("the native kernels are not built here")
    from quant.kernels.native import Native

    b = Native(threads=1)
    views = [packed_expert(4, seed=s)[1] for s in range(3)]
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(6))
    first = b.prepare_expert(views[0], "silu")
    slab, held = id(first.slab), first.forms[1].terms[0].codes  # an array of the old form, still referred to
    b.recycle(first)
    del first
    second = b.prepare_expert(views[1], "silu")
    assert id(second.slab) != slab and b.slabs.waiting == 1  # not reused while `held` refers to it
    del held
    third = b.prepare_expert(views[2], "silu")
    assert id(third.slab) == slab and b.slabs.waiting == 0  # now it is (the waiting buffer was alive: same id)
    fresh = Native(threads=1)
    assert torch.equal(b.ffn(x, third), fresh.ffn(x, fresh.prepare_expert(views[2], "silu")))
    assert torch.equal(b.ffn(x, second), fresh.ffn(x, fresh.prepare_expert(views[1], "silu")))
    other = b.prepare_expert(packed_expert(8, seed=7)[1], "silu")
    other_slab = id(other.slab)
    b.recycle(other)
    del other
    assert id(b.prepare_expert(views[0], "silu").slab) != other_slab  # another size: a buffer of its own
    assert b.slabs.waiting == 1
