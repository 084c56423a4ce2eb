"""CausalLM.step: sequences at different positions, each with its own cache, run as one row."""

from __future__ import annotations

import pytest
import torch

from daemon.models import SUPPORTED

ATOL = 1e-4  # fp32; only the matrix sizes differ from the one-at-a-time path


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (7, 1, 19, 4)]


@pytest.mark.parametrize("arch", SUPPORTED)
@torch.inference_mode()
def test_step_matches_one_sequence_at_a_time(arch, loaded):
    model = loaded(arch).model
    seqs = prompts(loaded(arch).args.vocab_size)
    # reference: each sequence alone, prefill then 3 decode tokens
    want = []
    for ids in seqs:
        cache = model.new_cache(4)
        rows = [model(torch.tensor([ids]), cache, last_only=True)[0, -1]]
        for j in range(3):
            rows.append(model(torch.tensor([[ids[j % len(ids)]]]), cache)[0, -1])
        want.append(torch.stack(rows))  # [4, V]
    # batched: sequences join at different steps, so prefills and decodes share a row
    caches = [model.new_cache(4) for _ in seqs]
    got: list[list[torch.Tensor]] = [[] for _ in seqs]
    schedule = [[0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3], [2, 3], [3]]
    for active in schedule:
        batch = []
        for i in active:
            j = len(got[i])
            new = seqs[i] if j == 0 else [seqs[i][(j - 1) % len(seqs[i])]]
            batch.append((torch.tensor(new), caches[i]))
        logits = model.step(batch)
        assert logits.shape == (len(active), model.args.vocab_size)
        for row, i in enumerate(active):
            got[i].append(logits[row])
    for i, ids in enumerate(seqs):
        assert caches[i].length == len(ids) + 3
        diff = (torch.stack(got[i]) - want[i]).abs().max().item()
        assert diff <= ATOL, f"sequence {i}: {diff}"


@torch.inference_mode()
def test_step_of_one_is_the_plain_forward(loaded):
    model = loaded("qwen3_moe").model
    ids = prompts(loaded("qwen3_moe").args.vocab_size)[0]
    a, b = model.new_cache(), model.new_cache()
    assert torch.equal(model.step([(torch.tensor(ids), a)])[0], model(torch.tensor([ids]), b, last_only=True)[0, -1])


@torch.inference_mode()
def test_routing_observer_sees_every_moe_layer(loaded):
    lm = loaded("deepseek_v2")
    seen: list[tuple[int, int]] = []
    lm.model.observe_routing(lambda layer, r: seen.append((layer, r.experts.shape[0])))
    try:
        lm.model.step([(torch.tensor([1, 2, 3]), lm.model.new_cache()), (torch.tensor([4]), lm.model.new_cache())])
    finally:
        lm.model.observe_routing(None)
    assert seen == [(i, 4) for i in lm.model.moe_layers]
    assert lm.model.moe_layers[0] == 1  # first_k_dense_replace=1: layer 0 is dense and not observed
