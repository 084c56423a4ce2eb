"""Record routing traces of the default model on held-out text, with `moed generate --record-trace`.

    python tools/record_traces.py [--out bench/traces] [--tokens 256]

For each of the first N held-out documents of the training corpus (tools/train_default_model.py
keeps them out of training), the prompt is the document's opening (about 1,000 characters) and the
model continues it, sampling (temperature 0.8, top-p 0.95, fixed seeds) so that the decode steps
follow the model's own text. Each run is the real CLI in a subprocess; `moed trace stats --json`
of each trace is written beside it, and bench/traces/README.md gets the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from train_default_model import documents, fetch_docs  # noqa: E402

MOED = [sys.executable, "-m", "daemon.cli"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "traces"))
    ap.add_argument("--docs", type=int, default=4, help="held-out documents to prompt with")
    ap.add_argument("--chars", type=int, default=1000, help="prompt length in characters")
    ap.add_argument("--tokens", type=int, default=256, help="tokens to generate per trace")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    _, held = documents(fetch_docs())
    rows = []
    for i, doc in enumerate(held[:a.docs]):
        prompt = doc[:a.chars].rsplit(" ", 1)[0]
        trace = out / f"pydoc-heldout-{i}.jsonl"
        r = subprocess.run([*MOED, "generate", "--in-process", "--prompt", prompt, "--max-tokens", str(a.tokens),
                            "--temperature", "0.8", "--top-p", "0.95", "--seed", str(i), "--json",
                            "--record-trace", str(trace)], capture_output=True, text=True, check=True, cwd=ROOT)
        gen = json.loads(r.stdout)
        stats = subprocess.run([*MOED, "trace", "stats", "--json", str(trace)], capture_output=True, text=True,
                               check=True, cwd=ROOT).stdout
        (out / f"pydoc-heldout-{i}.stats.json").write_text(stats)
        table = subprocess.run([*MOED, "trace", "stats", str(trace)], capture_output=True, text=True, check=True,
                               cwd=ROOT).stdout
        prompt_tokens = len(gen["prompt_tokens"]) if isinstance(gen["prompt_tokens"], list) else gen["prompt_tokens"]
        rows.append((trace.name, prompt_tokens, len(gen["tokens"]), table))
        print(trace, prompt_tokens, len(gen["tokens"]), flush=True)
    lines = ["# Routing traces of the default model (pydoc-moe) on held-out text", "",
             "Recorded by `python tools/record_traces.py` (each with `moed generate --in-process --record-trace`,",
             "prompt: the opening of a held-out document of the training corpus, then sampled tokens:",
             "temperature 0.8, top-p 0.95, seed = the trace's number). Format: profiler/trace.py.",
             "Below: `moed trace stats` of each (per-layer skew, reuse distance, LRU and ideal hit rates).", ""]
    for name, prompt_tokens, generated, table in rows:
        lines += [f"## {name}", "", f"{prompt_tokens} prompt tokens (one prefill step), {generated} decode steps.",
                  "", "```", table.rstrip(), "```", ""]
    (out / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
