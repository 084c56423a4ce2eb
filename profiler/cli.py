"""`moed profile`, `moed trace stats|synth` and `moed simulate` (registered through daemon.cli.COMMAND_MODULES)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from daemon.errors import MoedError


def cmd_profile(a: argparse.Namespace) -> int:
    """Run the probes and store the profile, or show a stored one."""
    from profiler.profile import default_profile_path, format_profile, load_profile, run_profile, save_profile

    if a.show is not None:
        path = Path(a.show) if a.show else default_profile_path()
        try:
            print(format_profile(load_profile(path)))
        except (OSError, ValueError, KeyError) as e:
            raise MoedError(f"cannot show profile: {e}" if path.exists() else
                            "no profile stored; run `moed profile` first", path) from None
        return 0
    t0 = time.perf_counter()
    prof = run_profile(quick=a.quick, shape_name=a.shape, flash_dir=a.flash_dir,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    prof["durations_s"]["total"] = round(time.perf_counter() - t0, 2)
    paths = [save_profile(prof, default_profile_path())]
    if a.out:
        paths.append(save_profile(prof, a.out))
    print(format_profile(prof))
    print(f"\nprofiled in {prof['durations_s']['total']:.1f} s; written to {', '.join(map(str, paths))}")
    return 0


def cmd_trace_stats(a: argparse.Namespace) -> int:
    """Print a trace's per-layer skew, reuse distance and hit-rate curves."""
    from profiler.trace import read_trace
    from profiler.tracestats import format_stats, trace_stats

    st = trace_stats(read_trace(a.file))
    print(json.dumps(st.to_dict(), indent=1) if a.json else format_stats(st))
    return 0


def cmd_trace_synth(a: argparse.Namespace) -> int:
    """Write a synthetic trace (labelled synthetic in its header)."""
    from profiler.shapes import preset
    from profiler.synthetic import SyntheticParams, synthetic_trace

    try:
        params = SyntheticParams(a.steps, a.prefill, a.skew, a.locality, a.drift, a.seed)
        trace = synthetic_trace(preset(a.shape), params)
    except ValueError as e:
        raise MoedError(str(e)) from None
    trace.save(a.out)
    print(f"{a.out}: {trace.header.label}")
    return 0


def cmd_simulate(a: argparse.Namespace) -> int:
    """Replay a trace under a policy on a machine profile and print times, hit rates and bytes moved."""
    from profiler.machine import load_machine
    from profiler.policies import make_policy
    from profiler.simulator import simulate
    from profiler.trace import read_trace

    trace = read_trace(a.trace)
    machine = load_machine(a.machine)
    try:
        policy = make_policy(a.policy)
    except ValueError as e:
        raise MoedError(str(e)) from None
    vram, ram = machine.default_budgets()
    vram = vram if a.vram_bytes is None else a.vram_bytes
    ram = ram if a.ram_bytes is None else a.ram_bytes
    times = machine.times(trace.header.model, a.bits)
    r = simulate(trace, times, policy, vram, ram, a.bits)
    if a.json:
        print(json.dumps({**r.to_dict(), "machine": machine.name, "bits": a.bits, "notes": times.notes}, indent=1))
        return 0
    print(f"{r.trace}\nmachine {machine.name} ({machine.kind}): {machine.description}")
    print(f"policy {r.policy}; experts at {a.bits} bits, {r.budgets['expert_bytes'] / 2**20:.2f} MiB each; "
          f"budgets VRAM {r.budgets['vram'] / 2**30:.2f} GiB, RAM {r.budgets['ram'] / 2**30:.2f} GiB")
    print(f"{r.steps} steps, {r.tokens} tokens")
    print(f"per token     {r.per_token_s * 1e3:10.3f} ms")
    print(f"lower bound   {r.lower_bound_per_token_s * 1e3:10.3f} ms   (ratio {r.time_s / r.lower_bound_s:.3f})")
    print("found in      " + ", ".join(f"{t} {r.hit_rate(t):.3f}" for t in ("vram", "ram", "flash")))
    print("bytes moved   " + ", ".join(f"{k} {v / 2**30:.3f} GiB" for k, v in r.link_bytes.items()))
    if r.prefetched:
        print(f"prefetched    {r.prefetched} experts, {r.prefetch_used} used")
    for n in times.notes:
        print(f"note: {n}")
    return 0


def _bytes(v: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = v.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if s and s[-1] in units:
            return int(float(s[:-1]) * units[s[-1]])
        return int(float(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte count: {v!r} (e.g. 8G, 512M, 1073741824)") from None


def register(sub: argparse._SubParsersAction) -> None:
    """Add profile, trace and simulate to moed's subcommands."""
    from profiler.machine import machine_names
    from profiler.shapes import PRESETS

    p = sub.add_parser("profile", help="measure this machine: probes, cost model (stored in moed's state dir)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (under a minute)")
    p.add_argument("--out", help="also write the profile to this file")
    p.add_argument("--show", nargs="?", const="", metavar="FILE",
                   help="print the stored profile (or FILE) as a table instead of probing")
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(PRESETS), help="model shape to probe")
    p.add_argument("--flash-dir", help="folder on the disk to probe (default: moed's state directory)")
    p.set_defaults(func=cmd_profile)

    t = sub.add_parser("trace", help="routing traces: statistics, synthetic traces")
    ts = t.add_subparsers(dest="trace_command", required=True)
    s = ts.add_parser("stats", help="per-layer skew, reuse distance, LRU and ideal hit-rate curves")
    s.add_argument("file")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_trace_stats)
    g = ts.add_parser("synth", help="write a synthetic trace with tunable skew and locality")
    g.add_argument("--out", required=True)
    g.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(PRESETS))
    g.add_argument("--steps", type=int, default=64)
    g.add_argument("--prefill", type=int, default=0)
    g.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of expert popularity")
    g.add_argument("--locality", type=float, default=0.3, help="probability of reusing a previous-step expert")
    g.add_argument("--drift", type=int, default=0, help="reshuffle popularity every N steps (0: never)")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_trace_synth)

    m = sub.add_parser("simulate", help="replay a routing trace under a policy on a machine profile")
    m.add_argument("--trace", required=True)
    m.add_argument("--machine", required=True,
                   help="'this' (the stored profile), a profile or parameter file, or one of: "
                        + ", ".join(machine_names()))
    m.add_argument("--policy", required=True,
                   help="llamacpp, ktransformers, lru, hybrimoe[:prefetch=0,accuracy=0.8], or module:Class")
    m.add_argument("--vram-bytes", type=_bytes, help="VRAM budget for experts (default: 80%% of the GPU's memory)")
    m.add_argument("--ram-bytes", type=_bytes, help="RAM budget for experts (default: 80%% of RAM)")
    m.add_argument("--bits", type=int, default=4, help="bit-width experts are held at (default 4)")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_simulate)
