"""The `moed` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

from daemon.errors import MoedError

DEFAULT_ARCH = "qwen3_moe"
# Modules that add subcommands: each defines register(subparsers) and sets `func` on its parsers.
COMMAND_MODULES: tuple[str, ...] = ("daemon.cli_convert", "daemon.cli_serve", "profiler.cli", "tui.cli")


def default_model_path() -> Path:
    """The built-in default model, created on first use in moed's data directory."""
    home = Path(os.environ.get("MOED_HOME") or Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share") / "moed")
    path = home / "models" / f"tiny-{DEFAULT_ARCH}"
    if not (path / "config.json").exists():
        from daemon.tiny import make_tiny_model
        make_tiny_model(DEFAULT_ARCH, path, seed=0)
    return path


def cmd_make_tiny_model(a: argparse.Namespace) -> int:
    """Write a tiny random-weight model of a real architecture."""
    from daemon.tiny import make_tiny_model
    out = Path(a.out)
    if a.format == "hf":
        make_tiny_model(a.arch, out, a.seed)
    else:
        from daemon.gguf_export import export_gguf
        with tempfile.TemporaryDirectory(prefix="moed-tiny-") as tmp:
            folder = make_tiny_model(a.arch, Path(tmp) / "hf", a.seed)
            export_gguf(folder, out, a.qtype)
    print(out)
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    """Generate text from a prompt, streaming it to stdout."""
    from daemon.generate import Summary, generate
    from daemon.loaders.build import load_model
    from daemon.sampling import SamplingParams

    params = SamplingParams(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                            repetition_penalty=a.repetition_penalty, seed=a.seed, max_tokens=a.max_tokens,
                            stop=tuple(a.stop or ()))
    try:
        params.validate()
    except ValueError as e:
        raise MoedError(str(e)) from None
    if (not a.in_process and getattr(a, "bits", None) is None and not a.record_trace
            and (a.socket or a.tcp or not a.model)):
        # a running daemon serves it
        from daemon.client import daemon_target, generate_via_daemon
        target = daemon_target(a.socket, a.tcp)
        if target is not None:
            return generate_via_daemon(target, a.prompt, a.chat, params, a.model or "", a.json)
    lm = load_model(a.model or default_model_path(), bits=a.bits)
    if a.record_trace:  # profiler/trace.py documents the format
        from profiler.trace import record_trace
        record_trace(lm, a.record_trace)
    tok = lm.tokenizer
    text = a.prompt
    if a.chat:
        text = tok.apply_chat_template([{"role": "user", "content": a.prompt}])
    prompt = tok.encode(text)
    if not prompt:
        raise MoedError("the prompt is empty after tokenisation")
    summary = Summary(prompt)
    streamed: list[str] = []
    for step in generate(lm, prompt, params, summary):
        streamed.append(step.text)
        if not a.json:
            sys.stdout.write(step.text)
            sys.stdout.flush()
    if a.json:
        print(json.dumps({
            "model": lm.source, "prompt_tokens": summary.prompt_tokens, "tokens": summary.tokens,
            "text": summary.text, "finish_reason": summary.finish_reason,
            "timings": {"prefill_s": summary.prefill_seconds, "decode_s": summary.decode_seconds,
                        "ttft_s": summary.ttft, "prefill_tokens_per_s": summary.prefill_tps,
                        "decode_tokens_per_s": summary.decode_tps, "step_s": summary.step_seconds},
        }))
    else:
        sys.stdout.write(summary.text[sum(map(len, streamed)):] + "\n")
        print(f"[{len(prompt)} prompt tokens, {len(summary.tokens)} generated, "
              f"prefill {summary.prefill_tps:.1f} tok/s, decode {summary.decode_tps:.1f} tok/s, "
              f"finish: {summary.finish_reason}]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    from daemon.models import SUPPORTED

    p = argparse.ArgumentParser(prog="moed", description="Local inference daemon for MoE language models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("make-tiny-model", help="write a tiny random model of a real architecture")
    t.add_argument("--arch", required=True, choices=SUPPORTED)
    t.add_argument("--out", required=True, help="output folder (hf) or file (gguf)")
    t.add_argument("--format", choices=("hf", "gguf"), default="hf")
    t.add_argument("--qtype", default="F32", help="GGUF tensor type: F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_make_tiny_model)

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("--model", help="HF model folder or GGUF file (default: the built-in tiny model)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--json", action="store_true", help="print one JSON object with ids, text and timings")
    g.add_argument("--socket", help="talk to the daemon on this unix socket")
    g.add_argument("--tcp", metavar="HOST:PORT", help="talk to the daemon at this TCP address (token: $MOED_TOKEN)")
    g.add_argument("--in-process", action="store_true",
                   help="load the model here even if a daemon is running (the default without one, or with --model)")
    g.add_argument("--bits", type=int, choices=range(1, 9), metavar="R",
                   help="run every routed expert at R bits (1-8; moed model directories from `moed convert`)")
    g.add_argument("--record-trace", metavar="FILE", help="record every step's expert routing to FILE (runs in-process)")
    g.set_defaults(func=cmd_generate)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a subcommand; user errors print one line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MoedError as e:
        print(f"moed: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
