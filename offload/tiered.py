"""Routed experts in tiers: RAM and an accelerator's memory within byte budgets; flash holds them all.

An expert is resident in a tier at some bit-width r (its head and top r planes, as read from the
store, plus its compute form); raising it to b bits reads only planes r..b-1. Every byte a tier
holds is counted against its budget when it is reserved, before the read or copy that fills it,
so a budget is never exceeded, transient copies included: an expert streamed from flash for one
use holds a reservation until its computation ends.

One layer's work (`LayerExperts.__call__`):
1. the layer's routing gives its demand (expert -> tokens); the cache policy observes it;
2. experts resident in the accelerator tier are submitted to the accelerator's compute worker;
3. the missing experts are submitted to the flash I/O pool, hottest expert first (each waits for
   room: unpinned experts are evicted lowest rank first, or it waits for a streamed one to end);
4. meanwhile this thread computes the RAM-resident experts, lightest first, then each fetched
   expert as its read completes; after its use the policy decides whether the expert stays;
5. the next MoE layer's router applied to this layer's input predicts its experts; those not
   resident are read ahead into free room (or over experts the policy ranks lower);
6. results are summed in ascending expert order, whatever ran where, so the output is the same
   as with every expert resident (bit for bit on one backend).

An accelerator is a kernel backend with its own compute and copy workers: CUDA where there is a
GPU; on a machine without one, tests emulate it on the CPU with a budget and workers of its own.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from offload.cache import AHEAD_PRIOR, AHEAD_WEIGHT, CachePolicy, Key, Tier, make_cache_policy
from offload.errors import MoedError
from offload.provider import layer_experts
from offload.routing import group_by_expert, scatter_add
from offload.schedule import LayerCosts, schedule
from offload.store import Store
from quant.kernels import Backend, PreparedExpert, get_backend
from offload.views import LinkView, TierView
from quant.planes import PLANES


TIMINGS_KEPT = 4096  # measured timings waiting for the cost model (the oldest go first)
STALL_SECONDS = 30.0  # a reservation that waits this long means the budget cannot serve the layer
# A RAM budget taken from free memory (`N%free`) gives some back when the process pages: this many major page
# faults in each of PRESSURE_STEPS steps in a row (a step: from one forward pass's first MoE layer to the
# next's) is memory pressure, and lowers the budget by PRESSURE_GIVE of itself, never below PRESSURE_FLOOR of
# what it started at. (On this project's 2-core VM under a cgroup cap, 94% of free memory made the kernel
# reclaim the process's own pages: 60-1800 ms a token for 26-33 at 88-91%.)
PRESSURE_FAULTS = 8
PRESSURE_STEPS = 2
PRESSURE_GIVE = 0.04
PRESSURE_FLOOR = 0.5

log = logging.getLogger("moed.offload")


@dataclass(slots=True)
class Held:
    """An expert in a tier: its stored sections (RAM only), compute form, bit-width and bytes held."""

    bits: int
    sections: list
    form: PreparedExpert
    nbytes: int


@dataclass(slots=True)
class TierStats:
    """Expert uses served from a tier (hits) or fetched into it (misses)."""

    hits: int = 0
    misses: int = 0
    peak: int = 0


class Accelerator:
    """A device experts can run on while the CPU runs others: a backend plus compute and copy workers."""

    def __init__(self, backend: Backend, device: str) -> None:
        self.backend, self.device = backend, device
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="moed-accel")
        self.copy = ThreadPoolExecutor(1, thread_name_prefix="moed-copy")

    @classmethod
    def create(cls, kind: str, cpu_backend: Backend) -> "Accelerator":
        """'cuda' (needs a GPU) or 'emulated' (the CPU backend on workers of its own)."""
        if kind == "cuda":
            return cls(get_backend("cuda"), "cuda:0")
        if kind == "emulated":
            return cls(type(cpu_backend)(), "cpu (emulated accelerator)")
        raise ValueError(f"unknown accelerator {kind!r} (known: cuda, emulated)")

    def ffn(self, x: torch.Tensor, form: PreparedExpert) -> Future:
        """An expert's FFN on the compute worker, with as many torch threads as the caller has: an emulated
        accelerator then computes exactly what the CPU would (a worker thread starts with torch's default)."""
        return self.compute.submit(_with_threads, torch.get_num_threads(), self.backend.ffn, x, form)

    def after(self, copy: Future, x: torch.Tensor) -> Future:
        """An expert's FFN on the compute worker, queued there once `copy` has given its form: the worker never
        waits for a copy (the copy of an expert behind it could be what frees the RAM this one's read needs)."""
        n = torch.get_num_threads()
        return _submit_once_done(self.compute, copy, lambda: _with_threads(n, self.backend.ffn, x, copy.result().form))

    def close(self) -> None:
        """Stop the workers."""
        self.compute.shutdown(wait=True)
        self.copy.shutdown(wait=True)


def _with_threads(n: int, fn, *args):
    """fn(*args) with n torch intra-op threads in this thread."""
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return fn(*args)


@dataclass(frozen=True, slots=True)
class Budgets:
    """Byte budgets: RAM for experts (None: all of them), VRAM (0: no accelerator tier)."""

    ram: int | None = None
    vram: int = 0


class ExpertSizes:
    """Bytes of one expert of a store: stored sections at r bits, compute form per backend (measured)."""

    def __init__(self, store: Store, act: str = "silu") -> None:
        self.store, self.act = store, act
        self._forms: dict[tuple[str, int], int] = {}

    def raw(self, bits: int) -> int:
        """Head plus top `bits` planes, as read from the store."""
        return self.store.layout.section_offset(bits + 1)

    def form(self, backend: Backend, bits: int) -> int:
        """The compute form at `bits` (measured once, on the first layer's expert 0)."""
        key = (backend.name, bits)
        if key not in self._forms:
            sections = self.store.read_expert(self.store.layers[0], 0, bits)
            self._forms[key] = self.store.form(backend, sections, bits, self.act).nbytes
        return self._forms[key]

    def ram(self, backend: Backend, bits: int, planes: bool) -> int:
        """What an expert holds in RAM: its compute form, plus its stored planes if they are kept."""
        return (self.raw(bits) if planes else 0) + self.form(backend, bits)


class TieredExperts:
    """Routed experts from a Store held in RAM / accelerator tiers under a cache policy."""

    def __init__(self, store: Store, bits: int = PLANES, backend: str | Backend = "reference", act: str = "silu",
                 budgets: Budgets = Budgets(), policy: str | CachePolicy = "moed",
                 accelerator: Accelerator | None = None, io_threads: int = 2, prefetch: bool = True,
                 sizes: ExpertSizes | None = None, keep_planes: bool | None = None,
                 costs: LayerCosts | None = None) -> None:
        if not 1 <= bits <= PLANES:
            raise ValueError(f"bits must be in 1..{PLANES}, got {bits}")
        self.store, self.bits, self.act = store, bits, act
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        self.policy = make_cache_policy(policy, len(store.layers)) if isinstance(policy, str) else policy
        self.accel = accelerator
        # with an accelerator and op times, each layer runs the intra-layer scheduler's plan (offload.schedule):
        # which experts run where, which are copied to the accelerator first, in which order reads are issued
        self.costs = costs if accelerator is not None else None
        self.plans = 0  # layers run by a plan
        self.on_read_ahead: Callable[[int, list[int]], None] | None = None  # (layer, experts) as reads ahead begin
        self.prefetch_enabled = prefetch
        self.sizes = sizes or ExpertSizes(store, act)
        # stored planes are kept beside the compute form only when asked (to raise an expert's bits
        # by reading just the missing planes) or to make an accelerator's form from
        self.keep_planes = keep_planes if keep_planes is not None else accelerator is not None
        n_total = sum(store.n_experts(layer) for layer in store.layers)
        self.experts_total = n_total
        # no budget: room for every expert, and for one expert's planes while its form is made
        ram = self.expert_bytes(bits) * n_total + self.raw_bytes(bits) if budgets.ram is None else int(budgets.ram)
        self.tiers = {"ram": Tier("ram", ram), "vram": Tier("vram", int(budgets.vram) if accelerator else 0)}
        one = self.read_bytes(bits)
        if ram < one:
            raise MoedError(f"the RAM budget ({ram} bytes) is smaller than one expert at {bits} bits "
                               f"({one} bytes)")
        self._held: dict[str, dict[Key, Held]] = {"ram": {}, "vram": {}}
        self.stats = {"ram": TierStats(), "vram": TierStats()}
        self.links = {"flash->ram": LinkView("flash", "ram"), "ram->vram": LinkView("ram", "vram")}
        self._link_active = {link: 0 for link in self.links}
        self._link_since = {link: 0.0 for link in self.links}
        self._cv = threading.Condition()
        self._pinned: dict[Key, int] = {}
        self._busy: set[Key] = set()  # being read (their reservation is not evictable)
        self._inflight: dict[Key, Future] = {}  # prefetches
        self._predicted: dict[int, set[int]] = {}  # each layer's experts as last predicted (read ahead)
        self.ahead_precision = AHEAD_PRIOR  # share of a prediction the layer then used (averaged)
        self._io = ThreadPoolExecutor(max(1, io_threads), thread_name_prefix="moed-io")
        # reads ahead on a worker of their own: a demand read may wait for one, never the reverse
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix="moed-ahead")
        self._layers: dict[int, LayerExperts] = {}
        self.routers: dict[int, torch.nn.Module] = {}
        # (kind, x, seconds) as measured while serving, for the cost model (profiler CostTimes.observe):
        # "read" (bytes, seconds), "form" (bytes, seconds), "expert" (tokens, seconds per CPU expert)
        self.timings: deque[tuple[str, float, float]] = deque(maxlen=TIMINGS_KEPT)
        self.moe_layers = list(store.layers)
        # memory pressure (PRESSURE_*): on only for a budget taken from free memory (tiered_experts)
        self.yield_to_pressure = False
        self.major_faults: Callable[[], int] = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        self.budget_given_back = 0  # bytes of the RAM budget given back under memory pressure
        self._faults: int | None = None
        self._pressured = 0

    def raw_bytes(self, bits: int) -> int:
        """Bytes of an expert's stored sections at `bits`."""
        return self.sizes.raw(bits)

    def form_bytes(self, backend: Backend, bits: int) -> int:
        """Bytes of an expert's compute form in `backend` at `bits`."""
        return self.sizes.form(backend, bits)

    def read_bytes(self, bits: int) -> int:
        """Bytes a read of one expert at `bits` reserves: its form, and its planes if they are kept (planes
        that are not kept are read into the reading thread's scratch buffer, one expert's worth per I/O
        thread whatever the budget, and are gone once the form is made)."""
        return self.sizes.ram(self.backend, bits, self.keep_planes)

    def expert_bytes(self, bits: int) -> int:
        """Bytes one expert holds in RAM at `bits`: its compute form, plus its stored planes if kept."""
        return self.sizes.ram(self.backend, bits, self.keep_planes)

    # -- the provider interface --

    def experts(self, layer: int) -> "LayerExperts":
        """The callable routed experts of one MoE layer."""
        return layer_experts(self, layer, LayerExperts)

    def attach_routers(self, routers: dict[int, torch.nn.Module]) -> None:
        """The MoE layers' routers, for predicting the next layer's experts (prefetch)."""
        self.routers = dict(routers)

    def preload(self, progress=None) -> None:
        """Fill RAM in layer order while the budget allows (the rest is read on demand)."""
        keys = [(layer, e) for layer in self.store.layers for e in range(self.store.n_experts(layer))]
        for i, key in enumerate(keys):
            if self.tiers["ram"].free() < self.read_bytes(self.bits):
                break
            held = self._fetch(key, self.bits, evict=False)
            if held is not None:
                self._keep(key, held, force=True)
            if progress is not None:
                progress(i + 1, len(keys))

    # -- memory --

    def step(self) -> None:
        """A forward pass begins (its first MoE layer): under memory pressure, give some of the RAM budget back."""
        if not self.yield_to_pressure:
            return
        faults = self.major_faults()
        last, self._faults = self._faults, faults
        if last is None or faults - last < PRESSURE_FAULTS:
            self._pressured = 0
            return
        self._pressured += 1
        if self._pressured < PRESSURE_STEPS:  # one step's faults (code paged in the first time) are not pressure
            return
        with self._cv:
            t = self.tiers["ram"]
            floor = max(int((t.capacity + self.budget_given_back) * PRESSURE_FLOOR), self.read_bytes(self.bits))
            new = max(floor, int(t.capacity * (1 - PRESSURE_GIVE)))
            if new >= t.capacity:
                return
            while t.used > new and (cands := self._evictable("ram")):
                self._evict("ram", min(cands, key=lambda k: (self.policy.rank(k), k)))
            new = max(new, t.used)  # what is being read or used now stays within the budget: less next time
            log.warning("memory pressure (%d major page faults in a step): RAM budget %.0f -> %.0f MiB",
                        faults - last, t.capacity / 2**20, new / 2**20)
            self.budget_given_back += t.capacity - new
            t.capacity = new
        self._pressured = 0

    def _evictable(self, tier: str) -> list[Key]:
        return [k for k in self.tiers[tier].held if k not in self._pinned and k not in self._busy
                and k in self._held[tier]]

    def _reserve(self, tier: str, key: Key, nbytes: int, evict: bool, wait: bool = True) -> bool:
        """Count nbytes for `key` in `tier` (lock held), evicting unpinned experts, lowest rank first,
        and (with `wait`) waiting for streamed ones to end; False if there is no room without."""
        t = self.tiers[tier]
        if nbytes > t.capacity:
            raise MoedError(f"an expert needs {nbytes} bytes but the {tier} budget is {t.capacity}")
        while t.free() < nbytes:
            if not evict:
                return False
            cands = self._evictable(tier)
            if cands:
                self._evict(tier, min(cands, key=lambda k: (self.policy.rank(k), k)))
            elif not wait:
                return False
            elif not self._cv.wait(timeout=STALL_SECONDS):
                raise MoedError(f"no room in the {tier} budget for expert {key} ({nbytes} bytes) after "
                                f"{STALL_SECONDS:.0f} s: {t.used} of {t.capacity} bytes held by {dict(t.held)}, "
                                f"pinned {sorted(self._pinned)}, being read {sorted(self._busy)}")
        t.add(key, t.held.get(key, 0) + nbytes)
        self.stats[tier].peak = max(self.stats[tier].peak, t.used)
        return True

    def _link_begin(self, link: str) -> None:
        """A transfer over `link` starts (lock held)."""
        if self._link_active[link] == 0:
            self._link_since[link] = time.perf_counter()
        self._link_active[link] += 1

    def _moved(self, link: str, nbytes: int) -> None:
        """A transfer over a link ends, having moved nbytes (0: failed) (lock held). The link's busy time
        is the time at least one transfer was under way: transfers side by side count once, so
        busy / transfers is the time per transfer at the throughput the link reached."""
        self._link_active[link] -= 1
        k = self.links[link]
        busy = k.busy_seconds
        if self._link_active[link] == 0:
            busy += time.perf_counter() - self._link_since[link]
        self.links[link] = LinkView(k.source, k.target, k.bytes_moved + nbytes, k.transfers + (nbytes > 0), busy)

    def _unpin(self, *keys: Key) -> None:
        """One use of each of these pinned experts has ended (lock held)."""
        for key in keys:
            n = self._pinned.get(key, 0) - 1
            if n > 0:
                self._pinned[key] = n
            else:
                self._pinned.pop(key, None)
        self._cv.notify_all()

    def _evict(self, tier: str, key: Key) -> None:
        self._let_go(tier, self._held[tier].pop(key, None))
        self.tiers[tier].remove(key)
        self._cv.notify_all()

    def _let_go(self, tier: str, held: Held | None) -> None:
        """A form the tier no longer holds: its backend may make a later form in its memory (Backend.recycle)."""
        if held is not None:
            (self.backend if tier == "ram" else self.accel.backend).recycle(held.form)

    def _release(self, tier: str, key: Key, nbytes: int) -> None:
        t = self.tiers[tier]
        left = t.held.get(key, 0) - nbytes
        t.remove(key)
        if left > 0:
            t.add(key, left)
        self._cv.notify_all()

    # -- fetching --

    def _fetch(self, key: Key, bits: int, evict: bool = True) -> Held | None:
        """Read `key` at `bits` into RAM within the budget (only the planes a resident copy lacks)."""
        layer, e = key
        with self._cv:
            old = self._held["ram"].get(key)
            if old is not None and old.bits >= bits:
                return old
            self._busy.add(key)
            try:
                if old is not None and old.sections:  # only the missing planes and a new form...
                    need = self.raw_bytes(bits) - self.raw_bytes(old.bits) + self.form_bytes(self.backend, bits)
                    if not self._reserve("ram", key, need, evict, wait=False):
                        old = None  # ...if they fit now; a read that waits holds nothing
                if old is None or not old.sections:
                    if key in self._held["ram"]:
                        self._evict("ram", key)
                    old = None
                    need = self.read_bytes(bits)
                    if not self._reserve("ram", key, need, evict):
                        self._busy.discard(key)
                        return None
            except BaseException:
                self._busy.discard(key)
                raise
            self._link_begin("flash->ram")
        try:
            t0 = time.perf_counter()
            if old is None:  # planes not kept: read into this thread's scratch buffer, gone once the form is made
                sections = self.store.read_expert(layer, e, bits, scratch=not self.keep_planes)
                got = self.raw_bytes(bits)
            else:
                sections = old.sections + self.store.read_sections(layer, e, old.bits + 1, bits + 1)
                got = self.raw_bytes(bits) - self.raw_bytes(old.bits)
            t1 = time.perf_counter()
            form = self.store.form(self.backend, sections, bits, self.act)
            self.timings.extend((("read", got, t1 - t0), ("form", got, time.perf_counter() - t1)))
        except BaseException:
            with self._cv:
                self._moved("flash->ram", 0)
                self._busy.discard(key)
                self._release("ram", key, need)
            raise
        with self._cv:
            self._moved("flash->ram", got)
            if old is not None:  # the old form is freed now: the tier keeps sections + new form
                self._release("ram", key, old.form.nbytes)
            if not self.keep_planes:  # only the compute form stays (the planes were in scratch, not reserved)
                sections = []
            self._busy.discard(key)
            self._cv.notify_all()
        return Held(bits, sections, form, (self.raw_bytes(bits) if sections else 0) + form.nbytes)

    def _keep(self, key: Key, held: Held | None, force: bool = False, tier: str = "ram") -> bool:
        """After a fetched (or, in "vram", copied) expert's use: keep it in the tier if the policy admits it,
        else free its room; None (its read or copy failed) only frees the room (lock taken)."""
        with self._cv:
            t = self.tiers[tier]
            t.remove(key)  # its reservation; re-added below if kept
            old = self._held[tier].pop(key, None)  # (a copy at fewer bits, which this one replaces)
            if old is not held:
                self._let_go(tier, old)
            kept = held is not None
            if kept:
                pinned = [k for k in self._pinned if k != key] + [k for k in self._busy if k != key]
                victims = [] if force and t.free() >= held.nbytes else self.policy.victims(key, held.nbytes, t,
                                                                                             pinned)
                kept = victims is not None and all(v in self._held[tier] for v in victims)
            if kept:
                for v in victims:
                    self._evict(tier, v)
                kept = t.free() >= held.nbytes
            if kept:
                t.add(key, held.nbytes)
                self._held[tier][key] = held
                self.stats[tier].peak = max(self.stats[tier].peak, t.used)
            else:
                self._let_go(tier, held)
            self._cv.notify_all()
            return kept

    def _to_accel(self, key: Key, held: Held) -> None:
        """Copy an expert into the accelerator tier if the policy admits it there (copy worker)."""
        if self.accel is None or self.tiers["vram"].capacity == 0:
            return
        nbytes = self.form_bytes(self.accel.backend, held.bits)
        with self._cv:
            if key in self._held["vram"] or key in self.tiers["vram"].held:
                return
            pinned = [k for k in self._pinned if k != key]
            victims = self.policy.victims(key, nbytes, self.tiers["vram"], pinned)
            if victims is None or not all(v in self._held["vram"] for v in victims):
                return
            for v in victims:
                self._evict("vram", v)
            if self.tiers["vram"].free() < nbytes:
                return
            self._reserve("vram", key, nbytes, evict=False)

        def copy() -> None:
            copied = self._stage(held, nbytes)
            with self._cv:
                self._held["vram"][key] = copied
                self._cv.notify_all()

        self.accel.copy.submit(copy)

    def _stage_room(self, key: Key, bits: int) -> int | None:
        """Reserve room in the accelerator tier for a planned copy of `key` (lock held): its form's bytes,
        or None if it is there (or on its way) already or there is no room without waiting."""
        nbytes = self.form_bytes(self.accel.backend, bits)
        if key in self.tiers["vram"].held or nbytes > self.tiers["vram"].capacity:
            return None
        return nbytes if self._reserve("vram", key, nbytes, evict=True, wait=False) else None

    def _stage(self, src: "Held | Future", nbytes: int) -> Held:
        """On the copy worker: the accelerator's form of an expert held in RAM (or being read into it), a
        transfer over the ram->vram link."""
        held = src.result() if isinstance(src, Future) else src
        with self._cv:
            self._link_begin("ram->vram")
        form = None
        try:
            form = self.store.form(self.accel.backend, held.sections, held.bits, self.act)
        finally:
            with self._cv:
                self._moved("ram->vram", form.nbytes if form is not None else 0)
        return Held(held.bits, [], form, nbytes)

    def _prefetch(self, key: Key) -> None:
        """Read an expert ahead into free room, or over experts the policy ranks lower; never waits."""
        with self._cv:
            if key in self._held["ram"] or key in self._busy or key in self._inflight:
                return
            t = self.tiers["ram"]
            need = self.read_bytes(self.bits)
            victims = self.policy.victims(key, need, t, list(self._pinned) + list(self._busy), self.ahead_precision)
            if victims is None or not all(v in self._held["ram"] for v in victims):
                return
            for v in victims:
                self._evict("ram", v)
            if t.free() < need:
                return

            def run() -> None:
                try:
                    held = self._fetch(key, self.bits, evict=False)
                    if held is not None:
                        self._keep(key, held)
                finally:
                    with self._cv:
                        self._inflight.pop(key, None)

            self._inflight[key] = self._ahead.submit(run)

    # -- status --

    def tier_views(self) -> list[TierView]:
        """RAM and (with an accelerator) VRAM: budgets, bytes held, hits, bits of the resident experts."""
        out = []
        with self._cv:
            for name in ("vram", "ram") if self.accel is not None else ("ram",):
                t, s = self.tiers[name], self.stats[name]
                by_bits: dict[int, int] = {}
                for h in self._held[name].values():
                    by_bits[h.bits] = by_bits.get(h.bits, 0) + 1
                device = self.accel.device if name == "vram" else "cpu"
                out.append(TierView(name, device, t.capacity, t.used, len(self._held[name]), self.experts_total,
                                    s.hits, s.misses, by_bits))
        return out

    def link_views(self) -> list[LinkView]:
        """Bytes moved over flash->RAM and RAM->VRAM."""
        with self._cv:
            return [k for k in self.links.values() if k.target != "vram" or self.accel is not None]

    def resident(self, tier: str = "ram") -> dict[Key, int]:
        """Resident experts of a tier and their bit-widths."""
        with self._cv:
            return {k: h.bits for k, h in self._held[tier].items()}

    def held_bytes(self, tier: str = "ram") -> int:
        """Bytes the tier's resident experts hold, counted from the experts themselves."""
        with self._cv:
            return sum(h.nbytes for h in self._held[tier].values())

    def close(self) -> None:
        """Stop the I/O and accelerator workers."""
        for f in list(self._inflight.values()):
            f.result()
        self._ahead.shutdown(wait=True)
        self._io.shutdown(wait=True)
        if self.accel is not None:
            self.accel.close()

    @property
    def bytes_read(self) -> int:
        """Bytes read from the experts file so far."""
        return self.store.reader.bytes_read


class LayerExperts:
    """One layer's routed experts, run where they are: x [T, D], routing -> sum_k w[t, k] * expert_k(x[t])."""

    def __init__(self, provider: TieredExperts, layer: int) -> None:
        self.p = provider
        self.layer = layer

    def __call__(self, x: torch.Tensor, routing) -> torch.Tensor:
        t_enter = time.perf_counter()
        p, layer, bits = self.p, self.layer, self.p.bits
        if layer == p.moe_layers[0]:
            p.step()
        one = x.shape[0] == 1
        if one:  # one token: its k experts (distinct) in routing order, one use each
            groups, order = [], routing.experts[0].tolist()
            counts = dict.fromkeys(order, 1)
        else:
            groups = group_by_expert(routing)
            order, counts = [e for e, _, _ in groups], {e: int(tok.numel()) for e, tok, _ in groups}
        with p._cv:
            p.policy.observe(layer, counts, _router_scores(routing))
            if pred := p._predicted.pop(layer, None):  # how good the read ahead's prediction for this layer was
                p.ahead_precision += AHEAD_WEIGHT * (len(pred & counts.keys()) / len(pred) - p.ahead_precision)
            accel = [e for e in counts if (h := p._held["vram"].get((layer, e))) is not None and h.bits >= bits]
            ram = [e for e in counts if e not in accel
                   and (h := p._held["ram"].get((layer, e))) is not None and h.bits >= bits]
            for e in accel + ram:  # used as held: pinned until its computation ends
                p._pinned[(layer, e)] = p._pinned.get((layer, e), 0) + 1
            missing = sorted((e for e in counts if e not in accel and e not in ram), key=lambda e: (-counts[e], e))
            if p.accel is not None:
                p.stats["vram"].hits += len(accel)
                p.stats["vram"].misses += len(counts) - len(accel)
            p.stats["ram"].hits += len(accel) + len(ram)
            p.stats["ram"].misses += len(missing)
            held = {e: p._held["vram"][(layer, e)] for e in accel}
            held.update({e: p._held["ram"][(layer, e)] for e in ram})
            staged: dict[int, int] = {}  # expert -> accelerator bytes reserved for its planned copy
            reads, copies = missing, []
            if p.costs is not None:
                plan = self._plan(counts, accel, ram, held)
                reads, p.plans = list(plan.reads) + [e for e in missing if e not in plan.reads], p.plans + 1
                for e in plan.copies:  # copy stream order; an expert with no room runs on the CPU
                    if (nbytes := p._stage_room((layer, e), bits)) is not None:
                        staged[e] = nbytes
                        copies.append(e)
                ram = [e for e in ram if e not in staged]
        unpinned: set[int] = set()
        done: dict[int, torch.Tensor | Future] = {}  # expert -> its output, or the future of it
        after: list[_Once] = []  # what follows each expert's use (keep or free it, unpin), run once each

        def then(f: Future, fn, *args) -> None:
            after.append(_Once(fn, *args))
            f.add_done_callback(after[-1])

        def unpin(*es: int) -> None:  # once per expert, whichever comes first: its use ending or an error
            if es:
                with p._cv:  # (callbacks on other threads unpin too: checked and marked under the lock)
                    if es := [e for e in es if e not in unpinned]:
                        unpinned.update(es)
                        p._unpin(*((layer, e) for e in es))

        fetches: dict[int, Future] = {}
        try:
            rows = {e: tok for e, tok, _ in groups}

            def inp(e: int) -> torch.Tensor:
                return x if one else x[rows[e]]  # one token: every expert's input is x itself

            fetches.update((e, p._io.submit(_after, p._inflight.get((layer, e)), p._fetch, (layer, e), bits))
                           for e in reads)
            for e in accel:
                done[e] = p.accel.ffn(inp(e), held[e].form)
                done[e].add_done_callback(lambda _f, e=e: unpin(e))
            for e in copies:  # planned copies (after their reads), then their use on the accelerator
                src = fetches.pop(e) if e in fetches else held[e]
                # one being read is queued on the copy stream once read: a copy waiting there for a read that
                # waits for RAM another copy behind it would free would hold both up
                copy = _submit_once_done(p.accel.copy, src if isinstance(src, Future) else None, p._stage, src,
                                         staged[e])
                done[e] = p.accel.after(copy, inp(e))
                then(done[e], self._staged_used, e, copy, src, unpin)
            self._prefetch_next(x)
            cpu = p.backend

            def run(e: int, form: PreparedExpert, *following) -> None:
                """Expert e on the CPU, then following[0](*following[1:]): side by side on the backend's workers
                if it has them."""
                if cpu.concurrent:
                    done[e] = cpu.pool.submit(cpu.ffn, inp(e), form)
                    then(done[e], *following)
                else:
                    done[e] = cpu.ffn(inp(e), form)
                    following[0](*following[1:])

            def keep(e: int, h: Held) -> None:
                if p._keep((layer, e), h):
                    p._to_accel((layer, e), h)

            def run_part(part: list[int], parallel: bool = False) -> dict[int, torch.Tensor]:
                """Resident experts one after another on one thread (one token: one backend call, split over the
                backend's own threads with `parallel`); unpinned once all have run."""
                try:
                    if one:
                        return dict(zip(part, cpu.ffn_many(x, [held[e].form for e in part], parallel)))
                    return {e: cpu.ffn(inp(e), held[e].form) for e in part}
                finally:
                    unpin(*part)

            together = one and cpu.threads_inside and not missing and not accel
            if together:  # one token, nothing to wait for: one call, split over the backend's own threads
                shares, inline = [], ram
            else:  # resident experts: one share per worker (one hand-off each, not one per expert); with nothing
                # to wait for, the caller runs the last share itself
                shares = _shares(ram, counts, cpu.threads if cpu.concurrent else 1)
                inline = shares.pop() if shares and not missing and not accel else []
            parts = [cpu.pool.submit(run_part, s) if cpu.concurrent else run_part(s) for s in shares]
            ran = run_part(inline, parallel=together)
            if fetches:
                cpu.idle()  # (what spins on the CPU's threads while reads go on only slows them)
            while fetches:  # in the order reads complete: a streamed expert frees its room after its use
                ready, _ = wait(list(fetches.values()), return_when=FIRST_COMPLETED)
                for e in [e for e, f in fetches.items() if f in ready]:
                    h = fetches.pop(e).result()
                    run(e, h.form, keep, e, h)
                h = None  # (each streamed expert's form is freed once it has run and is not kept)
            for part in parts:
                ran.update(part.result() if isinstance(part, Future) else part)
            ys = [(ran[e] if e in ran else done[e].result() if isinstance(done[e], Future) else done[e])
                  .to(device=x.device, dtype=x.dtype) for e in order]
            if one:  # one token: its k outputs weighted and summed as one product, not k adds
                out = torch.mm(routing.weights.reshape(1, -1), torch.cat(ys))
            else:
                out = torch.zeros_like(x)
                for (_, tok, wt), y in zip(groups, ys):  # ascending expert id, wherever each ran
                    scatter_add(out, tok, y * wt[:, None])
            if ram and not missing and not accel:  # the CPU's experts alone: the layer's expert work per expert
                p.timings.append(("expert", sum(counts[e] for e in ram) / len(ram),
                                  (time.perf_counter() - t_enter) / len(ram)))
            return out
        finally:
            # nothing of this layer runs on after it: every computation ends, and what follows each has run
            if futures := [f for f in done.values() if isinstance(f, Future)]:
                wait(futures)
            for follow in after:
                follow()
            for e, f in fetches.items():  # after an error: settle the reads
                try:
                    p._keep((layer, e), f.result())
                except Exception:  # noqa: BLE001 - the first error is the one raised
                    pass
            unpin(*ram)
            for e in staged:  # a planned copy never submitted (an error came first): its room and pin go back
                if e not in done:
                    with p._cv:
                        p._release("vram", (layer, e), staged[e])
                    if e in held:
                        unpin(e)

    def _plan(self, counts: dict[int, int], accel: list[int], ram: list[int], held: dict[int, Held]):
        """The scheduler's plan for this layer's demand, from where each expert is held (lock held)."""
        p = self.p
        residency: dict[int, dict[str, int]] = {e: {} for e in counts}
        for e in accel:
            residency[e]["vram"] = held[e].bits
            if (h := p._held["ram"].get((self.layer, e))) is not None:
                residency[e]["ram"] = h.bits
        for e in ram:
            residency[e]["ram"] = held[e].bits
        return schedule(counts, residency, p.bits, p.costs)

    def _staged_used(self, e: int, copy: Future, src: "Held | Future", unpin) -> None:
        """A planned copy has been used (or failed): the accelerator keeps it or frees it; an expert read for
        it is kept in RAM if the policy admits it, and one that was held there is unpinned."""
        key = (self.layer, e)
        self.p._keep(key, None if copy.exception() is not None else copy.result(), tier="vram")
        if isinstance(src, Future):
            if src.exception() is None:
                self.p._keep(key, src.result())
        else:
            unpin(e)

    def _prefetch_next(self, x: torch.Tensor) -> None:
        """Predict the next MoE layer's experts with its router on this layer's input; read them ahead."""
        p = self.p
        if not p.prefetch_enabled or not p.routers or len(p._held["ram"]) >= p.experts_total:
            return  # (every expert held: nothing to read)
        i = p.moe_layers.index(self.layer)
        if i + 1 >= len(p.moe_layers):
            return
        nxt = p.moe_layers[i + 1]
        router = p.routers.get(nxt)
        if router is None:
            return
        with torch.no_grad():
            pred = router(x)
        ranked = torch.bincount(pred.experts.reshape(-1), minlength=p.store.n_experts(nxt))
        order = [e for e in ranked.argsort(descending=True, stable=True).tolist() if ranked[e] > 0]
        with p._cv:
            p._predicted[nxt] = set(order)
        if p.on_read_ahead is not None:
            p.on_read_ahead(nxt, order)
        for e in order:
            p._prefetch((nxt, e))


class _Once:
    """A future's done-callback that calls fn(*args) once, whoever calls first (the future's thread, or the
    layer settling its work), and then lets go of them: a future keeps its callbacks, and one holding a
    streamed expert's form would keep it alive after its room is freed."""

    def __init__(self, fn, *args) -> None:
        self.call: tuple | None = (fn, args)
        self.lock = threading.Lock()

    def __call__(self, _future=None) -> None:
        with self.lock:
            call, self.call = self.call, None
            if call is not None:
                call[0](*call[1])


def _shares(experts: list[int], counts: dict[int, int], n: int) -> list[list[int]]:
    """Experts dealt into at most n non-empty shares of about equal tokens (most tokens first, each to the
    share with the fewest so far)."""
    shares: list[list[int]] = [[] for _ in range(min(n, len(experts)))]
    load = [0] * len(shares)
    for e in sorted(experts, key=lambda e: (-counts[e], e)):
        i = load.index(min(load))
        shares[i].append(e)
        load[i] += counts[e]
    return shares


def _submit_once_done(pool: ThreadPoolExecutor, first: Future | None, fn, *args) -> Future:
    """The future of fn(*args) submitted to pool once `first` is done (whichever way; None: now): no worker of
    pool waits for `first`."""
    if first is None:
        return pool.submit(fn, *args)
    out: Future = Future()

    def relay(f: Future) -> None:
        if f.exception() is not None:
            out.set_exception(f.exception())
        else:
            out.set_result(f.result())

    def submit(_first: Future) -> None:
        try:
            pool.submit(fn, *args).add_done_callback(relay)
        except BaseException as e:  # noqa: BLE001 - (a pool shut down): the error is the copy's
            out.set_exception(e)

    first.add_done_callback(submit)
    return out


def _after(prev: Future | None, fn, *args):
    """fn(*args) once a prefetch of the same expert (if any) has finished."""
    if prev is not None:
        prev.result()
    return fn(*args)


def _router_scores(routing) -> dict[int, float]:
    """Per expert, the mean over tokens of its router probability when among the token's top 2k."""
    probs = routing.logits.float().softmax(-1)
    k = min(2 * routing.experts.shape[-1], probs.shape[-1])
    p, idx = probs.topk(k, dim=-1)
    if probs.shape[0] == 1:  # one token: its own top 2k
        return {e: v for e, v in zip(idx[0].tolist(), p[0].tolist()) if v > 0}
    acc = torch.zeros(probs.shape[-1]).index_add_(0, idx.reshape(-1), p.reshape(-1)) / probs.shape[0]
    return {e: v for e, v in enumerate(acc.tolist()) if v > 0}


# -- options --

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# `--bits auto` never goes below 4: at 3 and 2 bits top-1 agreement with the unquantised model falls to
# 0.68 and 0.48 (0.83 at 4) on the tiny models (bench/results/quant_quality.md); below that, stream at 4
AUTO_BITS = (8, 6, 5, 4)


class Amount(NamedTuple):
    """A budget as given: bytes, a share of the experts' bytes, or a share of the memory free when the tier
    is made (at most one is set; none: no limit)."""

    nbytes: int | None = None
    share: float | None = None
    free: float | None = None


def parse_amount(spec: str | int | float | None, what: str = "budget") -> Amount:
    """Amount(bytes) from 123, "512MiB", "2G"; Amount(share=) from "25%" (of every expert's bytes at 8 bits);
    Amount(free=) from "80%free" (of the memory free when the tier is made, see free_ram_bytes); Amount()
    from None."""
    if spec is None:
        return Amount()
    if isinstance(spec, bool):
        raise ValueError(f"{what}: expected bytes or a percentage, got {spec!r}")
    if isinstance(spec, (int, float)):
        if spec < 0:
            raise ValueError(f"{what} must not be negative (got {spec})")
        return Amount(int(spec))
    text = spec.strip().lower().replace(" ", "")
    try:
        for suffix, field in (("%free", "free"), ("%", "share")):
            if text.endswith(suffix):
                share = float(text[:-len(suffix)]) / 100
                if not 0 < share <= (1 if field == "free" else 10):
                    raise ValueError
                return Amount(**{field: share})
        num = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = _UNITS[text[len(num):]]
        value = float(num) * unit
        if value < 0 or value != value:
            raise ValueError
        return Amount(int(value))
    except (KeyError, ValueError):
        raise ValueError(f"{what}: expected bytes (e.g. 512MiB, 2G), a percentage of the experts' bytes (e.g. "
                         f"25%) or of the free memory (e.g. 80%free), got {spec!r}") from None


def free_ram_bytes() -> int:
    """Memory this process could still take: the system's available memory, or less if a cgroup memory
    limit leaves less (its limit minus what the group holds, file pages it can drop not counted: the
    inactive ones no process maps; mapped ones, such as the libraries' code, are in use)."""
    import psutil

    free = psutil.virtual_memory().available
    group = _cgroup_room()
    return min(free, group) if group is not None else free


def _cgroup_room() -> int | None:
    """Room left under this process's cgroup memory limit (v2 or v1), None without one."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            names = ("memory.max", "memory.current", "inactive_file", "file_mapped")
        elif "memory" in controllers.split(","):  # v1
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file", "total_mapped_file")
        else:
            continue
        try:
            limit = (base / names[0]).read_text().strip()
            if limit == "max" or int(limit) >= 1 << 60:
                continue
            stat = dict(ln.split() for ln in (base / "memory.stat").read_text().splitlines() if " " in ln)
            droppable = max(0, int(stat.get(names[2], 0)) - int(stat.get(names[3], 0)))  # mapped may be inactive too
            used = int((base / names[1]).read_text()) - droppable
        except (OSError, ValueError):
            continue
        return max(0, int(limit) - used)
    return None


@dataclass(frozen=True, slots=True)
class OffloadOptions:
    """How a store's experts are held: bits (1-8 or 'auto'), budgets, cache policy, accelerator.

    Budgets are bytes, a percentage of what all routed experts hold in RAM at 8 bits ("25%"), or a
    percentage of the memory free when the tier is made ("80%free": free_ram_bytes, or the GPU's free
    memory); None: no limit (RAM) or no accelerator tier (VRAM). 'auto' bits: the most of 8, 6, 5, 4 at which every
    expert fits the RAM budget (4 when none does: streamed from flash at 4 bits; see AUTO_BITS).
    accelerator: None (CUDA when there is a GPU and a VRAM budget), 'cuda' or 'emulated'.
    prefetch: read the next layer's predicted experts ahead; None: where something would otherwise sit idle to do
    it (read_ahead_pays).
    """

    bits: int | str = PLANES
    ram_budget: str | int | None = None
    vram_budget: str | int | None = None
    policy: str = "moed"
    accelerator: str | None = None
    prefetch: bool | None = None
    io_threads: int = 2

    def validate(self) -> None:
        """ValueError naming the first bad option."""
        if self.bits != "auto" and not (isinstance(self.bits, int) and 1 <= self.bits <= PLANES):
            raise ValueError(f"bits must be 1-{PLANES} or auto (got {self.bits!r})")
        parse_amount(self.ram_budget, "RAM budget")
        parse_amount(self.vram_budget, "VRAM budget")
        make_cache_policy(self.policy, 1)
        if self.accelerator not in (None, "cuda", "emulated"):
            raise ValueError(f"accelerator must be cuda or emulated (got {self.accelerator!r})")
        if self.io_threads < 1:
            raise ValueError(f"io_threads must be >= 1 (got {self.io_threads})")


def return_freed_memory() -> None:
    """Make glibc hand large freed blocks back to the system at once (mmap for every block >= 128 KiB,
    without the threshold growing as blocks are freed): streamed experts' buffers then stop counting
    in the process's memory when they are dropped, which a memory cap sees. No-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)


def read_ahead_pays(accel: Accelerator | None, backend: Backend) -> bool:
    """Whether reading ahead is worth it by default: with an accelerator (its experts leave the CPU free to
    make forms), or where the CPU has cores its kernels do not use. Where every core computes, a read ahead's
    form takes CPU time from the layer and its wrong guesses (a quarter to a third of them) take the one disk:
    on this project's 2-core VM it made a token 4-15% slower (bench/offload_cpu.py's model, 25% cap, 85%free:
    5 A/B pairs at 4 bits, 30-33 against 32-38 ms; 2 at 8 bits, 116-120 against 126-131 ms)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return accel is not None or cores > getattr(backend, "threads", 1)


def tiered_experts(store: Store, options: OffloadOptions, kernel: str = "reference", act: str = "silu",
                   costs: LayerCosts | Callable[[int], LayerCosts | None] | None = None) -> TieredExperts:
    """A TieredExperts for a store under `options` (budgets resolved, bits chosen, RAM filled). With an
    accelerator, `costs` (or costs(bits), asked only then) gives the op times each layer is planned with;
    None: experts run where they are held."""
    options.validate()
    return_freed_memory()
    backend = get_backend(kernel)
    n_total = sum(store.n_experts(layer) for layer in store.layers)
    sizes = ExpertSizes(store, act)
    ram = parse_amount(options.ram_budget, "RAM budget")
    free = int(ram.free * free_ram_bytes()) if ram.free is not None else None  # measured now, once

    def ram_at(bits: int) -> int | None:
        if ram.share is not None:  # a share of every expert's bytes at the stored 8 bits
            return int(ram.share * sizes.ram(backend, PLANES, False) * n_total)
        return free if free is not None else ram.nbytes

    bits = options.bits
    if bits == "auto":
        fits = [b for b in AUTO_BITS if ram_at(b) is None or ram_at(b) >= sizes.ram(backend, b, False) * n_total]
        bits = fits[0] if fits else 4
    accel = None
    vram = parse_amount(options.vram_budget, "VRAM budget")
    vram_bytes = vram.nbytes
    kind = options.accelerator
    if kind is None and (vram_bytes or vram.share or vram.free) and torch.cuda.is_available():
        kind = "cuda"
    if kind is not None:
        accel = Accelerator.create(kind, backend)
        if vram.share is not None:
            vram_bytes = int(vram.share * sizes.form(accel.backend, PLANES) * n_total)
        elif vram.free is not None:
            if kind != "cuda":
                raise ValueError("a VRAM budget of free memory needs a CUDA accelerator to measure")
            vram_bytes = int(vram.free * torch.cuda.mem_get_info()[0])
    if accel is not None and callable(costs):
        costs = costs(bits)
    prefetch = read_ahead_pays(accel, backend) if options.prefetch is None else options.prefetch
    provider = TieredExperts(store, bits, backend, act, Budgets(ram_at(bits), vram_bytes or 0), options.policy,
                             accel, options.io_threads, prefetch, sizes, costs=costs)
    provider.yield_to_pressure = free is not None
    provider.preload()
    return provider
