"""A router's decision and how experts' work is grouped and summed back (shared by every expert provider)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Routing:
    """A router's decision for T tokens."""

    experts: torch.Tensor  # [T, K] int64
    weights: torch.Tensor  # [T, K] same dtype as hidden states
    logits: torch.Tensor  # [T, E] raw router logits


def group_by_expert(routing: Routing) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(expert, token indices, weights) for every expert that got tokens, ascending expert id."""
    flat = routing.experts.reshape(-1)
    if flat.numel() == 1 or routing.experts.shape[0] == 1:  # one token: no sorting needed
        zero = torch.zeros(1, dtype=torch.long, device=flat.device)
        return [(e, zero, w) for e, w in zip(flat.tolist(), routing.weights.reshape(-1, 1).unbind(0))]
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=1).tolist()
    k = routing.experts.shape[1]
    tokens = order // k
    weights = routing.weights.reshape(-1)[order]
    out, start = [], 0
    for e, n in enumerate(counts):
        if n:
            out.append((e, tokens[start:start + n], weights[start:start + n]))
            start += n
    return out


def scatter_add(out: torch.Tensor, rows: torch.Tensor, y: torch.Tensor) -> None:
    """out[rows] += y for distinct rows (index_add_ is pathologically slow on small CPU tensors)."""
    if out.shape[0] == 1:
        out.add_(y)
    else:
        out[rows] += y
