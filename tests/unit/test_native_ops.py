"""quant/native.c's decode attention and RMS norm against the torch code they stand in for."""

from __future__ import annotations

import pytest
import torch

from daemon.models.attention import AttnInputs, Attention
from daemon.models.cache import KVCache
from daemon.models.norms import RMSNorm
from daemon.models.rope import Rope
from quant import native

pytestmark = pytest.mark.cpu


@pytest.fixture
def lib():
    got = native.library()
    if got is None:
        pytest.skip("the native helpers are not built here")
    return got


@pytest.mark.parametrize("heads,kv_heads,d,prompt_len", [(8, 2, 64, 5), (4, 4, 32, 5), (6, 1, 128, 5),
                                                         (16, 4, 128, 301), (5, 5, 64, 1030)])
def test_native_decode_attention_matches_the_torch_path(lib, heads, kv_heads, d, prompt_len, monkeypatch):
    """Prefill in torch, then decode steps in both paths from the same cache: outputs within 1e-5 and the
    cache holds the same keys and values; positions past the cache's capacity grow it on both paths. The long
    prompts (positions not a multiple of the four scored at once) split their heads over the kernels' threads,
    started here by a large product."""
    from quant.groups import quantize
    from quant.kernels.native import Native
    from quant.views import AffineTerm, QuantView

    if prompt_len > 5:  # the native threads exist once a product has been split over them
        be = Native(2)
        q = quantize(torch.randn(1024, 1024), 8, 128)
        be.linear(torch.randn(1, 1024), be.prepare(QuantView((AffineTerm(q.codes, 8, q.scale.float(),
                                                                         q.minimum.float()),), 8, 128)))
    g = torch.Generator().manual_seed(heads * d)
    attn = Attention(0, heads * d, heads, kv_heads, d)
    rope = Rope(d, 10000.0)
    cap = prompt_len + 3
    caches = {"native": KVCache(1, capacity=cap), "torch": KVCache(1, capacity=cap)}

    def step(cache: KVCache, t: int, x: tuple, use_native: bool) -> torch.Tensor:
        pos = torch.arange(cache.length, cache.length + t)
        cos, sin = rope.tables(pos)
        mask = None if t == 1 else torch.ones(t, cache.length + t, dtype=torch.bool).tril(cache.length)
        monkeypatch.setattr(native, "library", (lambda: lib) if use_native else (lambda: None))
        out = attn._attend(*x, AttnInputs(cos, sin, mask, cache))
        cache.advance(t)
        return out

    prompt = tuple(torch.randn(1, prompt_len, h, d, generator=g) for h in (heads, kv_heads, kv_heads))
    for name, cache in caches.items():
        step(cache, prompt_len, prompt, False)
    for _ in range(6):  # the capacity of prompt_len + 3 is outgrown on the way
        x = tuple(torch.randn(1, 1, h, d, generator=g) for h in (heads, kv_heads, kv_heads))
        got, want = step(caches["native"], 1, x, True), step(caches["torch"], 1, x, False)
        assert got.shape == want.shape == (1, 1, heads * d)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    n = caches["torch"].length
    for a, b in zip(caches["native"].reserve(0, n, *prompt[1:]), caches["torch"].reserve(0, n, *prompt[1:])):
        assert torch.allclose(a[:, :, :n], b[:, :, :n], rtol=1e-5, atol=1e-6)


def test_native_rms_norm_matches_torch(lib, monkeypatch):
    """RMSNorm's native call (float32, contiguous, no autograd) against torch's rms_norm; a strided input
    takes torch's path."""
    x = torch.randn(3, 7, 96, generator=torch.Generator().manual_seed(1)) * 3
    norm = RMSNorm(96, eps=1e-5)
    norm.weight.data = torch.rand(96, generator=torch.Generator().manual_seed(2)) + 0.5
    want = norm.weight * torch.nn.functional.rms_norm(x, (96,), None, 1e-5)
    calls = []
    monkeypatch.setattr(native, "library", lambda: calls.append(1) or lib)
    with torch.no_grad():
        assert torch.allclose(norm(x), want, rtol=1e-5, atol=1e-6) and calls
        calls.clear()
        strided = torch.randn(3, 7, 192)[..., ::2]
        assert torch.allclose(norm(strided), norm.weight * torch.nn.functional.rms_norm(strided, (96,), None, 1e-5))
        assert not calls


def test_rope_span_is_tables_across_growth():
    """Rows of the kept tables (grown as positions advance) are the tables computed for those positions."""
    rope = Rope(128, 10000.0)
    for start, n in ((0, 16), (16, 1), (63, 2), (64, 1), (200, 57), (5, 3), (1000, 1)):
        cos, sin = rope.span(start, n, torch.device("cpu"))
        ref_cos, ref_sin = rope.tables(torch.arange(start, start + n))
        torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-6)
    assert rope.span(0, 1, torch.device("cpu"))[0].shape == (1, 128)
