"""Pieces the CPU benchmarks share: real models' layer shapes, random models built once, the prompt,
the machine description, llama.cpp's prefill and decode loop, and running an engine in a process of its own.

Nothing here imports torch or llama_cpp at import time: a worker process can join a memory cgroup
before either is loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# Layer shapes of real models (their config.json); the layer count is set by each benchmark.
SHAPES: dict[str, dict] = {
    "olmoe": {"hidden_size": 2048, "intermediate_size": 1024, "num_attention_heads": 16,
              "num_key_value_heads": 16, "head_dim": 128, "num_experts": 64, "num_experts_per_tok": 8,
              "vocab_size": 50304},
    "qwen3_moe": {"hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                  "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
                  "num_experts_per_tok": 8, "vocab_size": 151936},
}
MODEL_NAMES = {"olmoe": "OLMoE-1B-7B", "qwen3_moe": "Qwen3-30B-A3B"}


def machine() -> dict:
    """A description of this machine for the results file."""
    from profiler.hardware import describe
    try:
        import llama_cpp
        llama_version = llama_cpp.__version__
    except ImportError:
        llama_version = None
    return {**describe(), "llama_cpp_python": llama_version}


def prompt_tokens(n: int) -> list[int]:
    """A fixed pseudo-random prompt of n ids below 500 (inside every tokenizer used here)."""
    import random
    rng = random.Random(1234)
    return [rng.randrange(3, 500) for _ in range(n)]


def random_model(folder: Path, arch: str, config: dict, dtype: str = "float32") -> Path:
    """A random-weight Hugging Face folder of `arch` with `config` overrides, built unless already there."""
    if not (folder / "config.json").exists():
        import torch
        from daemon.tiny import make_tiny_model
        print(f"building random {arch} model in {folder} ...", file=sys.stderr, flush=True)
        make_tiny_model(arch, folder, seed=0, config=config, dtype=getattr(torch, dtype))
    return folder


def gguf_file(hf: Path, out: Path, qtype: str) -> Path:
    """`hf` exported to GGUF at `out` with tensors of `qtype`, unless already there."""
    if not out.exists():
        from daemon.gguf_export import export_gguf
        print(f"writing {out.name} ...", file=sys.stderr, flush=True)
        export_gguf(hf, out, qtype)
    return out


def llama_prefill(llm: Any, prompt: list[int]) -> tuple[float, int]:
    """Evaluate `prompt` in a llama_cpp.Llama; (seconds, greedy next token)."""
    import numpy as np
    t = time.perf_counter()
    llm.eval(prompt)
    seconds = time.perf_counter() - t
    return seconds, int(np.argmax(llm.scores[llm.n_tokens - 1]))


def llama_decode(llm: Any, token: int, n: int) -> list[float]:
    """Greedy-decode n tokens after `token` in a llama_cpp.Llama; the wall time of each step."""
    import numpy as np
    steps = []
    for _ in range(n):
        t = time.perf_counter()
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        steps.append(time.perf_counter() - t)
    return steps


class WorkerError(RuntimeError):
    """A worker process that exited without a result."""

    def __init__(self, returncode: int, stderr: str) -> None:
        self.returncode, self.stderr = returncode, stderr
        tail = "\n".join(stderr.strip().splitlines()[-20:])
        super().__init__(f"worker exited with {returncode}:\n{tail}")


def run_worker(cmd: list[str]) -> dict:
    """Run a worker command (a fresh process: no shared thread pools or caches); the JSON object its
    last stdout line holds."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        raise WorkerError(r.returncode, r.stderr)
    return json.loads(lines[-1])
