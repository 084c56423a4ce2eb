"""Token sampling: penalties, temperature, top-k, top-p, min-p, seeded."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 128
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first out-of-range field."""
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


class Sampler:
    """Picks the next token from logits, in the order transformers applies its processors."""

    def __init__(self, params: SamplingParams) -> None:
        params.validate()
        self.p = params
        self.gen = torch.Generator()
        if params.seed is not None:
            self.gen.manual_seed(params.seed)
        else:
            self.gen.seed()

    def process(self, logits: torch.Tensor, history: list[int]) -> torch.Tensor:
        """Penalised, temperature-scaled and filtered logits [V] (-inf where excluded)."""
        p = self.p
        logits = logits.float()
        if p.repetition_penalty != 1.0 and history:
            ids = torch.tensor(sorted(set(history)), dtype=torch.long, device=logits.device)
            picked = logits[ids]
            logits = logits.clone()
            logits[ids] = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
        if p.temperature == 0:
            return logits
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = logits.sort(descending=False)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum <= (1 - p.top_p)
            drop[-1] = False  # always keep the most likely token
            logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        if p.min_p > 0:
            probs = logits.softmax(-1)
            logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        return logits

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        """Next token id from logits [V] given all ids so far (prompt and output)."""
        logits = self.process(logits, history)
        if self.p.temperature == 0:
            if logits.device.type == "cpu" and logits.dtype == torch.float32:
                # numpy's argmax: the same first largest (or first NaN) index, ~20x faster than torch's on the CPU
                # (6 against 113 us over a 50k vocabulary here: half a percent of a decode token)
                return int(logits.contiguous().numpy().argmax())
            return int(logits.argmax())
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs.cpu(), 1, generator=self.gen))
