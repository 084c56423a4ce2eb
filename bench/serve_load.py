#!/usr/bin/env python3
"""moed serve under load: N concurrent gRPC clients (1, 4, 16) vs the same generation in-process.

Builds a random-weight model with a generated config (cached in --work), starts `moed serve` on
it as a separate process, and for each client count drives a fixed number of greedy requests
through the unix socket, recording aggregate tokens/s, per-stream decode tokens/s, time to first
token and inter-token latency percentiles (client side), the mean batch size the engine ran, and
the daemon's peak RSS. The in-process baseline runs `daemon.generate.generate` on the same model,
prompts and thread count in its own process, alternating with single-stream daemon runs.
Writes bench/results/serve_load.json and bench/results/serve_load.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# A small Qwen3-MoE-shaped model with Mixtral's expert ratio (8 experts, top-2): a decode step is real
# work, yet it fits a CI box.
SMALL = {"hidden_size": 1024, "moe_intermediate_size": 512, "intermediate_size": 2048, "num_hidden_layers": 6,
         "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64, "num_experts": 8,
         "num_experts_per_tok": 2, "vocab_size": 8192}


def machine() -> dict:
    """A description of this machine for the results file."""
    from profiler.hardware import describe
    return describe()


def build(work: Path, arch: str) -> Path:
    """The benchmark model folder (cached)."""
    from daemon.tiny import make_tiny_model
    path = work / f"{arch}-serve-load"
    if not (path / "config.json").exists():
        print(f"building {path} ...", file=sys.stderr)
        make_tiny_model(arch, path, seed=0, config=SMALL)
    return path


def prompts(n: int) -> list[str]:
    """n different prompts of similar length."""
    return [f"Request {i}: which experts of layer {i % 6} were chosen most often, and why?" for i in range(n)]


def in_process(model: Path, threads: int, texts: list[str], max_tokens: int) -> list[dict]:
    """Per-request decode tokens/s of generate() in a fresh process (one stream at a time)."""
    code = f"""
import json, sys, torch
torch.set_num_threads({threads})
from daemon.loaders.build import load_model
from daemon.generate import Summary, generate
from daemon.sampling import SamplingParams
import time
lm = load_model({str(model)!r})
out = []
for k, text in enumerate({texts!r}):
    ids = lm.tokenizer.encode(text)
    s = Summary(ids)
    cpu = time.process_time()
    for _ in generate(lm, ids, SamplingParams(max_tokens={max_tokens}, ignore_eos=True), s):
        pass
    if k:  # the first request warms up
        out.append({{"decode_tps": s.decode_tps, "ttft": s.ttft, "tokens": len(s.tokens),
                     "cpu_s": time.process_time() - cpu}})
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(r.stdout)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drive(target: str, n_clients: int, texts: list[str], max_tokens: int, pid: int) -> dict:
    """Run every text as a request with n_clients concurrent streams; client-side timings, daemon CPU."""
    import grpc

    from proto.moed.v1 import moed_pb2 as pb
    from proto.moed.v1 import moed_pb2_grpc as pb_grpc

    todo = list(enumerate(texts))
    lock = threading.Lock()
    records: list[dict] = []

    def client() -> None:
        stub = pb_grpc.MoedStub(grpc.insecure_channel(target))
        while True:
            with lock:
                if not todo:
                    return
                _, text = todo.pop(0)
            t0 = time.perf_counter()
            times, tokens, batches = [], 0, []
            for m in stub.Generate(pb.GenerateRequest(text=text, max_tokens=max_tokens, ignore_eos=True)):
                if m.token_ids:
                    times.append(time.perf_counter())
                    tokens += len(m.token_ids)
                    batches.append(m.timing.batch_size)
            gaps = [b - a for a, b in zip(times, times[1:])]
            with lock:
                records.append({"ttft": times[0] - t0, "gaps": gaps, "tokens": tokens, "start": t0, "end": times[-1],
                                "decode_tps": (len(times) - 1) / (times[-1] - times[0]), "batches": batches})

    threads = [threading.Thread(target=client) for _ in range(n_clients)]
    cpu0 = cpu_seconds(pid)
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - cpu0
    gaps = [g for r in records for g in r["gaps"]]
    batches = [b for r in records for b in r["batches"]]
    return {"clients": n_clients, "requests": len(records), "tokens": sum(r["tokens"] for r in records),
            "wall_s": wall, "aggregate_tokens_per_s": sum(r["tokens"] for r in records) / wall,
            "daemon_cpu_s": cpu, "tokens_per_daemon_cpu_s": sum(r["tokens"] for r in records) / max(cpu, 1e-9),
            "stream_decode_tokens_per_s_median": statistics.median(r["decode_tps"] for r in records),
            "ttft_s": pct([r["ttft"] for r in records]), "itl_s": pct(gaps),
            "mean_batch_size": sum(batches) / len(batches)}


def pct(values: list[float]) -> dict:
    """p50/p90/p99/max by nearest rank."""
    from daemon.metrics import percentiles
    p = percentiles(values)
    return {"p50": p.p50, "p90": p.p90, "p99": p.p99, "max": p.max, "n": p.count}


def peak_rss(pid: int) -> int:
    """VmHWM of a process in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="qwen3_moe")
    p.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=32, help="requests per client count")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads, daemon and in-process alike (1: stable on a shared machine)")
    p.add_argument("--rounds", type=int, default=5, help="alternating in-process / daemon single-stream rounds")
    p.add_argument("--round-requests", type=int, default=4, help="requests per side in each round")
    p.add_argument("--level-rounds", type=int, default=2, help="times the client levels are run, interleaved")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "moed-bench"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = p.parse_args()
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    model = build(work, a.arch)
    info = machine()
    sock = Path(tempfile.mkdtemp(prefix="moed-bench-", dir="/tmp")) / "moed.sock"
    log = open(work / "serve.log", "w")
    daemon = subprocess.Popen([sys.executable, "-m", "daemon.cli", "serve", "--model", str(model), "--socket", str(sock),
                               "--threads", str(a.threads), "--max-batch", "16", "--max-queue", "64",
                               "--keep-alive", "-1", "--log-level", "warning"], cwd=ROOT, stdout=log, stderr=log)
    try:
        from daemon.client import Client
        target = f"unix:{sock}"
        with Client(target) as c:
            if not c.wait_serving(300):
                raise SystemExit(f"the daemon did not start; see {work / 'serve.log'}")
        texts = prompts(max(a.requests, 8))
        pid = daemon.pid
        drive(target, 4, texts[:8], 8, pid)  # warm-up
        single_in, single_d, cpu_in, cpu_d = [], [], [], []
        for r in range(a.rounds):  # alternate, so load from other work on the machine hits both alike
            print(f"round {r + 1}/{a.rounds}: in-process, then daemon, one stream", file=sys.stderr)
            n = a.round_requests
            runs_in = in_process(model, a.threads, texts[:n + 1], a.max_tokens)
            single_in.append(statistics.median(x["decode_tps"] for x in runs_in))
            cpu_in.append(sum(x["tokens"] for x in runs_in) / sum(x["cpu_s"] for x in runs_in))
            d = drive(target, 1, texts[1:n + 1], a.max_tokens, pid)
            single_d.append(d["stream_decode_tokens_per_s_median"])
            cpu_d.append(d["tokens_per_daemon_cpu_s"])
        runs: list[dict] = []
        for r in range(a.level_rounds):  # every level once per round: drifting load hits each level alike
            for n in (int(x) for x in a.clients.split(",")):
                print(f"round {r + 1}/{a.level_rounds}: {n} concurrent clients, {a.requests} requests", file=sys.stderr)
                runs.append({**drive(target, n, texts[:a.requests], a.max_tokens, pid), "round": r})
        rss = peak_rss(daemon.pid)
    finally:
        daemon.terminate()
        daemon.wait(60)
    inproc, via = statistics.median(single_in), statistics.median(single_d)
    paired = statistics.median(d / i for d, i in zip(single_d, single_in))  # robust to load that drifts
    levels = [min((x for x in runs if x["clients"] == n), key=lambda x: abs(  # the round with the median
        x["aggregate_tokens_per_s"] - statistics.median(y["aggregate_tokens_per_s"] for y in runs if y["clients"] == n)))
        for n in dict.fromkeys(x["clients"] for x in runs)]
    agg = {(x["round"], x["clients"]): x["aggregate_tokens_per_s"] for x in runs}
    ratios = [agg[(r, 16)] / agg[(r, 1)] for r in range(a.level_rounds) if (r, 16) in agg and (r, 1) in agg]
    per_cpu = {n: statistics.median(x["tokens_per_daemon_cpu_s"] for x in runs if x["clients"] == n)
               for n in dict.fromkeys(x["clients"] for x in runs)}
    result = {
        "machine": info, "model": {"arch": a.arch, **SMALL, "path": str(model)},
        "settings": {"threads": a.threads, "max_tokens": a.max_tokens, "requests_per_level": a.requests,
                     "rounds": a.rounds, "round_requests": a.round_requests, "level_rounds": a.level_rounds,
                     "max_batch": 16},
        "single_stream": {"in_process_decode_tokens_per_s": inproc, "daemon_decode_tokens_per_s": via,
                          "ratio": paired, "ratio_of_medians": via / inproc, "in_process_by_round": single_in,
                          "daemon_by_round": single_d,
                          "tokens_per_cpu_s_in_process": statistics.median(cpu_in),
                          "tokens_per_cpu_s_daemon": statistics.median(cpu_d),
                          "cpu_ratio": statistics.median(cpu_d) / statistics.median(cpu_in)},
        "levels": levels, "daemon_peak_rss_bytes": rss,
        "ratio_16_vs_1_aggregate": statistics.median(ratios) if ratios else None,
        "ratio_16_vs_1_by_round": ratios, "runs": runs,
        "tokens_per_daemon_cpu_s_by_clients": per_cpu,
        "cpu_ratio_16_vs_1": per_cpu[16] / per_cpu[1] if 1 in per_cpu and 16 in per_cpu else None,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    (out / "serve_load.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "serve_load.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    """The results as a short markdown report."""
    m, s = r["machine"], r["single_stream"]
    lines = [
        "# moed serve under load", "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['ram_gib']} GiB RAM; torch {m['torch']}; "
        f"load average at start {', '.join(f'{x:.1f}' for x in m['load_average'])} (the machine may be "
        "shared with other work while measuring).",
        f"Model: random-weight {r['model']['arch']}, hidden {r['model']['hidden_size']}, "
        f"{r['model']['num_hidden_layers']} layers, {r['model']['num_experts']} experts top-"
        f"{r['model']['num_experts_per_tok']}, vocab {r['model']['vocab_size']}; greedy, "
        f"{r['settings']['max_tokens']} tokens per request, {r['settings']['threads']} torch threads; "
        f"command: `python bench/{r['command']}`.", "",
        "| one stream | decode tokens/s |", "|---|---:|",
        f"| in-process (`generate`) | {s['in_process_decode_tokens_per_s']:.1f} |",
        f"| through the daemon (gRPC, unix socket) | {s['daemon_decode_tokens_per_s']:.1f} |",
        f"| ratio daemon / in-process (median of {len(s['daemon_by_round'])} alternating rounds) | "
        f"{s['ratio']:.3f} (aim >= 0.95) |",
        f"| tokens per CPU-second: in-process / daemon process (prefill included) | "
        f"{s['tokens_per_cpu_s_in_process']:.1f} / {s['tokens_per_cpu_s_daemon']:.1f} = {s['cpu_ratio']:.3f} |",
        "", "Rounds (in-process / daemon tok/s): " + ", ".join(
            f"{i:.1f} / {d:.1f}" for i, d in zip(s["in_process_by_round"], s["daemon_by_round"])) + ".", "",
        "| clients | requests | aggregate tok/s | tok per daemon CPU-s | stream decode tok/s (median) | mean batch "
        "| TTFT p50 / p90 / p99 ms | ITL p50 / p90 / p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for lv in r["levels"]:
        t, i = lv["ttft_s"], lv["itl_s"]
        lines.append(f"| {lv['clients']} | {lv['requests']} | {lv['aggregate_tokens_per_s']:.1f} | "
                     f"{lv['tokens_per_daemon_cpu_s']:.1f} | "
                     f"{lv['stream_decode_tokens_per_s_median']:.1f} | {lv['mean_batch_size']:.1f} | "
                     f"{t['p50'] * 1e3:.1f} / {t['p90'] * 1e3:.1f} / {t['p99'] * 1e3:.1f} | "
                     f"{i['p50'] * 1e3:.1f} / {i['p90'] * 1e3:.1f} / {i['p99'] * 1e3:.1f} |")
    if r["ratio_16_vs_1_aggregate"] is not None:
        lines += ["", f"16 concurrent vs 1: {r['ratio_16_vs_1_aggregate']:.2f}x aggregate tokens/s (aim >= 3x; "
                      f"median over rounds: {', '.join(f'{x:.2f}' for x in r['ratio_16_vs_1_by_round'])}). "
                      "The table shows each level's median round."]
    if r["cpu_ratio_16_vs_1"] is not None:
        lines += [f"Per daemon CPU-second (less sensitive to other work on the machine): 16 clients give "
                  f"{r['cpu_ratio_16_vs_1']:.2f}x the tokens of 1."]
    lines += [f"Daemon peak RSS: {r['daemon_peak_rss_bytes'] / 2**20:.0f} MiB.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
