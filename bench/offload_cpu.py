#!/usr/bin/env python3
"""moed's tiered experts vs llama.cpp (llama-cpp-python) under one memory cap: decode tokens/s on the CPU.

What is measured. A random-weight model with OLMoE-1B-7B layer shapes (hidden 2048, 64 experts,
top-8, expert width 1024; --layers of them) is written once as a GGUF file at Q8_0 for llama.cpp
and converted from the same weights into a moed store, whose experts moed runs at 8 bits (and, for
its own policy, at --extra-bits, e.g. auto: the most bits at which every expert fits the budget) with
the fastest CPU kernel here (moed's native one where it builds), dense weights at 8 bits (--dense-bits 8,
as the Q8_0 file holds them). For a comparison at the same bits, llama.cpp also runs a Q4_0 file of the
same weights when --extra-bits has 4 (LLAMA_QTYPES), and moed's 4-bit runs hold their dense weights at 4
bits too (dense_bits). For each RAM budget share s (--shares) both engines
run under the same memory cap, cap = base + s * E, where E is the bytes of the routed experts in the Q8_0
file and base an allowance for everything else (dense weights, KV cache, Python/torch runtime). base is
measured once: moed runs uncapped with a budget of one token's experts of one layer, and base is its
peak RSS minus the bytes its RAM tier ever held, plus a margin (MARGIN_SHARE, at least MIN_MARGIN).
moed's RAM budget is s of its own experts' bytes (--moed-budget share, the default: what
`--ram-budget s%` means; the native form of an expert takes ~0.98x its Q8_0 bytes) or s * E bytes (--moed-budget bytes:
exactly the room the cap leaves llama.cpp for experts). Below a 100% share, moed's own policy also runs
with `--ram-budget FILL%free` (--fill): a share of the memory the cap leaves when its tier is made, as
a user of a capped container would set it, and as llama.cpp's page cache fills whatever the cap leaves.
FILL is 85 by default. In a separate harness on this VM (4 bits, the 25% cap), 80% held 197 experts
at 38-45 ms a token, 88% 217 at 27-33 ms, 91% 224 at 26-27 ms, and 94% at times thrashed (the
process's own pages reclaimed: 62 and 1831 ms a token); this bench's worker, with more free when its
tier is made, thrashed at 90%. What the tier leaves is the process's working set beyond it.

How. Every run is a fresh worker process put into a cgroup v1 memory group limited to the cap
(it writes its own pid into the group before loading anything; `systemd-run --scope -p
MemoryMax=` where cgroup v1 is not writable; else no cap, and the results say so). Before each
run the model files' pages are dropped from the page cache (posix_fadvise DONTNEED, and
/proc/sys/vm/drop_caches where permitted), so pages cached outside the group do not serve it.
Each run: --threads threads, the same --prompt-tokens token ids as prompt, greedy decoding of
--tokens tokens; decode tokens/s = tokens / decode seconds (all decode steps, prefill excluded).
llama.cpp: Llama(use_mmap=True), eval of the prompt, then one eval per token. moed: load_model
with OffloadOptions(bits, ram_budget, policy) for each --policies and dense_bits=8, daemon.generate.generate;
expert hit rate and bytes read from the store count the decode steps only.

Simulator check. The uncapped base run records a routing trace (profiler.trace.record_trace);
the trace simulator replays it on this machine's profile (the stored `moed profile`, else
bench/results/profile_this_machine.json; moed's runs timed with its kernel's expert curves)
under the matching policy (llama.cpp -> llamacpp, lru -> lru, score -> hybrimoe's cache without its
prefetch; moed's replays read ahead what its engine read ahead, recorded in the trace) with
as many experts in RAM as the run could hold, and its decode seconds per token are compared with
the measured ones. lfu and moed have no simulator policy: no prediction is made for them. moed's
cost model is refined as a serving daemon's is, by the timings its engine reports (`learn`): the
base run's, then each moed run's at 8 bits once that run has been predicted; no run is predicted
from its own timings.

Each configuration runs --repeats times (fresh workers), in turns within a budget (every configuration
once, then every one again), and the fastest is reported. Writes
bench/results/offload_cpu.json, .md and .trace.jsonl. The full run takes about as long as
1 + repeats * (2 + len(policies) + fill runs) * len(shares) model loads and decodes; --quick (tiny
shapes) is a smoke test.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import (MODEL_NAMES, SHAPES, WorkerError, gguf_file, llama_decode, llama_prefill,  # noqa: E402
                           machine, prompt_tokens, random_model, run_worker)
from offload.manifest import EXPERTS, MANIFEST  # noqa: E402
from quant import native  # noqa: E402

if TYPE_CHECKING:
    from profiler.machine import Machine
    from profiler.shapes import ModelShape
    from profiler.trace import Trace

ARCH = "olmoe"
QUICK = {"hidden_size": 256, "num_experts": 8, "num_experts_per_tok": 2}  # on top of daemon.tiny's olmoe
POLICIES = ("lru", "lfu", "score", "moed")
# the simulator replays moed's runs with its engine's own cache policies (profiler.policies.Engine)
SIM_POLICY = {"llama.cpp": "llamacpp", **{p: f"engine:policy={p}" for p in POLICIES}}
CALIBRATE = ("attn", "head", "expert")  # engine timings of the base run's decode that refine moed's cost model
BITS = 8
DENSE_BITS = 8  # moed's dense weights, as the Q8_0 file's (at another width LLAMA_QTYPES has: that, dense_bits)
MARGIN_SHARE, MIN_MARGIN = 0.25, 300 << 20
# llama.cpp's files at other bits than the Q8_0 one, for a comparison at the bits of moed's --extra-bits runs:
# Q4_0 (4.5 bits a weight; moed's 4-bit native form holds ~4.4)
LLAMA_QTYPES = {4: "Q4_0"}
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
MiB = 1 << 20
PROBE_READS = 24  # cold reads of an expert timed for the bound on every policy (add_bounds)


def dense_bits(bits: int | str) -> int:
    """The bits moed's dense weights are held at in a run of its experts at `bits`: as llama.cpp's file at
    those bits holds its own (4: Q4_0), else DENSE_BITS."""
    return bits if bits in LLAMA_QTYPES else DENSE_BITS


# -- workers (run in their own process) --

@dataclass(frozen=True, slots=True)
class RunSpec:
    """One measured run: engine, model file, prompt, decode length, threads; moed's budget, policy, trace."""

    engine: str  # "llama.cpp" or "moed"
    model: str
    prompt: tuple[int, ...]
    decode: int
    threads: int
    policy: str = ""
    bits: int | str = BITS
    ram_budget: str | int | None = None
    trace: str | None = None
    cgroup_procs: str | None = None  # the worker writes its pid here first thing

    @classmethod
    def from_json(cls, text: str) -> "RunSpec":
        """Inverse of json.dumps(asdict(spec))."""
        d = json.loads(text)
        return cls(**{**d, "prompt": tuple(d["prompt"])})


def disk_read_bytes() -> int | None:
    """Bytes this process has caused to be read from storage (/proc/self/io), if the kernel says."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """This process's peak resident set since it started its program, bytes.

    /proc/self/status VmHWM, not getrusage's ru_maxrss: that one keeps the parent's peak across fork and exec.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _delta(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else b - a


def work_llama(spec: RunSpec) -> dict:
    """Prefill and greedy decode in llama.cpp, the GGUF memory-mapped."""
    from llama_cpp import Llama

    prompt = list(spec.prompt)
    t = time.perf_counter()
    llm = Llama(model_path=spec.model, n_ctx=len(prompt) + spec.decode + 16, n_batch=max(512, len(prompt)),
                n_threads=spec.threads, n_threads_batch=spec.threads, use_mmap=True, verbose=False)
    load_s = time.perf_counter() - t
    prefill_s, tok = llama_prefill(llm, prompt)
    read0 = disk_read_bytes()
    steps = llama_decode(llm, tok, spec.decode)
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_s": sum(steps), "decode_tps": len(steps) / sum(steps),
            "step_s": steps, "disk_read_bytes": _delta(read0, disk_read_bytes()), "peak_rss_bytes": peak_rss()}


def work_moed(spec: RunSpec) -> dict:
    """Prefill and greedy decode in moed with tiered experts; cache figures of the decode steps."""
    import torch
    from daemon.generate import Summary, generate
    from daemon.loaders.build import load_model
    from daemon.sampling import SamplingParams
    from offload.tiered import OffloadOptions
    from profiler.trace import record_trace

    torch.set_num_threads(spec.threads)
    dense = dense_bits(spec.bits)
    t = time.perf_counter()
    lm = load_model(spec.model, offload=OffloadOptions(bits=spec.bits, ram_budget=spec.ram_budget, policy=spec.policy),
                    dense_bits=dense)
    load_s = time.perf_counter() - t
    p = lm.experts
    rec = record_trace(lm, spec.trace) if spec.trace else None

    def counters() -> dict:
        link = p.links["flash->ram"]
        return {"hits": p.stats["ram"].hits, "misses": p.stats["ram"].misses, "bytes_read": p.bytes_read,
                "disk_read_bytes": disk_read_bytes(), "transfers": link.transfers, "link_busy_s": link.busy_seconds}

    s = Summary(list(spec.prompt))
    start = None
    for _ in generate(lm, list(spec.prompt), SamplingParams(max_tokens=spec.decode + 1, ignore_eos=True), s):
        if start is None:  # the first token comes from the prefill: decode starts now
            start = counters()
            p.timings.clear()
    end = counters()
    timings = [[k, x, sec] for k, x, sec in p.timings if k in CALIBRATE]
    if rec is not None:
        rec.close()
    ram = p.tier_views()[0]
    d = {k: _delta(start[k], end[k]) for k in end}
    out = {"load_s": load_s, "prefill_s": s.prefill_seconds, "decode_s": s.decode_seconds,
           "decode_tps": s.decode_tps, "step_s": s.step_seconds[1:], "tokens": s.tokens,
           "hits": d["hits"], "misses": d["misses"], "hit_rate": d["hits"] / max(1, d["hits"] + d["misses"]),
           "transfers": d["transfers"], "link_busy_s": d["link_busy_s"], "read_bytes_per_expert": p.raw_bytes(p.bits),
           "hit_rate_all": ram.hit_rate, "bytes_read": d["bytes_read"], "disk_read_bytes": d["disk_read_bytes"],
           "ram_budget": ram.budget, "ram_peak": p.stats["ram"].peak, "experts_resident": ram.experts_resident,
           "experts_total": ram.experts_total, "expert_bytes": p.expert_bytes(p.bits), "bits": p.bits,
           "dense_bits": dense,
           "peak_rss_bytes": peak_rss(), "timings": timings}
    p.close()
    return out


def worker_command(spec: RunSpec) -> list[str]:
    """The command that runs `spec` in a worker process."""
    return [sys.executable, __file__, "--worker", json.dumps(asdict(spec))]


# -- memory caps and the page cache --

@dataclass(slots=True)
class MemoryCap:
    """A memory limit around one worker process: a cgroup v1 group, a systemd scope, or none."""

    method: str  # "cgroup-v1", "systemd-run" or "none"
    limit: int | None
    group: Path | None = None

    @property
    def procs(self) -> str | None:
        """The file a worker writes its pid into to join the group (cgroup v1)."""
        return str(self.group / "cgroup.procs") if self.group is not None else None

    def wrap(self, cmd: list[str]) -> list[str]:
        """The command as run under the cap."""
        if self.method == "systemd-run":
            return ["systemd-run", "--scope", "--quiet", "--collect", "-p", f"MemoryMax={self.limit}", "--", *cmd]
        return cmd

    def counters(self) -> dict:
        """The group's peak usage (page cache included), times it hit the limit, OOM kills (cgroup v1)."""
        if self.group is None:
            return {}
        out = {"max_usage_bytes": int((self.group / "memory.max_usage_in_bytes").read_text()),
               "failcnt": int((self.group / "memory.failcnt").read_text())}
        for line in (self.group / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                out["oom_kills"] = int(value)
        return out


def cap_method(wanted: str) -> tuple[str, list[str]]:
    """How worker memory can be capped here (cgroup-v1, systemd-run or none), and why others could not."""
    why: list[str] = []
    if wanted in ("auto", "cgroup-v1"):
        probe = CGROUP_V1 / f"moed-bench-{os.getpid()}-probe"
        try:
            probe.mkdir()
            (probe / "memory.limit_in_bytes").write_text(str(1 << 30))
            return "cgroup-v1", why
        except OSError as e:
            why.append(f"cgroup v1 at {CGROUP_V1}: {e.strerror or e}")
        finally:
            if probe.exists():
                probe.rmdir()
    if wanted in ("auto", "systemd-run"):
        if shutil.which("systemd-run") is None:
            why.append("systemd-run: not installed")
        else:
            r = subprocess.run(MemoryCap("systemd-run", 256 * MiB).wrap(["true"]), capture_output=True, text=True)
            if r.returncode == 0:
                return "systemd-run", why
            why.append(f"systemd-run: {' '.join(r.stderr.split()) or r.returncode}")
    return "none", why


@contextmanager
def memory_cap(method: str, name: str, limit: int | None) -> Iterator[MemoryCap]:
    """A cap of `limit` bytes for one worker; a cgroup v1 group is created here and removed after.

    With cgroup v1 and no limit the worker still gets a group of its own, for its peak usage.
    """
    if method != "cgroup-v1":
        yield MemoryCap(method if limit is not None else "none", limit)
        return
    group = CGROUP_V1 / f"moed-bench-{os.getpid()}-{name}"
    group.mkdir()
    try:
        if limit is not None:
            (group / "memory.limit_in_bytes").write_text(str(limit))
        yield MemoryCap(method, limit, group)
    finally:
        for attempt in range(50):  # the worker has exited; its page cache charges may take a moment to go
            try:
                group.rmdir()
                break
            except OSError:
                if attempt == 0:
                    try:
                        (group / "memory.force_empty").write_text("0")
                    except OSError:
                        pass
                time.sleep(0.1)
        else:
            print(f"warning: could not remove {group}", file=sys.stderr)


def evict_page_cache(paths: list[Path]) -> dict[str, str]:
    """Drop the files' pages from the page cache; what each method did."""
    out = {}
    try:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages would stay
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        out["posix_fadvise_dontneed"] = f"ok ({len(paths)} files)"
    except OSError as e:
        out["posix_fadvise_dontneed"] = f"failed: {e}"
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1")
        out["drop_caches"] = "ok"
    except OSError as e:
        out["drop_caches"] = f"not permitted: {e.strerror or e}"
    return out


def measure(spec: RunSpec, method: str, limit: int | None, label: str, files: list[Path]) -> dict:
    """One run in a fresh worker under the cap, after evicting the model files from the page cache."""
    evicted = evict_page_cache(files)
    with memory_cap(method, label, limit) as cap:
        try:
            r = {"status": "ok", **run_worker(cap.wrap(worker_command(replace(spec, cgroup_procs=cap.procs))))}
        except WorkerError as e:
            killed = cap.counters().get("oom_kills", 0) > 0 or (cap.limit is not None and e.returncode in (-9, 137))
            tail = e.stderr.strip().splitlines()
            r = {"status": "oom-killed" if killed else "failed", "returncode": e.returncode,
                 "error": tail[-1] if tail else ""}
        r["cap"] = {"method": cap.method, "limit_bytes": limit, **cap.counters()}
    r["page_cache_eviction"] = evicted
    what = spec.engine + (f" {spec.policy} {spec.bits}" if spec.engine == "moed" else "")
    got = f"{r['decode_tps']:.2f} tok/s" if r["status"] == "ok" else r["status"]
    print(f"[{label}] {what}: {got}", file=sys.stderr, flush=True)
    return r


# -- the model --

@dataclass(frozen=True, slots=True)
class Files:
    """The benchmark model: the HF folder, its Q8_0 GGUF, the moed store, and their sizes; GGUFs at other
    bits for llama.cpp's runs at those bits (LLAMA_QTYPES)."""

    hf: Path
    gguf: Path
    store: Path
    config: dict
    expert_bytes: int  # routed experts in the GGUF
    gguf_bytes: int
    more_ggufs: tuple[tuple[int, Path], ...] = ()  # (bits, file)

    def llama_file(self, bits: int) -> Path:
        """The GGUF llama.cpp runs at `bits`."""
        return self.gguf if bits == BITS else dict(self.more_ggufs)[bits]

    def model_files(self) -> list[Path]:
        """Every file a run reads the model from (for page cache eviction)."""
        return [self.gguf, *(g for _, g in self.more_ggufs)] + sorted(p for p in self.store.rglob("*") if p.is_file())


def build(work: Path, config: dict, llama_bits: tuple[int, ...] = ()) -> Files:
    """The HF folder, GGUF (Q8_0, and LLAMA_QTYPES at llama_bits) and moed store of `config`, built once under
    `work` (keyed by the config)."""
    from gguf import GGUFReader

    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    tag = (f"{ARCH}-h{config.get('hidden_size')}-e{config.get('num_experts')}-k{config.get('num_experts_per_tok')}"
           f"-L{config['num_hidden_layers']}-{digest}")
    work.mkdir(parents=True, exist_ok=True)
    hf = random_model(work / f"{tag}-hf", ARCH, config, "bfloat16")
    gguf = gguf_file(hf, work / f"{tag}-Q8_0.gguf", "Q8_0")
    store = work / f"{tag}-store"
    if not (store / MANIFEST).exists():
        from daemon.convert import convert
        print(f"converting to a moed store {store.name} ...", file=sys.stderr, flush=True)
        convert(hf, store, force=True)
    experts = sum(int(t.n_bytes) for t in GGUFReader(gguf).tensors if "_exps." in t.name)
    cfg = json.loads((hf / "config.json").read_text())
    more = tuple((b, gguf_file(hf, work / f"{tag}-{LLAMA_QTYPES[b]}.gguf", LLAMA_QTYPES[b])) for b in llama_bits)
    return Files(hf, gguf, store, cfg, experts, gguf.stat().st_size, more)


# -- the simulator --

def default_machine() -> str:
    """The stored `moed profile` of this machine if there is one, else the profile kept in bench/results."""
    from profiler.profile import default_profile_path
    return "this" if default_profile_path().exists() else str(ROOT / "bench" / "results" / "profile_this_machine.json")


def sim_machines(spec: str, base_run: dict, shape: ModelShape) -> tuple[dict[str, Machine], dict]:
    """The machine profile for llama.cpp's replay, and for moed's: expert FFNs timed with moed's kernel only,
    refined (`learn`) with what moed's engine observed in the base run."""
    from profiler.costmodel import CostModel
    from profiler.machine import load_machine

    m = load_machine(spec)
    if m.cost is None:
        return {"llama.cpp": m, "moed": m}, {}
    kernel = f":{moed_kernel()}"
    keep = any(op.startswith("ffn:") and op.endswith(kernel) for op in m.cost.ops())
    moed = replace(m, cost=CostModel({op: copy.deepcopy(c) for op, c in m.cost.curves.items()
                                      if not (keep and op.startswith("ffn:")) or op.endswith(kernel)}))
    return {"llama.cpp": m, "moed": moed}, learn(moed, shape, base_run)


def learn(machine: Machine, shape: ModelShape, run: dict) -> dict:
    """Refine a measured machine's cost model in place with what moed's engine observed in a run at BITS, as a
    serving daemon's is refined (nothing from a run at other bits): a flash read of an expert from the run's
    flash->RAM link busy time per transfer (the read, the checksums and making the compute form, at the
    throughput its I/O threads reached side by side), and its decode steps' layers but their experts, heads
    and resident experts (CALIBRATE). Returns each op's prediction before and after, and how many timings."""
    if machine.cost is None or run.get("status", "ok") != "ok" or run.get("bits", BITS) != BITS:
        return {}
    nbytes = run["read_bytes_per_expert"]

    def ops(t) -> dict[str, float]:  # an expert's read, a decode token's attention layer, head and resident expert
        return {"read": t.read(nbytes), "attn": t.attention(1, 32), "head": t.head(1), "expert": t.expert("cpu", 1)}

    times = machine.times(shape, BITS)
    before, seen = ops(times), {k: 0 for k in ("read", *CALIBRATE)}
    n, busy = run.get("transfers", 0), run.get("link_busy_s", 0.0)
    if n and busy > 0:
        for _ in range(min(n, 100)):  # as the engine would report them, one per transfer
            seen["read"] += times.observe("read", nbytes, busy / n)
    for kind, x, sec in run.get("timings", []):  # CostTimes.observe refines the CostModel in place
        seen[kind] += times.observe(kind, x, sec)
    after = ops(machine.times(shape, BITS))
    return {k: {"observed": seen[k], "before_s": before[k], "after_s": after[k]} for k in before}


def _timing_summary(timings: list) -> dict:
    """Per kind of engine timing: how many, and their median seconds."""
    kinds: dict[str, list[float]] = {}
    for kind, _, sec in timings:
        kinds.setdefault(kind, []).append(sec)
    return {k: {"n": len(v), "median_s": statistics.median(v)} for k, v in kinds.items()}


def moed_kernel() -> str:
    """The kernel moed's tiered experts and dense layers run on here."""
    from quant.kernels import fast_cpu_backend
    return fast_cpu_backend()


def predict(trace: Trace, machine: Machine, policy: str, experts_held: int) -> dict:
    """Simulated seconds per decode token of the trace under `policy` with `experts_held` experts in RAM (the
    engine's policies with the engine's reads ahead as the trace recorded them, profiler.policies.ReadAhead)."""
    from profiler.policies import Engine, ReadAhead, make_policy
    from profiler.simulator import simulate

    shape = trace.header.model
    times = machine.times(shape, BITS)
    ram = experts_held * shape.expert_bytes(BITS)
    pol = make_policy(policy)
    if isinstance(pol, Engine):
        pol = ReadAhead(pol)
    r = simulate(trace, times, pol, 0, ram, BITS)
    decode = [t for s, t in zip(trace.steps, r.step_times) if s.tokens == 1]
    return {"policy": pol.name, "per_token_s": sum(decode) / len(decode), "experts_held": experts_held,
            "ram_bytes": ram, "ffn_op": times.cost.ffn_op("cpu", BITS), "hit_rate_all_steps": r.hit_rate("ram"),
            "notes": list(times.notes)}


def compare(pred: dict | None, run: dict, why_not: str = "") -> dict:
    """Predicted vs measured seconds per decode token, or why there is no prediction."""
    if pred is None:
        return {"predicted_s": None, "why": why_not}
    measured = 1 / run["decode_tps"] if run.get("status") == "ok" and run["decode_tps"] else None
    err = (pred["per_token_s"] - measured) / measured if measured else None
    return {"predicted_s": pred["per_token_s"], "measured_s": measured, "relative_error": err, **pred}


# -- the runs --

@dataclass(frozen=True, slots=True)
class Setup:
    """What every run shares: the model files, prompt, decode length, threads and how memory is capped."""

    files: Files
    prompt: tuple[int, ...]
    tokens: int
    threads: int
    method: str
    repeats: int = 1

    def spec(self, engine: str, policy: str = "", budget: str | int | None = None, trace: Path | None = None,
             bits: int | str = BITS) -> RunSpec:
        """A run of `engine` (moed: at `budget` under `policy` and `bits`; recording a trace if given)."""
        model = self.files.llama_file(bits) if engine == "llama.cpp" else self.files.store
        return RunSpec(engine, str(model), self.prompt, self.tokens, self.threads, policy, bits, budget,
                       None if trace is None else str(trace))

    def run(self, engine: str, limit: int | None, label: str, policy: str = "", budget: str | int | None = None,
            trace: Path | None = None, bits: int | str = BITS) -> dict:
        """One measured run under a cap of `limit` bytes in a fresh worker (the base run, which records a trace)."""
        return _best([measure(self.spec(engine, policy, budget, trace, bits), self.method, limit, label,
                              self.files.model_files())])

    def run_all(self, limit: int | None,
                configs: list[tuple[str, str, str, str | int | None, int | str]]) -> list[dict]:
        """Each (label, engine, policy, budget, bits) run `repeats` times under a cap of `limit` bytes, each in a
        fresh worker, in turns (every configuration once, then every one again): a slow spell of this VM then
        slows one run of several configurations, not every run of one, and the ratios stay fair. For each, the
        fastest of its runs (the machine's noise only ever adds time)."""
        runs: list[list[dict]] = [[] for _ in configs]
        for _ in range(self.repeats):
            for out, (label, engine, policy, budget, bits) in zip(runs, configs):
                out.append(measure(self.spec(engine, policy, budget, None, bits), self.method, limit, label,
                                   self.files.model_files()))
        return [_best(r) for r in runs]


def _best(runs: list[dict]) -> dict:
    """The fastest run that worked (else the last), with `repeats_tps`: every run's decode tok/s (None: failed)."""
    ok = [r for r in runs if r["status"] == "ok"]
    best = max(ok, key=lambda r: r["decode_tps"]) if ok else runs[-1]
    return {**best, "repeats_tps": [r["decode_tps"] if r["status"] == "ok" else None for r in runs]}


def find_base(setup: Setup, trace: Path, given: int | None = None) -> dict:
    """The cap's allowance for all but the routed experts: moed's peak RSS with a RAM tier of one token's
    experts of one layer, less what the tier held, plus a margin (or `given` bytes, the measurement only
    recorded). The run (uncapped) also records the trace."""
    cfg, layers = setup.files.config, setup.files.config["num_hidden_layers"]
    tiny = f"{100 * min(1.0, 1.01 * cfg['num_experts_per_tok'] / (cfg['num_experts'] * layers)):.4f}%"
    r = setup.run("moed", None, "base", "moed", tiny, trace)
    if r["status"] != "ok":
        raise SystemExit(f"the base run failed: {r['error']}")
    measured = r["peak_rss_bytes"] - r["ram_peak"]
    margin = max(int(MARGIN_SHARE * measured), MIN_MARGIN)
    how = (f"peak RSS of an uncapped moed run with a {tiny} RAM budget ({r['peak_rss_bytes'] / MiB:.0f} MiB) minus "
           f"the most its RAM tier held ({r['ram_peak'] / MiB:.1f} MiB) = {measured / MiB:.0f} MiB, plus a margin "
           f"of {margin / MiB:.0f} MiB (the larger of {MARGIN_SHARE:.0%} and {MIN_MARGIN // MiB} MiB)")
    if given is not None:
        how = f"given (--base-mib); measured for the record: {how}"
    if setup.method == "none":
        how += "; NO CAP was applied (no way to cap memory here)"
    return {"bytes": measured + margin if given is None else given, "measured_bytes": measured,
            "margin_bytes": margin, "how": how,
            "cgroup_peak_bytes": r["cap"].get("max_usage_bytes"), "run": r}


def llama_footprint(budgets: list[dict], files: Files) -> int | None:
    """llama.cpp's bytes besides its routed experts (its runtime and the GGUF's other tensors) from a run before
    that held every expert: its peak RSS (the mapped file's resident pages included) less the experts' bytes."""
    for b in budgets:
        run = b["llama.cpp"]
        if b["share"] >= 1 and run.get("status") == "ok" and run.get("peak_rss_bytes"):
            return max(0, run["peak_rss_bytes"] - files.expert_bytes)
    return None


def llama_replay(share: float, cap: int | None, footprint: int | None, files: Files, n_total: int) -> tuple:
    """llama.cpp's replay: (policy, experts held, how). Under a cap its page cache holds what the cap leaves
    besides its footprint (measured at 100%), the kernel evicting the least recently used pages: an LRU cache of
    that many experts; else --n-cpu-moe's static placement of the budget's share."""
    if cap is not None and footprint is not None and share < 1:
        room = min(n_total, max(0, (cap - footprint) // (files.expert_bytes // n_total)))
        return "lru", room, (f"page cache: LRU over the {room} experts the cap leaves besides llama.cpp's "
                             f"{footprint / MiB:.0f} MiB (peak RSS at 100% less the experts)")
    return "llamacpp", int(share * n_total), "static placement of the budget's share"


def room_of(run: dict, n_total: int) -> int:
    """Experts a moed run's RAM budget holds."""
    return min(n_total, run["ram_budget"] // run["expert_bytes"])


def run_budget(setup: Setup, share: float, base: dict, moed_budget: str, policies: list[str], trace: Trace,
               sims: dict[str, Machine], extra_bits: list[str], fill: float = 0.0,
               llama_base: int | None = None) -> dict:
    """llama.cpp (Q8_0, and at each of extra_bits LLAMA_QTYPES has) and moed (each policy; its own at extra_bits
    and FILL%free) at one RAM budget share under one cap, with the simulator's predictions (llama.cpp's page cache
    from `llama_base`, its footprint besides its experts, as llama_footprint measures it)."""
    f = setup.files
    n_total = f.config["num_experts"] * f.config["num_hidden_layers"]
    moed_expert = base["run"]["expert_bytes"]
    label = f"{share:.0%}".replace("%", "pct")
    cap = None if setup.method == "none" else base["bytes"] + int(share * f.expert_bytes)
    budget = int(share * f.expert_bytes) if moed_budget == "bytes" else f"{100 * share:g}%"
    budget_bytes = budget if isinstance(budget, int) else int(share * moed_expert * n_total)
    held = min(n_total, budget_bytes // moed_expert)
    fills = [BITS] + extra_bits if fill and share < 1 else []  # what the cap leaves, as llama.cpp's page cache
    llama_bits = [b for b, _ in f.more_ggufs]
    configs = ([(f"{label}-llama", "llama.cpp", "", None, BITS)]
               + [(f"{label}-llama-{LLAMA_QTYPES[b]}", "llama.cpp", "", None, b) for b in llama_bits]
               + [(f"{label}-{pol}", "moed", pol, budget, BITS) for pol in policies]
               + [(f"{label}-moed-{bits}", "moed", "moed", budget, bits) for bits in extra_bits]
               + [(f"{label}-moed-{bits}-fill", "moed", "moed", f"{fill:g}%free", bits) for bits in fills])
    llama, *measured = setup.run_all(cap, configs)
    policy, room, how = llama_replay(share, cap, llama_base, f, n_total)
    llama["simulator"] = {**compare(predict(trace, sims["llama.cpp"], policy, room), llama), "how": how}
    results = iter(measured)
    llama_more = {}
    for b in llama_bits:
        r = llama_more[LLAMA_QTYPES[b]] = next(results)
        r["bits"] = b
        r["simulator"] = compare(None, r, "the profile has no llama.cpp kernel")
    before = copy.deepcopy(sims["moed"])  # the model as this budget's runs begin
    replayed: list[tuple[dict, str, int]] = []

    def room(r: dict) -> int:
        return room_of(r, n_total) if r.get("status") == "ok" else held

    def moed(policy: str, bits: int | str = BITS) -> dict:
        """The next moed run: predicted (where the simulator has its policy) from the model as the runs before it
        refined it, then learned from, for the runs after."""
        r, n = next(results), None
        sim = SIM_POLICY.get(policy) if bits == BITS else None
        if sim:
            n = room(r)
            replayed.append((r, sim, n))
        r["simulator"] = compare(predict(trace, sims["moed"], sim, n) if sim else None, r,
                                 f"the simulator has no {policy} policy")
        r["learned"] = learn(sims["moed"], trace.header.model, r)
        return r

    runs = {pol: moed(pol) for pol in policies}
    for bits in extra_bits:  # moed's own policy at other bit-widths (the same store: a prefix of each expert)
        runs[f"moed {bits}-bit"] = moed("moed", bits)
    for bits in fills:
        r = moed("moed", bits)
        name = f"moed{'' if bits == BITS else f' {bits}-bit'} {fill:g}%free"
        if r["status"] == "ok":
            name += f" (room for {room(r)})"
        runs[name] = r
    for r, sim, n in replayed:  # again, from the model as this budget's other runs refine it (leave one out)
        m = copy.deepcopy(before)
        for other in runs.values():
            if other is not r:
                learn(m, trace.header.model, other)
        r["simulator_same_budget"] = compare(predict(trace, m, sim, n), r)
    return {"share": share, "cap_bytes": cap, "moed_ram_budget": budget_bytes, "moed_experts_held": held,
            "llama.cpp": llama, "llama.cpp more": llama_more, "moed": runs}


def probe_expert_reads(store: Path, nbytes: int, repeats: int = PROBE_READS) -> dict:
    """Cold reads of one expert's bytes at a time from the store's experts file (profiler.flash.FlashProbe:
    O_DIRECT, or reads of ranges dropped from the page cache), at random offsets: their fastest and median."""
    from profiler.flash import ALIGN, FlashProbe

    probe = FlashProbe(store / EXPERTS)
    size = -(-nbytes // ALIGN) * ALIGN
    secs = sorted(r.seconds for r in probe.run([size], repeats))
    return {"bytes": size, "reads": repeats, "method": probe.method, "fastest_s": secs[0],
            "median_s": statistics.median(secs)}


def add_bounds(budgets: list[dict], trace: Trace, read_s: float) -> None:
    """Each moed run at BITS gets `bound`: the fastest decode any cache policy could reach with the room the run
    had. Its misses are the fewest possible on the trace's decode steps (profiler.tracestats.fewest_misses: the
    future known, any preload, a missed expert used without being kept), each read at `read_s` (the fastest
    probed read), the reads wholly overlapped with the rest of the step, which takes at least the fastest moed
    run with every expert held (the 100% budget's; none: reads only)."""
    from profiler.tracestats import fewest_misses, model_accesses

    shape = trace.header.model
    n_total = shape.num_experts * len(shape.moe_layers)
    seq = model_accesses(trace, decode_only=True)
    steps = sum(1 for s in trace.steps if s.tokens == 1)
    held = [1 / r["decode_tps"] for b in budgets if b["share"] >= 1 for r in b["moed"].values()
            if r["status"] == "ok" and r["bits"] == BITS and r["decode_tps"]]
    resident = min(held, default=0.0)
    for b in budgets:
        for r in b["moed"].values():
            if r["status"] != "ok" or r["bits"] != BITS:
                continue
            n = room_of(r, n_total)
            misses = fewest_misses(seq, n) / steps
            r["bound"] = {"experts_held": n, "misses_per_token": misses, "read_s": read_s, "resident_s": resident,
                          "per_token_s": max(resident, misses * read_s)}


def model_record(f: Files, quick: bool, moed_expert: int) -> dict:
    """The model's shapes, files and per-expert bytes for the results."""
    cfg = f.config
    n_total = cfg["num_experts"] * cfg["num_hidden_layers"]
    return {"shapes_of": "tiny (--quick)" if quick else MODEL_NAMES[ARCH], "arch": ARCH,
            "layers": cfg["num_hidden_layers"], "hidden": cfg["hidden_size"], "experts": cfg["num_experts"],
            "top_k": cfg["num_experts_per_tok"], "expert_width": cfg["intermediate_size"], "experts_total": n_total,
            "weights": "random", "gguf": str(f.gguf), "gguf_bytes": f.gguf_bytes, "gguf_expert_bytes": f.expert_bytes,
            "gguf_bytes_per_expert": f.expert_bytes // n_total, "store": str(f.store),
            "moed_bytes_per_expert": moed_expert, "moed_bits": BITS, "moed_kernel": moed_kernel(),
            "moed_dense_bits": DENSE_BITS,
            "llama_more_ggufs": {LLAMA_QTYPES[b]: {"path": str(g), "bytes": g.stat().st_size} for b, g in f.more_ggufs}}


# -- the report --

def _cells(name: str, r: dict, llama_tps: float | None, same_tps: float | None, cap: int | None,
           decode: int) -> list[str]:
    sim_cells = []
    for key in ("simulator", "simulator_same_budget"):
        sim = r.get(key, {})
        if sim.get("predicted_s") is None:
            sim_cells += ["n/a" if key == "simulator" else "-", "-"]
        else:
            e = sim.get("relative_error")
            sim_cells += [f"{sim['predicted_s'] * 1e3:.1f}", f"{e:+.0%}" if e is not None else "-"]
    if r["status"] != "ok":
        return [name, r["status"], "-", "-", "-", "-", "-", "-", sim_cells[0], "-", sim_cells[2], "-", "-"]
    bound = r.get("bound")
    best = "-" if bound is None else (f"{1 / bound['per_token_s']:.1f}"
                                      + (f" ({1 / (llama_tps * bound['per_token_s']):.2f}x)" if llama_tps else ""))
    read = r.get("disk_read_bytes") if name.startswith("llama.cpp") else r["bytes_read"]
    ratio = f"{r['decode_tps'] / llama_tps:.2f}x" if llama_tps else "-"
    same = f"{r['decode_tps'] / same_tps:.2f}x" if same_tps and not name.startswith("llama.cpp") else "-"
    hit = f"{r['hit_rate']:.2f}" if "hit_rate" in r else "-"
    cap_s = f"{cap / MiB:.0f}" if cap else "no cap"
    return [name, f"{r['decode_tps']:.2f}", ratio, same, hit, "-" if read is None else f"{read / decode / MiB:.1f}",
            f"{r['peak_rss_bytes'] / MiB:.0f} / {cap_s}", f"{1e3 / r['decode_tps']:.1f}", *sim_cells, best]


def _refined(r: dict) -> str:
    if not r:
        return ""
    names = {"read": "an expert's flash read", "attn": "a layer but its experts", "head": "a step's head",
             "expert": "a resident expert"}
    cells = [f"{names[k]} {v['before_s'] * 1e3:.2f} -> {v['after_s'] * 1e3:.2f} ms ({v['observed']} timings)"
             for k, v in r.items()]
    return (" moed's replays use the profile as the engine's timings refine it, as a serving daemon's cost model "
            "is: first with the base run's (its flash->RAM link time per transfer, which counts the read, "
            "checksums and making the compute form; its decode steps' attention layers, heads and resident "
            "experts; per op, profiled -> refined: " + ", ".join(cells) + "), then, after each moed run at "
            f"{BITS} bits is predicted, with that run's: a run is predicted from the runs before it, never its own.")


def markdown(res: dict) -> str:
    """The results as a short markdown report."""
    m, mod, cap = res["machine"], res["model"], res["cap"]
    lines = [
        f"# offload_cpu: moed tiered experts vs llama.cpp under one memory cap ({res['date']})", "",
        f"Command: `{res['command']}`", "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['ram_gib']} GiB RAM; torch {m.get('torch')}, "
        f"llama-cpp-python {m['llama_cpp_python']}.",
        f"Model: random weights with {mod['shapes_of']} layer shapes ({mod['hidden']} hidden, {mod['experts']} "
        f"experts, top-{mod['top_k']}, expert width {mod['expert_width']}), {mod['layers']} layers. llama.cpp: GGUF "
        f"Q8_0, {mod['gguf_bytes'] / MiB:.0f} MiB, routed experts E = {mod['gguf_expert_bytes'] / MiB:.0f} MiB "
        f"({mod['gguf_bytes_per_expert'] / MiB:.2f} MiB each; the rest of the file "
        f"{(mod['gguf_bytes'] - mod['gguf_expert_bytes']) / MiB:.0f} MiB). moed: a store of the same weights, "
        f"experts at {BITS} bits ({mod['moed_kernel']} kernel), {mod['moed_bytes_per_expert'] / MiB:.2f} MiB each "
        f"in RAM (the kernel's compute form); dense weights at {mod['moed_dense_bits']} bits."
        + "".join(f" llama.cpp at the same bits as moed's other runs: {q}, {g['bytes'] / MiB:.0f} MiB (all its "
                  "tensors at that type where the shapes allow, as the Q8_0 file's); moed's runs at those bits hold "
                  "their dense weights at those bits too (the embedding at 8)."
                  for q, g in mod.get("llama_more_ggufs", {}).items()),
        f"Builds: moed's native kernels are compiled for this CPU (-march=native; their dot products here: "
        f"{native.simd()}); llama.cpp as tools/setup.sh builds it (GGML_NATIVE=OFF with AVX2, FMA and F16C: no "
        "AVX512). A llama.cpp built for this CPU was not measured: it may be faster than here.",
        f"Memory cap: {cap['method']}" + (f" (not used: {'; '.join(cap['unavailable'])})" if cap['unavailable'] else "")
        + f". cap = base + share * E, base = {cap['base_bytes'] / MiB:.0f} MiB: {cap['base_how']}",
        f"Page cache before each run: {', '.join(f'{k} {v}' for k, v in res['page_cache_eviction'].items())}.",
        f"moed's RAM budget: {res['moed_budget']}.",
        f"Runs: {res['threads']} threads, {res['prompt_tokens']} prompt tokens (same ids for both), "
        f"{res['decode_tokens']} greedy decode tokens; tok/s = decode tokens / decode seconds (prefill excluded); "
        f"each configuration the fastest of {res['repeats']} runs, each in a fresh worker, the configurations of a "
        "budget taking turns (this VM's noise, up to 2x between runs and drifting over minutes, only ever adds "
        "time).",
        f"Simulator: {res['simulator']['machine']}; replays {res['trace']} (recorded by the base run) with as many "
        "experts in RAM as each run could hold. It times attention layers (with their norms and routers), experts "
        "and each step's head (embedding, final norm, lm_head, and from the engine's timings on, the sampling and "
        "generate loop around the model)."
        + _refined(res['simulator'].get('moed_refined_from_base_run') or {}), ""]
    head = ["engine", "decode tok/s", "vs llama.cpp", "vs llama.cpp, same bits", "hit rate", "MiB read / token",
            "peak RSS / cap MiB", "measured ms/token", "simulated ms/token", "sim error", "simulated, same budget",
            "error", "best any policy: tok/s (vs llama.cpp)"]
    for b in res["budgets"]:
        llama, more = b["llama.cpp"], b.get("llama.cpp more", {})
        ltps = llama["decode_tps"] if llama["status"] == "ok" else None
        by_bits = {BITS: ltps, **{r["bits"]: r["decode_tps"] if r["status"] == "ok" else None for r in more.values()}}
        cap_s = f"cap {b['cap_bytes'] / MiB:.0f} MiB" if b["cap_bytes"] else "NO CAP"
        lines += [f"## RAM budget {b['share']:.0%} of E ({cap_s}; moed budget "
                  f"{b['moed_ram_budget'] / MiB:.0f} MiB = {b['moed_experts_held']} of {mod['experts_total']} "
                  f"experts)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        rows = [("llama.cpp", llama)] + [(f"llama.cpp {q}", r) for q, r in more.items()]
        rows += [(f"moed {p}" + (f" ({r['bits']} bits)" if "auto" in p and "bits" in r else ""), r)
                 for p, r in b["moed"].items()]
        lines += ["| " + " | ".join(_cells(n, r, ltps, by_bits.get(r.get("bits")), b["cap_bytes"],
                                           res["decode_tokens"])) + " |" for n, r in rows]
        lines.append("")
    lines += ["vs llama.cpp: against llama.cpp on the Q8_0 file; same bits: against llama.cpp on the file at the run's "
              f"bits ({', '.join(f'{b} bits: {q}' for b, q in {BITS: 'Q8_0', **LLAMA_QTYPES}.items())}), under the "
              "same cap.",
              "Hit rate: share of expert uses in decode steps found in moed's RAM tier. MiB read / token: moed's "
              "reads from the store; llama.cpp's bytes read from storage (/proc/self/io, page faults on the mapped "
              "file). Peak RSS: VmHWM, for llama.cpp including the mapped file's resident pages. sim error: "
              "(simulated - measured) / measured" + (f"; n/a where the simulator has no such policy "
              f"({', '.join(res['simulator']['unmatched'])})" if res['simulator']['unmatched'] else "; n/a at other "
              "bits than the cost model is refined at") + ". Simulated, same budget: the same replay from the "
              "model as it stood when the budget's runs began, refined by that budget's other moed runs (leave one "
              "out: never the run's own timings), so that op times are those of the same cap; what stays is the "
              "simulator's own error.",
              f"moed's tokens are the same in every {BITS}-bit moed run: {res['moed_outputs_identical']}."]
    if rd := res.get("expert_reads_probed"):
        bounds = [r["bound"] for b in res["budgets"] for r in b["moed"].values() if "bound" in r]
        resident = bounds[0]["resident_s"] if bounds else 0.0
        lines += ["Best any policy: a bound on every cache policy at the run's bits with the room the run had, from "
                  "the trace's decode steps: the fewest misses possible (Belady's MIN knowing the future, any "
                  "preload, a missed expert used without being kept; profiler.tracestats.fewest_misses), each read "
                  f"in {rd['fastest_s'] * 1e3:.2f} ms (the fastest of {rd['reads']} cold reads of an expert's "
                  f"{rd['bytes'] / MiB:.2f} MiB from the store, {rd['method']}; median {rd['median_s'] * 1e3:.2f} "
                  "ms), wholly overlapped with the rest of the step, which takes at least "
                  + (f"{resident * 1e3:.1f} ms (the fastest moed run with every expert held)" if resident else
                     "nothing (no 100% run to time it)") + ". Per room: "
                  + ", ".join(f"{n} experts {m:.1f} misses/token"
                              for n, m in sorted({(x["experts_held"], x["misses_per_token"]) for x in bounds}))
                  + "."]
    lines.append("")
    sims = [(n, r.get("simulator", {})) for b in res["budgets"]
            for n, r in [("llama.cpp", b["llama.cpp"]), *b["moed"].items()]]
    ops = {n if n == "llama.cpp" else "moed": sim["ffn_op"] for n, sim in sims if "ffn_op" in sim}
    lines += [f"Simulator expert timings: {', '.join(f'{k} with {v}' for k, v in ops.items())} (the profile has no "
              "llama.cpp kernel; its replay takes the fastest probed one)."]
    lines += [f"Simulator, llama.cpp at {b['share']:.0%}: {b['llama.cpp']['simulator']['how']}." for b in res["budgets"]
              if b["llama.cpp"].get("simulator", {}).get("how")]
    lines += [f"Simulator note: {n}" for n in sorted({n for _, sim in sims for n in sim.get("notes", [])})]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, help="decoder layers (default 4; 2 with --quick)")
    p.add_argument("--tokens", type=int, default=32, help="greedy decode tokens per run")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--shares", default="1.0,0.5,0.25", help="RAM budgets as shares of the routed experts' bytes")
    p.add_argument("--policies", default=",".join(POLICIES), help="moed cache policies to run")
    p.add_argument("--extra-bits", default="4", help="bit-widths (1-8, auto) moed's own policy also runs at, "
                   "comma-separated; '' for none")
    p.add_argument("--fill", type=float, default=85.0,
                   help="below a 100%% share, moed's own policy also runs with --ram-budget FILL%%free: that share "
                        "of what the cap leaves when its tier is made, as llama.cpp's page cache fills the cap "
                        "(0: no such runs)")
    p.add_argument("--moed-budget", choices=("bytes", "share"), default="share",
                   help="moed's RAM budget: share of its own experts' bytes (default), or share * E bytes")
    p.add_argument("--cap", choices=("auto", "cgroup-v1", "systemd-run", "none"), default="auto")
    p.add_argument("--base-mib", type=int, help="the cap's allowance for all but the experts (default: measured)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="runs of each configuration; the fastest is reported")
    p.add_argument("--quick", action="store_true", help="tiny shapes (hidden 256, 8 experts, 2 layers): a smoke test")
    p.add_argument("--machine", help="machine profile for the simulator (default: this machine's)")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "moed" / "bench-offload"))
    p.add_argument("--out", help="results path without suffix (default bench/results/offload_cpu; "
                                 "with --quick, offload_cpu_quick in --work)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:
        spec = RunSpec.from_json(a.worker)
        if spec.cgroup_procs:  # into the memory group before torch or llama.cpp is loaded
            Path(spec.cgroup_procs).write_text(str(os.getpid()))
        print(json.dumps((work_llama if spec.engine == "llama.cpp" else work_moed)(spec)))
        return

    shares = [float(s) for s in a.shares.split(",")]
    policies = [s.strip() for s in a.policies.split(",") if s.strip()]
    if bad := [q for q in policies if q not in POLICIES]:
        p.error(f"unknown policies {bad} (known: {', '.join(POLICIES)})")
    config = {**(QUICK if a.quick else SHAPES[ARCH]), "num_hidden_layers": a.layers or (2 if a.quick else 4)}
    extra = [b if b == "auto" else int(b) for b in a.extra_bits.split(",") if b.strip()]
    files = build(Path(a.work), config, tuple(b for b in extra if b in LLAMA_QTYPES))
    method, unavailable = cap_method(a.cap)
    setup = Setup(files, tuple(prompt_tokens(a.prompt_tokens)), a.tokens, a.threads, method, a.repeats)
    out = Path(a.out or (Path(a.work) / "offload_cpu_quick" if a.quick else ROOT / "bench" / "results" / "offload_cpu"))
    out.parent.mkdir(parents=True, exist_ok=True)
    trace_path = out.with_suffix(".trace.jsonl")

    from profiler.trace import read_trace
    base = find_base(setup, trace_path, None if a.base_mib is None else a.base_mib * MiB)
    trace = read_trace(trace_path)
    machine_spec = a.machine or default_machine()
    sims, refined = sim_machines(machine_spec, base["run"], trace.header.model)
    reads = probe_expert_reads(files.store, base["run"]["read_bytes_per_expert"])
    budgets: list[dict] = []
    for s in shares:  # (100% first: llama.cpp's footprint for its replays under the tighter caps)
        budgets.append(run_budget(setup, s, base, a.moed_budget, policies, trace, sims, extra, a.fill,
                                  llama_footprint(budgets, files)))

    add_bounds(budgets, trace, reads["fastest_s"])
    for r in [base["run"]] + [r for b in budgets for r in b["moed"].values()]:  # learned from; kept as a summary
        r["timings"] = _timing_summary(r.get("timings", []))
    model = model_record(files, a.quick, base["run"]["expert_bytes"])
    outputs = {tuple(r["tokens"]) for b in budgets for r in b["moed"].values()
               if r["status"] == "ok" and r["bits"] == BITS}
    res = {
        "benchmark": "offload_cpu", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python bench/offload_cpu.py " + " ".join(sys.argv[1:]), "machine": machine(),
        "model": model,
        "threads": a.threads, "prompt_tokens": a.prompt_tokens, "decode_tokens": a.tokens, "repeats": a.repeats,
        "cap": {"method": method, "unavailable": unavailable, "base_bytes": base["bytes"], "base_how": base["how"],
                "base_measured_bytes": base["measured_bytes"], "margin_bytes": base["margin_bytes"],
                "base_run_cgroup_peak_bytes": base["cgroup_peak_bytes"],
                "caps_bytes": {str(b["share"]): b["cap_bytes"] for b in budgets}},
        "moed_budget": (f"share * E bytes (the room the cap leaves for experts, as for llama.cpp); an expert takes "
                        f"{model['moed_bytes_per_expert'] / model['gguf_bytes_per_expert']:.2f}x its Q8_0 bytes in "
                        "moed's RAM tier" if a.moed_budget == "bytes"
                        else "share of moed's own experts' bytes (--ram-budget share%)"),
        "page_cache_eviction": base["run"]["page_cache_eviction"],
        "trace": str(trace_path.relative_to(ROOT)) if trace_path.is_relative_to(ROOT) else str(trace_path),
        "simulator": {"machine": f"{sims['moed'].name} ({sims['moed'].description})", "spec": machine_spec,
                      "moed_refined_from_base_run": refined,
                      "unmatched": [q for q in policies if q not in SIM_POLICY]},
        "moed_outputs_identical": len(outputs) <= 1, "expert_reads_probed": reads,
        "base_run": base["run"], "budgets": budgets,
    }
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
