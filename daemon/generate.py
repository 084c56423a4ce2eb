"""Prefill and incremental decode with a KV cache, streaming tokens and timings."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from daemon.loaders.build import LoadedModel
from daemon.sampling import Sampler, SamplingParams


@dataclass(frozen=True, slots=True)
class Step:
    """One generated token: its id, the text it completes, and how long the step took."""

    token: int
    text: str
    seconds: float


@dataclass(slots=True)
class Summary:
    """What a finished generation did."""

    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        """Time to first token (prefill plus first sample)."""
        return self.prefill_seconds

    @property
    def decode_tps(self) -> float:
        """Decode tokens per second (tokens after the first)."""
        n = len(self.tokens) - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    @property
    def prefill_tps(self) -> float:
        """Prompt tokens per second."""
        return len(self.prompt_tokens) / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


class TextStream:
    """Incremental detokenizer that holds back partial UTF-8 and possible stop-string prefixes."""

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.emitted = 0  # characters of the full text already given out
        self.text = ""
        self._confirmed = ""  # text of ids[:_read], complete characters only
        self._prefix = self._read = 0  # window start / end of the confirmed ids

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (new text safe to emit, whether a stop string was hit)."""
        self.ids.append(token)
        self._decode_new()
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at >= 0:
                self.text = self.text[:at]
                return self._take(len(self.text)), True
        safe = len(self.text)
        if self.text.endswith("\ufffd"):  # an incomplete UTF-8 sequence
            safe = len(self.text.rstrip("\ufffd"))
        for s in self.stop:  # hold back a tail that could start a stop string
            for n in range(min(len(s) - 1, safe), 0, -1):
                if self.text[safe - n:safe] == s[:n]:
                    safe -= n
                    break
        return self._take(max(safe, self.emitted)), False

    def _decode_new(self) -> None:
        """Extend `text` by what the newest ids add, decoding a short window rather than everything.

        The window starts one confirmed chunk back, so decoders that treat the start of a text
        specially (a stripped leading space) do so for both texts compared.
        """
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        now = self.tokenizer.decode(self.ids[self._prefix:])
        added = now[len(before):]
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._confirmed += added
            self._prefix, self._read = self._read, len(self.ids)
            added = ""
        self.text = self._confirmed + added  # a provisional tail may end in an incomplete character

    def flush(self) -> str:
        """Everything not yet emitted."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        piece = self.text[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return piece


@torch.inference_mode()
def generate(lm: LoadedModel, prompt: list[int], params: SamplingParams,
             summary: Summary | None = None) -> Iterator[Step]:
    """Yield generated tokens one by one; fill `summary` as it goes."""
    if not prompt:
        raise ValueError("prompt is empty")
    if max(prompt) >= lm.args.vocab_size or min(prompt) < 0:
        raise ValueError(f"prompt token ids must be in [0, {lm.args.vocab_size})")
    sampler = Sampler(params)
    s = summary if summary is not None else Summary(list(prompt))
    s.prompt_tokens = list(prompt)
    cache = lm.model.new_cache(len(prompt) + params.max_tokens)
    stream = TextStream(lm.tokenizer, params.stop)
    eos = set() if params.ignore_eos else set(lm.tokenizer.eos_ids)
    history = list(prompt)
    t0 = time.perf_counter()
    logits = lm.model(torch.tensor([prompt]), cache, last_only=True)[0, -1]
    for i in range(params.max_tokens):
        tok = sampler(logits, history)
        now = time.perf_counter()
        dt = now - t0
        if i == 0:
            s.prefill_seconds = dt
        else:
            s.decode_seconds += dt
        s.step_seconds.append(dt)
        t0 = now
        if tok in eos:
            s.finish_reason = "stop"
            break
        history.append(tok)
        s.tokens.append(tok)
        piece, stopped = stream.push(tok)
        s.text += piece
        yield Step(tok, piece, dt)
        if stopped:
            s.finish_reason = "stop"
            break
        if i + 1 < params.max_tokens:
            logits = lm.model(torch.tensor([[tok]]), cache)[0, -1]
    else:
        s.finish_reason = "length"
    s.text += stream.flush()
