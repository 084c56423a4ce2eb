"""One runner for every architecture: moed vs transformers on the same tiny random weights."""

from __future__ import annotations

import pytest
import torch

from daemon.generate import generate
from daemon.models import SUPPORTED
from daemon.sampling import SamplingParams

transformers = pytest.importorskip("transformers")

ATOL = 1e-4  # fp32, as DESIGN.md asks
TIE = 1e-4  # top-two logits closer than this: either greedy choice counts
TEXTS = [
    "The scheduler measures the cost of every expert on the machine at hand, then decides.",
    "naïve café ✓ — 3.14159 + 42 = 45.14159\n\tdef route(x):\n        return x[-1]",
    "  leading spaces, ÜBER-long Wörter, emoji 🙂 and CJK 专家混合",
]


@pytest.fixture(scope="module", params=SUPPORTED)
def pair(request, tiny_model, loaded):
    """(arch, moed LoadedModel, transformers model, transformers tokenizer) on the same files."""
    arch = request.param
    path = tiny_model(arch)
    ref, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), f"transformers saw unexpected/missing weights: {info}"
    ref.eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return arch, loaded(arch), ref, tok


def prompt_ids(tok, n: int = 24) -> list[int]:
    ids = tok(TEXTS[0]).input_ids
    assert len(ids) >= 16
    return ids[:n]


def test_tokenizer_matches(pair):
    _, lm, _, tok = pair
    for text in TEXTS:
        assert lm.tokenizer.encode(text) == tok(text).input_ids
        ids = tok(text).input_ids
        assert lm.tokenizer.decode(ids) == tok.decode(ids, skip_special_tokens=True)


def test_chat_template_matches(pair):
    _, lm, _, tok = pair
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which experts ran?"}]
    assert lm.tokenizer.apply_chat_template(msgs) == tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True)


@torch.inference_mode()
def test_prefill_logits_match(pair):
    _, lm, ref, tok = pair
    x = torch.tensor([prompt_ids(tok)])
    want = ref(x).logits
    got = lm.model(x, lm.model.new_cache())
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= ATOL


@torch.inference_mode()
def test_incremental_decode_matches(pair):
    _, lm, ref, tok = pair
    ids = prompt_ids(tok, 32)
    want = ref(torch.tensor([ids])).logits[0]  # [T, V], full-sequence reference
    cache = lm.model.new_cache(4)  # small on purpose: the cache must grow
    lm.model(torch.tensor([ids[:16]]), cache)
    for t in range(16, len(ids)):
        got = lm.model(torch.tensor([[ids[t]]]), cache)[0, -1]
        assert (got - want[t]).abs().max().item() <= ATOL, f"decode step {t - 16}"
    assert cache.length == len(ids)


@torch.inference_mode()
def test_batch_of_two_matches_single(pair):
    _, lm, ref, tok = pair
    a = prompt_ids(tok, 20)
    b = list(reversed(a))
    both = lm.model(torch.tensor([a, b]), lm.model.new_cache())
    want = ref(torch.tensor([a, b])).logits
    assert (both - want).abs().max().item() <= ATOL


def test_greedy_generation_matches(pair):
    _, lm, ref, tok = pair
    ids = prompt_ids(tok, 16)
    n = 32
    cfg = transformers.GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        out = ref.generate(torch.tensor([ids]), generation_config=cfg, output_scores=True,
                           return_dict_in_generate=True)
    want = out.sequences[0, len(ids):].tolist()
    got = [s.token for s in generate(lm, ids, SamplingParams(max_tokens=n, ignore_eos=True))]
    assert len(got) == n == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:  # only acceptable where the reference itself had a near-tie
            top2 = out.scores[i][0].float().topk(2).values
            assert (top2[0] - top2[1]).item() < TIE, f"token {i}: moed {g} vs transformers {w}"
            break
