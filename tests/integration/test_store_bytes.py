"""Byte counting on the expert store: an r-bit load reads exactly the r-bit prefix, raising reads only
the planes in between, and every read is one aligned range."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from daemon.convert import convert
from offload.layout import ALIGN
from offload.provider import StoreExperts
from offload.reader import CountingReader
from offload.store import Store
from quant.schemes import scheme

ARCH = "qwen3_moe"


@pytest.fixture(scope="module", params=["msb", "residual"])
def store_dir(request, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / request.param
    return convert(tiny_model(ARCH), out, group_size=64, scheme=request.param)


def expected_prefix(store: Store, bits: int) -> int:
    """Head plus planes 0..bits-1 of gate, up and down, each section padded to 4 KiB: from the scheme."""
    s, g = scheme(store.manifest.scheme), store.manifest.group_size
    shapes = [tuple(shape) for _, shape in store.manifest.matrices]

    def pad(n: int) -> int:
        return -(-n // ALIGN) * ALIGN
    return pad(sum(s.head_nbytes(sh, g) for sh in shapes)) + sum(
        pad(sum(s.plane_nbytes(i, sh, g) for sh in shapes)) for i in range(bits))


@pytest.mark.parametrize("bits", range(1, 9))
def test_loading_at_r_bits_reads_exactly_the_r_bit_prefix(store_dir, bits):
    trace: list = []
    store = Store(store_dir, trace=trace)
    provider = StoreExperts(store, bits)
    layer = store.layers[-1]
    x = store.extent(layer, 3)
    provider.ensure(layer, 3)
    assert trace == [(x.offset, expected_prefix(store, bits))]  # one read, from the start of the extent
    assert store.reader.bytes_read == expected_prefix(store, bits) == store.layout.prefix(bits)
    assert x.offset % ALIGN == 0 and store.layout.prefix(bits) % ALIGN == 0
    provider.ensure(layer, 3)  # resident: no further read
    provider.ensure(layer, 3, bits=max(1, bits - 1))  # fewer bits than held: no read either
    assert len(trace) == 1


@pytest.mark.parametrize("low,high", [(1, 2), (2, 4), (3, 8), (4, 6), (6, 8), (2, 3)])
def test_raising_reads_only_the_planes_in_between(store_dir, low, high):
    trace: list = []
    store = Store(store_dir, trace=trace)
    provider = StoreExperts(store, low)
    layer = store.layers[0]
    x = store.extent(layer, 5)
    provider.ensure(layer, 5)
    raised = provider.ensure(layer, 5, bits=high)
    lo, hi = expected_prefix(store, low), expected_prefix(store, high)
    assert trace == [(x.offset, lo), (x.offset + lo, hi - lo)]
    assert store.reader.bytes_read == hi  # nothing read twice
    fresh = Store(store_dir).views(Store(store_dir).read_expert(layer, 5, high), high)
    for a, b in zip((raised.form.forms[0], raised.form.forms[1], raised.form.forms[2]),
                    (fresh.gate, fresh.up, fresh.down)):
        assert torch.equal(a, b.dequantize())  # the refined expert is the one a direct read gives


def test_a_whole_model_at_r_bits_reads_each_prefix_once(store_dir, tiny_model):
    from daemon.loaders.build import load_model
    lm8 = load_model(store_dir, bits=8)
    lm3 = load_model(store_dir, bits=3)
    n = sum(lm3.experts.store.n_experts(layer) for layer in lm3.experts.store.layers)
    assert lm3.experts.bytes_read == n * lm3.experts.store.layout.prefix(3)
    assert lm8.experts.bytes_read == n * lm8.experts.store.layout.length == os.path.getsize(store_dir / "experts.bin")
    assert lm3.experts.bytes_read < 0.5 * lm8.experts.bytes_read


def test_reader_counts_and_falls_back_when_o_direct_is_refused(store_dir, monkeypatch):
    path = store_dir / "experts.bin"
    want = path.read_bytes()[ALIGN:3 * ALIGN]
    with CountingReader(path, direct=False) as r:
        assert not r.direct
        assert bytes(r.read(ALIGN, 2 * ALIGN)) == want and bytes(r.read(5, 7)) == path.read_bytes()[5:12]
        assert (r.bytes_read, r.reads) == (2 * ALIGN + 7, 2)
    real = os.preadv
    with CountingReader(path) as r:
        direct_fd = r._direct_fd
        if direct_fd is None:
            pytest.skip("this file system refuses O_DIRECT (the buffered path is tested above)")

        def refuse(fd, bufs, offset):
            if fd == direct_fd:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, bufs, offset)
        monkeypatch.setattr(os, "preadv", refuse)
        assert bytes(r.read(ALIGN, 2 * ALIGN)) == want
        assert not r.direct and r.bytes_read == 2 * ALIGN


def test_reads_past_the_end_are_errors(store_dir):
    from daemon.errors import FormatError
    size = os.path.getsize(store_dir / "experts.bin")
    with CountingReader(store_dir / "experts.bin") as r, pytest.raises(FormatError, match="short read"):
        r.read(size - ALIGN, 2 * ALIGN)


def test_scratch_reads_reuse_one_buffer_per_thread(store_dir):
    """A scratch read lands in the thread's reusable buffer (what streamed experts use): the same memory
    each time, with the same bytes as an ordinary read."""
    store = Store(store_dir)
    layer = store.layers[0]
    a = [bytes(s) for s in store.read_expert(layer, 1, 8)]
    s1 = store.read_expert(layer, 1, 8, scratch=True)
    assert [bytes(s) for s in s1] == a
    first = s1[0].obj if hasattr(s1[0], "obj") else None
    s2 = store.read_expert(layer, 2, 8, scratch=True)
    assert first is not None and s2[0].obj is first  # one buffer, reused
    assert [bytes(s) for s in s1] != a  # so the earlier sections now show expert 2's bytes
    assert [bytes(s) for s in s2] == [bytes(s) for s in store.read_expert(layer, 2, 8)]
