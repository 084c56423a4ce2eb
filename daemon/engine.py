"""The request engine: queue, continuous batching, per-request sampling, keep-alive; one loop thread.

`step()` is schedule -> run -> postprocess: between steps cancelled and expired requests leave and
waiting ones join; one model step runs every running sequence (prefills and decodes together);
each sequence then samples with its own sampler and streams its token to its handle.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from daemon.config import Config, moed_home
from daemon.errors import MoedError
from daemon.generate import TextStream
from daemon.loaders.build import LoadedModel, load_model
from daemon.metrics import Metrics
from daemon.models.cache import KVCache
from daemon.records import (Failed, Finished, FinishRecord, GenRequest, ModelView, Prompt, QueueView,
                            RequestSummary, TokenEvent, check_params)
from daemon.request_errors import NotFound, Precondition, RequestError, Unavailable
from daemon.sampling import Sampler, SamplingParams
from daemon.scheduler import Scheduler

log = logging.getLogger("moed.engine")
WARMUP_PROMPT = "Warm up."


@dataclass(slots=True, eq=False)
class Sequence:
    """The engine's state of one request."""

    id: int
    request_id: str
    prompt: list[int]
    params: SamplingParams
    sampler: Sampler
    text: TextStream
    eos: frozenset[int]
    deadline: float | None
    arrived: float
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False
    cancel_at: float = 0.0
    cache: KVCache | None = None
    pending: list[int] = field(default_factory=list)
    history: list[int] = field(default_factory=list)
    generated: int = 0
    admitted_at: float = 0.0
    admitted_step: int = 0
    first_at: float = 0.0
    last_at: float = 0.0
    prefill_seconds: float = 0.0
    done: bool = False


class RoutingCounts:
    """How often each expert of each MoE layer was routed to; the observer collects, flush() adds up."""

    def __init__(self, layers: list[int], n_experts: int) -> None:
        self.layers = layers
        self.counts = torch.zeros(len(layers), n_experts, dtype=torch.int64)  # [moe layers, experts]
        self._offsets = (torch.arange(len(layers)) * n_experts)[:, None]  # [L, 1]
        self._seen: list[torch.Tensor] = []

    def observe(self, layer: int, routing) -> None:
        """Routing observer: remember the chosen experts (runs inside every MoE block, so only appends)."""
        self._seen.append(routing.experts)

    def flush(self) -> None:
        """Add the last step's routing to the counts: one bincount over every layer."""
        seen, self._seen = self._seen, []
        if len(seen) != len(self.layers):  # a failed or retried step: count what ran, layer by layer
            seen = seen[-len(self.layers):] if len(seen) > len(self.layers) else []
        if seen:
            flat = (torch.stack([e.reshape(-1) for e in seen]) + self._offsets).reshape(-1)  # [L * T * K]
            self.counts.view(-1).add_(torch.bincount(flat, minlength=self.counts.numel()))


class Handle:
    """A submitted request: iterate its events; cancel it from any thread."""

    def __init__(self, engine: "Engine", seq: Sequence) -> None:
        self._engine, self.seq = engine, seq

    def events(self) -> Iterator[TokenEvent | Finished]:
        """TokenEvents, then one Finished; a Failed event is raised as its error."""
        while True:
            ev = self.seq.events.get()
            if isinstance(ev, Failed):
                raise ev.error
            yield ev
            if isinstance(ev, Finished):
                return

    def cancel(self) -> None:
        """Ask the engine to drop the request at the next step boundary (no-op once finished)."""
        self._engine.cancel(self.seq)


def model_name(path: str | os.PathLike) -> str:
    """A model's name: its folder name, or its file name without .gguf."""
    p = Path(path)
    return p.name.removesuffix(".gguf") if p.is_file() else p.name


class Engine:
    """Serves one model: accepts requests from any thread, runs them in batches on its loop thread."""

    def __init__(self, config: Config, metrics: Metrics | None = None,
                 loader: Callable[[str], LoadedModel] | None = None,
                 on_state: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        if loader is None:
            loader = functools.partial(load_model, offload=config.offload(), dense_bits=config.dense_bits)
        self._loader, self.on_state = loader, on_state
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._sched: Scheduler[Sequence] = Scheduler(config.max_batch, config.max_queue)
        self._lm: LoadedModel | None = None
        self._tokenizer_only: LoadedModel | None = None  # tokenizer and args survive an idle unload
        self._view: ModelView | None = None
        self._state = "none"  # none, loading, loaded, idle_unloaded
        self._counts: RoutingCounts | None = None
        self._next_id = 0
        self._completed = 0
        self._stop = False
        self._last_active = time.monotonic()
        self._heartbeat = time.monotonic()
        self.steps = 0  # steps started
        self._step_starts: deque[float] = deque(maxlen=16)
        self._finished: deque[FinishRecord] = deque(maxlen=1024)
        self._thread = threading.Thread(target=self._run, name="moed-engine", daemon=True)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> "Engine":
        """Start the loop thread."""
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop thread (requests still queued get a shutdown finish)."""
        self.cancel_all("shutdown")
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def alive(self, stall: float = float("inf")) -> bool:
        """The loop thread runs and its last heartbeat is younger than `stall` seconds."""
        return self._thread.is_alive() and time.monotonic() - self._heartbeat < stall

    def drain(self) -> None:
        """Refuse new requests (UNAVAILABLE); running and waiting ones go on."""
        with self._lock:
            self._sched.accepting = False

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing runs or waits; False if `timeout` passed first."""
        end = time.monotonic() + timeout
        with self._lock:
            while not self._sched.idle:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(min(left, 0.05))
        return True

    def cancel_all(self, reason: str) -> int:
        """Finish every running and waiting request now with `reason`; return how many."""
        with self._lock:
            items = self._sched.take_all()
            self._wake.notify_all()
        for seq in items:
            self._finish(seq, reason, steps_late=0)
        return len(items)

    # ---- models ----------------------------------------------------------------------------

    def load(self, path: str | os.PathLike) -> ModelView:
        """Load (and warm up) a model, replacing the current one; the engine must be idle."""
        path = self._resolve(str(path))
        with self._lock:
            if self._state == "loading":
                raise Unavailable("a model is already loading")
            if not self._sched.idle:
                raise Precondition(f"{len(self._sched.running) + len(self._sched.waiting)} requests are "
                                   "running or waiting; load another model when they are done")
            previous, self._state = self._state, "loading"
        self._notify("loading")
        t0 = time.perf_counter()
        try:
            lm = self._loader(path)
            if self.config.warmup:
                self._warmup(lm)
        except BaseException:
            with self._lock:
                self._state = previous if self._lm is not None or previous == "none" else "none"
            self._notify(self._state)
            raise
        with self._lock:
            self._install(lm, path, time.perf_counter() - t0)
        log.info("model loaded name=%s seconds=%.2f", self._view.name, self._view.load_seconds)
        self._notify("loaded")
        return self._view

    def unload(self, name: str = "") -> None:
        """Unload the current model (NotFound unless `name` is empty or names it)."""
        with self._lock:
            if self._view is None:
                raise NotFound("no model is loaded")
            self._check_name(name)
            if not self._sched.idle:
                raise Precondition("requests are running or waiting; unload when they are done")
            self._lm, self._view, self._counts, self._state = None, None, None, "none"
        gc.collect()
        log.info("model unloaded")
        self._notify("none")

    def model_view(self) -> ModelView | None:
        """The served model (None when none is loaded)."""
        with self._lock:
            return None if self._view is None else dataclasses.replace(self._view, state=self._state)

    @property
    def loaded(self) -> LoadedModel | None:
        """The served model with its weights (None when none is loaded or it was unloaded when idle)."""
        return self._lm

    @property
    def state(self) -> str:
        """none, loading, loaded or idle_unloaded."""
        return self._state

    def expert_use(self) -> list[tuple[int, list[int]]]:
        """(layer, use count per expert) for every MoE layer since the model loaded."""
        with self._lock:
            lm, counts = self._lm, self._counts
        if lm is None or counts is None:
            return []
        return list(zip(lm.model.moe_layers, counts.counts.tolist()))

    def queue_view(self) -> QueueView:
        """Running and waiting requests, limits and totals."""
        with self._lock:
            s = self._sched
            return QueueView(len(s.running), len(s.waiting), s.max_batch, s.max_queue, self._completed,
                             s.rejected, self.steps)

    def finished(self) -> list[FinishRecord]:
        """The most recent finished requests, oldest first."""
        with self._lock:
            return list(self._finished)

    # ---- requests --------------------------------------------------------------------------

    def tokenize(self, prompt: Prompt, model: str = "", add_special: bool = True) -> tuple[list[int], list[str]]:
        """Token ids of a text or chat prompt, and each token's text."""
        with self._lock:
            lm = self._ready_model(model)
        ids = self._encode(lm, prompt, add_special)
        return ids, [lm.tokenizer.decode([i], skip_special=False) for i in ids]

    def submit(self, req: GenRequest) -> Handle:
        """Validate and queue a request; RequestError subclasses say what is wrong."""
        arrived = time.monotonic()
        with self._lock:
            lm = self._ready_model(req.model)
            name = self._view.name
        ids = self._encode(lm, req.prompt, True)
        if not ids:
            raise RequestError("the prompt is empty after tokenisation")
        ctx = lm.args.max_position_embeddings
        if len(ids) >= ctx:
            raise RequestError(f"the prompt has {len(ids)} tokens but the context of {name} holds {ctx}")
        if req.max_tokens is None:
            max_tokens = min(self.config.default_max_tokens, ctx - len(ids))
        else:
            max_tokens = req.max_tokens
            if max_tokens < 1:
                raise RequestError(f"max_tokens must be >= 1 (got {max_tokens})")
            if max_tokens > ctx:
                raise RequestError(f"max_tokens {max_tokens} exceeds the context of {name} ({ctx} tokens)")
            if len(ids) + max_tokens > ctx:
                raise RequestError(f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds "
                                   f"the context of {name} ({ctx} tokens)")
        params = dataclasses.replace(req.params, max_tokens=max_tokens)
        check_params(params)
        eos = frozenset() if params.ignore_eos else frozenset(lm.tokenizer.eos_ids)
        with self._lock:
            self._next_id += 1
            seq = Sequence(self._next_id, req.request_id, ids, params, Sampler(params),
                           TextStream(lm.tokenizer, params.stop), eos, req.deadline, arrived)
            self._sched.submit(seq)
            self._last_active = arrived
            self._wake.notify_all()
        self.metrics.record_request()
        return Handle(self, seq)

    def cancel(self, seq: Sequence) -> None:
        """Mark a request cancelled; the loop drops it at the next step boundary."""
        with self._lock:
            if seq.done or seq.cancelled:
                return
            seq.cancel_at = time.monotonic()
            seq.cancelled = True
            self._wake.notify_all()

    # ---- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._stop and (self._sched.idle or self._state == "loading"):
                        self._heartbeat = time.monotonic()
                        timeout = self._idle_timeout()
                        if timeout is not None and timeout <= 0:
                            self._idle_unload()
                            continue
                        self._wake.wait(timeout if timeout is not None else 1.0)
                    if self._stop:
                        return
                    reload = self._state == "idle_unloaded"
                if reload:
                    self._reload()
                    continue
                self._heartbeat = time.monotonic()
                try:
                    self.step()
                except Exception as e:  # a bug outside any one request: fail the batch, keep serving
                    log.exception("engine step failed")
                    with self._lock:
                        items = list(self._sched.running)
                    for seq in items:
                        self._fail(seq, e)

    @torch.inference_mode()
    def step(self) -> int:
        """One engine step: schedule -> run -> postprocess; returns the batch size run."""
        now = time.monotonic()
        with self._lock:
            plan = self._sched.schedule(now)
            lm, steps = self._lm, self.steps
        for seq, reason in plan.dropped:
            event = seq.deadline if reason == "deadline" else seq.cancel_at
            self._finish(seq, reason, steps_late=sum(t > event for t in self._step_starts))
        running = plan.running
        if not running:
            return 0
        for seq in plan.admitted:
            seq.admitted_at, seq.admitted_step = now, steps + 1
            seq.cache = lm.model.new_cache(len(seq.prompt) + seq.params.max_tokens)
            seq.pending = list(seq.prompt)
            seq.history = list(seq.prompt)
        prefill = sum(len(s.pending) for s in running if s.generated == 0 and s.first_at == 0.0)
        decode = sum(len(s.pending) for s in running) - prefill
        self.steps += 1
        self._step_starts.append(time.monotonic())
        t0 = time.perf_counter()
        rows = self._forward(lm, running)
        dt = time.perf_counter() - t0
        if self._counts is not None:
            self._counts.flush()
        self.metrics.record_step(dt, len(running), prefill, decode)
        for seq, row in zip(running, rows):
            try:
                if isinstance(row, BaseException):
                    raise row
                self._postprocess(seq, row, dt, len(running))
            except Exception as e:  # one request's failure must not take the others down
                log.exception("request failed seq=%d request_id=%s", seq.id, seq.request_id)
                self._fail(seq, e)
        return len(running)

    def _forward(self, lm: LoadedModel, running: list[Sequence]) -> list[torch.Tensor | BaseException]:
        """Logits rows per sequence; if the batched step fails, each sequence is retried alone."""
        batch = [(torch.tensor(s.pending), s.cache) for s in running]
        try:
            return list(lm.model.step(batch))
        except Exception as e:
            if len(running) == 1:
                return [e]
            log.warning("batched step failed (%s); retrying each of %d sequences alone", e, len(running))
        rows: list[torch.Tensor | BaseException] = []
        for item in batch:  # caches advance only after a successful step: a retry rewrites the same slots
            try:
                rows.append(lm.model.step([item])[0])
            except Exception as e:
                rows.append(e)
        return rows

    def _postprocess(self, seq: Sequence, logits: torch.Tensor, dt: float, batch: int) -> None:
        if not math.isfinite(float(logits.sum())):  # one reduction: NaN and inf propagate
            raise FloatingPointError("the model produced non-finite logits")
        tok = seq.sampler(logits, seq.history)
        now = time.monotonic()
        first = seq.first_at == 0.0
        if first:
            seq.first_at, seq.prefill_seconds = now, dt
        if tok in seq.eos:
            self._end(seq, "stop")
            return
        seq.history.append(tok)
        seq.generated += 1
        piece, stopped = seq.text.push(tok)
        since = now - (seq.arrived if first else seq.last_at)
        seq.last_at = now
        seq.events.put(TokenEvent((tok,), piece, dt, since, batch, self.steps))
        self.metrics.record_token(since, first)
        if stopped:
            self._end(seq, "stop")
        elif seq.generated >= seq.params.max_tokens:
            self._end(seq, "length")
        else:
            seq.pending = [tok]

    def _end(self, seq: Sequence, reason: str) -> None:
        with self._lock:
            self._sched.finish(seq)
        self._finish(seq, reason, steps_late=0)

    def _finish(self, seq: Sequence, reason: str, steps_late: int) -> None:
        now = time.monotonic()
        with self._lock:
            if seq.done:
                return
            seq.done = True
            self._completed += 1
            self._last_active = now
            self._finished.append(FinishRecord(seq.id, seq.request_id, reason, seq.generated, steps_late,
                                               self.steps))
            self._wake.notify_all()
            name = self._view.name if self._view else ""
        seq.cache = None
        n = seq.generated
        decode_s = seq.last_at - seq.first_at if n > 1 else 0.0
        summary = RequestSummary(
            prompt_tokens=len(seq.prompt), generated_tokens=n, finish_reason=reason,
            ttft=(seq.first_at - seq.arrived) if seq.first_at else 0.0,
            decode_tps=(n - 1) / decode_s if decode_s > 0 else 0.0,
            queue_seconds=(seq.admitted_at or now) - seq.arrived, prefill_seconds=seq.prefill_seconds,
            prefill_tps=len(seq.prompt) / seq.prefill_seconds if seq.prefill_seconds > 0 else 0.0,
            total_seconds=now - seq.arrived, model=name)
        self.metrics.record_finish(reason, len(seq.prompt))
        log.info("request finished seq=%d request_id=%s reason=%s prompt=%d generated=%d ttft=%.4f "
                 "decode_tps=%.1f steps_late=%d", seq.id, seq.request_id, reason, len(seq.prompt), n,
                 summary.ttft, summary.decode_tps, steps_late)
        seq.events.put(Finished(seq.text.flush(), summary))

    def _fail(self, seq: Sequence, error: Exception) -> None:
        with self._lock:
            if seq.done:
                return
            self._sched.finish(seq)
            seq.done = True
            self._completed += 1
            self._finished.append(FinishRecord(seq.id, seq.request_id, "error", seq.generated, 0, self.steps))
            self._wake.notify_all()
        seq.cache = None
        self.metrics.record_finish("error", len(seq.prompt))
        seq.events.put(Failed(error))

    # ---- helpers ---------------------------------------------------------------------------

    def _ready_model(self, name: str) -> LoadedModel:
        """The model a request may use (lock held); errors say why there is none."""
        if self._state == "loading":
            raise Unavailable("a model is loading; retry when health reports SERVING")
        if self._view is None:
            raise Precondition("no model is loaded (LoadModel first)")
        self._check_name(name)
        return self._lm if self._lm is not None else self._tokenizer_only

    def _check_name(self, name: str) -> None:
        v = self._view
        if name and name not in (v.name, v.path) and Path(name).resolve() != Path(v.path).resolve():
            raise NotFound(f"model {name!r} is not loaded (the loaded model is {v.name!r})")

    def _encode(self, lm: LoadedModel, prompt: Prompt, add_special: bool) -> list[int]:
        tok, vocab = lm.tokenizer, lm.args.vocab_size
        given = [x is not None for x in (prompt.text, prompt.token_ids, prompt.chat)]
        if sum(given) > 1:
            raise RequestError("give the prompt as text, token ids or chat messages, not several")
        if prompt.token_ids is not None:
            bad = [i for i in prompt.token_ids if not 0 <= i < vocab]
            if bad:
                raise RequestError(f"token ids must be in [0, {vocab}); got {bad[0]}"
                                   + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""))
            ids = list(prompt.token_ids)
        elif prompt.chat:
            try:
                text = tok.apply_chat_template([{"role": r, "content": c} for r, c in prompt.chat])
            except MoedError as e:
                raise RequestError(e.message) from None
            ids = tok.encode(text, add_special)
        elif prompt.text:
            ids = tok.encode(prompt.text, add_special)
        else:
            ids = []
        if not ids:
            raise RequestError("the prompt is empty")
        return ids

    def _resolve(self, path: str) -> str:
        p = Path(path).expanduser()
        if not p.exists() and os.sep not in path:
            candidate = self.models_dir() / path
            if candidate.exists():
                p = candidate
        if not p.exists():
            raise NotFound(f"no model at {path!r}")
        return str(p)

    def models_dir(self) -> Path:
        """Where ListModels looks for models."""
        if self.config.models_dir:
            return Path(self.config.models_dir)
        return moed_home() / "models"

    def _install(self, lm: LoadedModel, path: str, seconds: float) -> None:
        """Make lm the served model (lock held)."""
        model, args = lm.model, lm.args
        layers = model.moe_layers
        stacked = [lm.experts.weights(i) for i in layers] if hasattr(lm.experts, "weights") else []
        expert_bytes = sum(t.numel() * t.element_size() for w in stacked for t in (w.gate, w.up, w.down))
        params = sum(p.numel() for p in model.parameters()) + (
            sum(w.gate.numel() * 3 for w in stacked) if stacked else
            len(layers) * args.num_experts * 3 * args.hidden_size * args.moe_intermediate_size)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self._counts = RoutingCounts(layers, args.num_experts)
        model.observe_routing(self._counts.observe)
        self._lm, self._tokenizer_only = lm, lm
        self._view = ModelView(model_name(path), path, args.model_type, "loaded", params,
                               len(model.model.layers), len(layers), args.num_experts, args.num_experts_per_tok,
                               args.max_position_embeddings, args.vocab_size, dtype, seconds, expert_bytes)
        self._state = "loaded"
        self._last_active = time.monotonic()

    def _warmup(self, lm: LoadedModel) -> None:
        """Run the batched and single paths once so first requests do not pay for lazy setup."""
        ids = lm.tokenizer.encode(WARMUP_PROMPT) or [0]
        with torch.inference_mode():
            caches = [lm.model.new_cache(len(ids) + 2) for _ in range(2)]
            lm.model.step([(torch.tensor(ids), caches[0])])
            lm.model.step([(torch.tensor(ids[:1]), caches[0]), (torch.tensor(ids), caches[1])])

    def _idle_timeout(self) -> float | None:
        """Seconds until the keep-alive runs out (lock held); None when it never will."""
        if self.config.keep_alive < 0 or self._state != "loaded":
            return None
        return self._last_active + self.config.keep_alive - time.monotonic()

    def _idle_unload(self) -> None:
        """Drop the weights after the keep-alive, keeping the tokenizer to validate requests (lock held)."""
        lm = self._lm
        self._tokenizer_only = LoadedModel(None, lm.tokenizer, lm.args, None, lm.source)
        self._lm, self._counts, self._state = None, None, "idle_unloaded"
        lm.model.observe_routing(None)
        del lm
        gc.collect()
        log.info("model unloaded after %.0f s idle (keep_alive); the next request loads it again",
                 self.config.keep_alive)
        self._notify("idle_unloaded")

    def _reload(self) -> None:
        """Load the idle-unloaded model again for waiting requests; fail them if that fails."""
        path = self._view.path
        log.info("reloading %s for a request", path)
        t0 = time.perf_counter()
        try:
            lm = self._loader(path)
        except Exception as e:
            log.exception("reload failed")
            with self._lock:
                items = self._sched.take_all()
            for seq in items:
                self._fail(seq, Unavailable(f"could not load the model again: {e}"))
            return
        with self._lock:
            self._install(lm, path, time.perf_counter() - t0)
        self._notify("loaded")

    def _notify(self, state: str) -> None:
        if self.on_state is not None:
            self.on_state(state)
