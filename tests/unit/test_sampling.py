"""Sampling against transformers' logits processors, and the streaming detokenizer."""

from __future__ import annotations

import pytest
import torch

from daemon.generate import TextStream
from daemon.sampling import Sampler, SamplingParams

transformers = pytest.importorskip("transformers")
gen = transformers.generation.logits_process


def reference(logits: torch.Tensor, history: list[int], p: SamplingParams) -> torch.Tensor:
    """The same processing done by transformers, in its order."""
    x = logits[None].clone()
    ids = torch.tensor([history])
    if p.repetition_penalty != 1.0:
        x = gen.RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, x)
    x = gen.TemperatureLogitsWarper(p.temperature)(ids, x)
    if p.top_k:
        x = gen.TopKLogitsWarper(p.top_k)(ids, x)
    if p.top_p < 1:
        x = gen.TopPLogitsWarper(p.top_p)(ids, x)
    if p.min_p > 0:
        x = gen.MinPLogitsWarper(p.min_p)(ids, x)
    return x[0]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=10),
    SamplingParams(temperature=0.9, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.02, repetition_penalty=1.3),
])
def test_filters_match_transformers(params):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = 3 * torch.randn(200, generator=g)
        history = torch.randint(0, 200, (15,), generator=g).tolist()
        got = Sampler(params).process(logits, history)
        want = reference(logits, history, params)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        finite = ~torch.isinf(want)
        assert torch.allclose(got[finite], want[finite], atol=1e-6)


def test_greedy_picks_argmax_and_penalty_applies():
    logits = torch.tensor([1.0, 5.0, 4.9, -2.0])
    assert Sampler(SamplingParams())(logits, []) == 1
    assert Sampler(SamplingParams(repetition_penalty=1.2))(logits, [1]) == 2


def test_greedy_is_torch_argmax_on_ties_nan_and_views():
    """Greedy picks what torch.argmax picks (first of equal largest; a NaN), on contiguous logits and views."""
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(50304, generator=g), torch.zeros(7), torch.tensor([1.0, 3.0, 3.0, 2.0]),
             torch.tensor([1.0, float("nan"), 5.0, float("nan")]), torch.tensor([-float("inf"), -1.0]),
             torch.randn(3, 64, generator=g)[:, 5], torch.randn(4, 9, generator=g)[-1]]
    for x in cases:
        assert Sampler(SamplingParams())(x, []) == int(torch.argmax(x)), x


def test_seeded_sampling_is_reproducible_and_follows_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    draws = [Sampler(SamplingParams(temperature=1.0, seed=s))(logits, []) for s in range(3000)]
    again = [Sampler(SamplingParams(temperature=1.0, seed=s))(logits, []) for s in range(50)]
    assert draws[:50] == again
    freq = torch.bincount(torch.tensor(draws), minlength=3).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.04)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2),
                                 dict(top_k=-1), dict(max_tokens=0), dict(repetition_penalty=0),
                                 dict(stop=("",))])
def test_bad_params_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad).validate()


class CharTokenizer:
    """Each id is a byte; decoding shows incomplete UTF-8 as U+FFFD like byte-level BPE does."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def run_stream(text: str, stop: tuple[str, ...]) -> tuple[str, bool, list[str]]:
    s = TextStream(CharTokenizer(), stop)
    pieces, hit = [], False
    for b in text.encode():
        piece, hit = s.push(b)
        pieces.append(piece)
        if hit:
            break
    pieces.append(s.flush())
    return "".join(pieces), hit, pieces


def test_stream_stops_at_stop_string_without_leaking_it():
    text, hit, pieces = run_stream("hello END world", ("END",))
    assert hit and text == "hello "
    assert all("E" not in p for p in pieces)


def test_stream_holds_back_partial_utf8_and_prefixes():
    text, hit, pieces = run_stream("café ✓ and EN", ("END",))
    assert not hit and text == "café ✓ and EN"
    assert all("\ufffd" not in p for p in pieces)


def test_stream_of_real_tokens_equals_full_decode(loaded):
    """Windowed decoding gives exactly the text of decoding all ids, piece by piece."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    tok = loaded("qwen3_moe").tokenizer

    @settings(max_examples=150, deadline=None)
    @given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60))
    def check(text):
        ids = tok.encode(text)
        s = TextStream(tok, ())
        pieces = [s.push(i)[0] for i in ids]
        assert "".join(pieces) + s.flush() == tok.decode(ids)

    check()
