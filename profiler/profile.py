"""A machine profile: facts, raw probe samples and the fitted cost model, stored in moed's state directory.

File format `moed-profile` version 1 (JSON): name, created (UTC ISO time), quick, load
(1-minute load average before and after the probes: other work running distorts timings),
facts (profiler.hardware), probe_shape (the model shape probed), plan, durations_s per
probe, notes, and costmodel (profiler.costmodel: every op's samples, fit and correction).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from profiler.costmodel import CostModel, Sample

FORMAT = "moed-profile"
VERSION = 1



def busy(load_before: float | None) -> bool:
    """Whether other work was running when probing began (the probes' own load comes after)."""
    return (load_before or 0) > 0.5 * (os.cpu_count() or 1)

def state_dir() -> Path:
    """moed's state directory: $MOED_STATE_DIR, else $XDG_STATE_HOME/moed, else ~/.local/state/moed."""
    if os.environ.get("MOED_STATE_DIR"):
        return Path(os.environ["MOED_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "moed"


def default_profile_path() -> Path:
    """Where `moed profile` keeps this machine's profile."""
    return state_dir() / "profile.json"


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run_profile(quick: bool = False, shape_name: str = "qwen3-30b-a3b", flash_dir: str | os.PathLike | None = None,
                log=None, plan=None) -> dict:
    """Run every probe and return the profile record (facts, samples, fit); `plan` overrides quick/full."""
    import torch

    from profiler.flash import probe_flash
    from profiler.hardware import machine_facts
    from profiler.probes import FULL, QUICK, probe_attention, probe_ffn, probe_h2d, probe_unpack
    from profiler.shapes import preset

    plan = plan or (QUICK if quick else FULL)
    shape = preset(shape_name)
    folder = Path(flash_dir) if flash_dir else state_dir()
    folder.mkdir(parents=True, exist_ok=True)
    say = log or (lambda msg: None)
    load_before = _load()
    facts = machine_facts(folder)
    samples: list[Sample] = []
    meta: dict[str, dict] = {}
    notes: list[str] = []
    durations: dict[str, float] = {}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    def timed(name: str, fn):
        say(f"probing {name} ...")
        t0 = time.perf_counter()
        out = fn()
        durations[name] = round(time.perf_counter() - t0, 2)
        return out

    for dev in devices:
        s, m, n = timed(f"expert FFN ({dev})", lambda: probe_ffn(shape, plan, dev))
        samples += s
        meta.update(m)
        notes += n
        s, m = timed(f"attention ({dev})", lambda: probe_attention(shape, plan, dev))
        samples += s
        meta.update(m)
    s, n = timed("host-to-device copies", lambda: probe_h2d(plan))
    samples += s
    notes += n
    s, info = timed("flash reads", lambda: probe_flash(folder, list(plan.flash_sizes), plan.repeats,
                                                       plan.flash_file_bytes))
    samples += s
    meta["flash:read"] = info
    if info["cold_verified"] is False:
        notes.append(f"{info['warm_reads']} flash reads found their range in the page cache")
    s, m, n = timed("unpacking", lambda: probe_unpack(shape, plan))
    samples += s
    meta.update(m)
    notes += n
    cost = CostModel.fit(samples, meta)
    load_after = _load()
    if busy(load_before):
        notes.append(f"other processes were running (1-min load {load_before} before, {load_after} after, "
                     f"{os.cpu_count()} CPUs): timings are noisy")
    return {"format": FORMAT, "version": VERSION, "name": "this-machine",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": quick,
            "load": {"before": load_before, "after": load_after, "cpus": os.cpu_count()},
            "facts": facts.to_dict(), "probe_shape": shape.to_dict(), "plan": dataclasses.asdict(plan),
            "durations_s": durations, "notes": notes, "costmodel": cost.to_dict()}


def save_profile(profile: dict, path: str | os.PathLike) -> Path:
    """Write a profile record as JSON (atomically)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(profile, indent=1) + "\n")
    os.replace(tmp, p)
    return p


def load_profile(path: str | os.PathLike) -> dict:
    """Read a profile record; ValueError if it is not one."""
    d = json.loads(Path(path).read_text())
    if d.get("format") != FORMAT or d.get("version") != VERSION:
        raise ValueError(f"not a moed profile of version {VERSION}")
    return d


def _si(v: float, unit: str) -> str:
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:.3g} {prefix}{unit}"
    return f"{v:.3g} {unit}"


def _secs(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} us"


def format_profile(profile: dict) -> str:
    """A text table of the machine facts and every op's fit."""
    f = profile["facts"]
    cpu = f["cpu"]
    lines = [f"profile of {f['hostname']} ({'quick' if profile.get('quick') else 'full'}, {profile['created']})",
             f"CPU  {cpu['model']}: {cpu['physical_cores']} cores / {cpu['logical_cores']} threads, "
             f"flags {' '.join(cpu['flags']) or '-'}",
             f"RAM  {f['ram_total_bytes'] / 2**30:.1f} GiB ({f['ram_available_bytes'] / 2**30:.1f} GiB available)"]
    for g in f["gpus"]:
        lines.append(f"GPU  {g['name']}: {g['memory_total_bytes'] / 2**30:.1f} GiB, PCIe gen {g['pcie_generation']} "
                     f"x{g['pcie_width']} (max gen {g['pcie_max_generation']} x{g['pcie_max_width']})")
    if not f["gpus"]:
        lines.append(f"GPU  none ({f['nvml']})")
    d = f.get("disk")
    if d:
        lines.append(f"disk {d['device']} ({d['fstype']}, {'rotational' if d['rotational'] else 'solid-state'}"
                     f"{', ' + d['model'] if d.get('model') else ''}) holding {d['path']}")
    load = profile.get("load", {})
    lines.append(f"load {load.get('before')} before / {load.get('after')} after on {load.get('cpus')} CPUs")
    lines += ["", f"{'op':<28} {'unit':<9} {'n':>4} {'fit err':>8}  fitted time at probed sizes"]
    cost = CostModel.from_dict(profile["costmodel"])
    for op in cost.ops():
        c = cost.curve(op)
        unit = c.to_dict()["unit"]
        picks = sorted({c.knots[0], c.knots[len(c.knots) // 2], c.knots[-1]})
        pts = []
        for x in picks:
            t = c.predict(x)
            size = _si(x, "B") if unit == "bytes" else f"{x:g}"
            rate = f" ({_si(x / t, 'B/s')})" if unit == "bytes" else ""
            pts.append(f"{size}: {_secs(t)}{rate}")
        lines.append(f"{op:<28} {unit:<9} {len(c.samples):>4} {c.fit_error():>7.1f}%  " + ", ".join(pts))
    for n in profile.get("notes", []):
        lines.append(f"note: {n}")
    return "\n".join(lines)
