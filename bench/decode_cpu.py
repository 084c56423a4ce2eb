#!/usr/bin/env python3
"""moed vs llama.cpp (llama-cpp-python): prefill and decode tokens/s on the CPU, same GGUF file, same threads.

Builds a random-weight model with a real architecture's layer shapes (fewer layers so it fits
this machine), writes it as GGUF, and runs each engine in its own process on that one file.
Also measures moed's Python overhead per decoded token: the same layer structure (layers, heads,
experts, top-k) with every matrix shrunk so that kernels cost ~nothing.
Writes bench/results/decode_cpu.json and bench/results/decode_cpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import (MODEL_NAMES, SHAPES, WorkerError, gguf_file, llama_decode, llama_prefill,  # noqa: E402
                           machine, prompt_tokens, random_model, run_worker)

# The same structure with tiny matrices: what is left of a decode step is overhead.
OVERHEAD_DIMS = {"hidden_size": 64, "intermediate_size": 32, "head_dim": 16,
                 "vocab_size": 512}


def build(args: argparse.Namespace) -> tuple[Path, Path]:
    """The benchmark GGUF (realistic shapes) and the overhead HF folder (tiny shapes), cached in --work."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = {**SHAPES[args.arch], "num_hidden_layers": args.layers}
    gguf = work / f"{args.arch}-L{args.layers}-{args.qtype}.gguf"
    if not gguf.exists():
        hf = random_model(work / f"{args.arch}-L{args.layers}-hf", args.arch, cfg, "bfloat16")
        gguf_file(hf, gguf, args.qtype)
    small = random_model(work / f"{args.arch}-L{args.layers}-overhead", args.arch, {**cfg, **OVERHEAD_DIMS})
    return gguf, small


def run_moed(model: str, threads: int, n_prompt: int, n_decode: int) -> dict:
    """Prefill then greedy decode in moed; per-step wall times."""
    import torch
    from daemon.loaders.build import load_model

    torch.set_num_threads(threads)
    t = time.perf_counter()
    lm = load_model(model)
    load_s = time.perf_counter() - t
    prompt = prompt_tokens(n_prompt)
    with torch.inference_mode():
        warm = lm.model.new_cache()
        lm.model(torch.tensor([prompt[:8]]), warm, last_only=True)
        cache = lm.model.new_cache(n_prompt + n_decode)
        t = time.perf_counter()
        logits = lm.model(torch.tensor([prompt]), cache, last_only=True)[0, -1]
        prefill_s = time.perf_counter() - t
        steps = []
        tok = int(logits.argmax())
        for _ in range(n_decode):
            t = time.perf_counter()
            tok = int(lm.model(torch.tensor([[tok]]), cache)[0, -1].argmax())
            steps.append(time.perf_counter() - t)
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_step_s": steps}


def run_llama(model: str, threads: int, n_prompt: int, n_decode: int) -> dict:
    """Prefill then greedy decode in llama.cpp on the same file; per-step wall times."""
    from llama_cpp import Llama

    t = time.perf_counter()
    llm = Llama(model_path=model, n_ctx=n_prompt + n_decode + 16, n_batch=max(512, n_prompt),
                n_threads=threads, n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t
    prompt = prompt_tokens(n_prompt)
    llm.eval(prompt[:8])
    llm.reset()
    prefill_s, tok = llama_prefill(llm, prompt)
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_step_s": llama_decode(llm, tok, n_decode)}


def worker(engine: str, model: str, a: argparse.Namespace) -> dict:
    """Run one engine in a fresh process (no shared thread pools or caches) and return its figures."""
    cmd = [sys.executable, __file__, "--worker", engine, "--worker-model", model, "--threads", str(a.threads),
           "--prompt-tokens", str(a.prompt_tokens), "--decode-tokens", str(a.decode_tokens)]
    try:
        return run_worker(cmd)
    except WorkerError as e:
        raise SystemExit(f"{engine} worker failed:\n{e.stderr}") from None


def summarise(r: dict, n_prompt: int) -> dict:
    """tokens/s figures from raw timings (median decode step)."""
    steps = r["decode_step_s"]
    med = statistics.median(steps)
    return {"load_s": round(r["load_s"], 3), "prefill_tokens_per_s": round(n_prompt / r["prefill_s"], 2),
            "decode_tokens_per_s": round(1 / med, 2), "decode_step_ms_median": round(med * 1e3, 3),
            "decode_step_ms_p90": round(sorted(steps)[int(0.9 * (len(steps) - 1))] * 1e3, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(SHAPES), default="olmoe")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (the real model has more)")
    p.add_argument("--qtype", default="F32", help="GGUF tensor type (moed computes in fp32 either way)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "moed-bench"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "decode_cpu"))
    p.add_argument("--worker", choices=("moed", "llama"), help=argparse.SUPPRESS)
    p.add_argument("--worker-model", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:
        fn = run_moed if a.worker == "moed" else run_llama
        print(json.dumps(fn(a.worker_model, a.threads, a.prompt_tokens, a.decode_tokens)))
        return

    gguf, small = build(a)
    raw = {"llama.cpp": worker("llama", str(gguf), a), "moed": worker("moed", str(gguf), a),
           "moed_overhead": worker("moed", str(small), a)}
    s = {k: summarise(v, a.prompt_tokens) for k, v in raw.items()}
    overhead_ms = s["moed_overhead"]["decode_step_ms_median"]
    result = {
        "benchmark": "decode_cpu", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
        "model": {"shapes_of": MODEL_NAMES[a.arch], "arch": a.arch, "layers": a.layers, "qtype": a.qtype,
                  "file": gguf.name, "file_bytes": gguf.stat().st_size, "weights": "random"},
        "threads": a.threads, "prompt_tokens": a.prompt_tokens, "decode_tokens": a.decode_tokens,
        "llama.cpp": s["llama.cpp"], "moed": s["moed"],
        "ratio_moed_over_llama": {
            "prefill": round(s["moed"]["prefill_tokens_per_s"] / s["llama.cpp"]["prefill_tokens_per_s"], 3),
            "decode": round(s["moed"]["decode_tokens_per_s"] / s["llama.cpp"]["decode_tokens_per_s"], 3)},
        "moed_python_overhead_ms_per_token": overhead_ms,
        "moed_python_overhead_share_of_decode": round(overhead_ms / s["moed"]["decode_step_ms_median"], 3),
        "raw": raw,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    m = result["machine"]
    md = [
        f"# decode_cpu: moed vs llama.cpp ({result['date']})", "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['ram_gib']} GiB RAM; torch {m['torch']}, "
        f"llama-cpp-python {m['llama_cpp_python']}.",
        f"Model: random weights with {MODEL_NAMES[a.arch]} layer shapes, {a.layers} layers, GGUF {a.qtype} "
        f"({gguf.stat().st_size / 2**30:.2f} GiB), same file for both; {a.threads} threads each; "
        f"{a.prompt_tokens} prompt tokens, {a.decode_tokens} greedy decode steps (median step).", "",
        "| engine | prefill tok/s | decode tok/s | decode step ms (median / p90) |",
        "|---|---|---|---|",
    ]
    for k in ("llama.cpp", "moed"):
        r = s[k]
        md.append(f"| {k} | {r['prefill_tokens_per_s']} | {r['decode_tokens_per_s']} | "
                  f"{r['decode_step_ms_median']} / {r['decode_step_ms_p90']} |")
    md += ["", f"Ratio moed / llama.cpp: prefill {result['ratio_moed_over_llama']['prefill']}x, "
               f"decode {result['ratio_moed_over_llama']['decode']}x.",
           f"moed Python overhead per decoded token (same structure, tiny matrices): {overhead_ms} ms "
           f"({100 * result['moed_python_overhead_share_of_decode']:.0f}% of a decode step).", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
