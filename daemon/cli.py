"""The `moed` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from pathlib import Path

from daemon.errors import MoedError
from offload.cache import POLICIES as CACHE_POLICIES

# Modules that add subcommands: each defines register(subparsers) and sets `func` on its parsers.
COMMAND_MODULES: tuple[str, ...] = ("daemon.cli_convert", "daemon.cli_serve", "profiler.cli", "tui.cli")


DEFAULT_MODEL = Path(__file__).resolve().parent / "data" / "pydoc-moe"


def default_model_path() -> Path:
    """The built-in default model: a small Qwen3-MoE trained on the Python documentation
    (tools/train_default_model.py; its model card is daemon/data/pydoc-moe/README.md)."""
    if not (DEFAULT_MODEL / "config.json").exists():
        raise MoedError("the built-in default model is missing from this installation", DEFAULT_MODEL)
    return DEFAULT_MODEL


def add_offload_args(p: argparse.ArgumentParser) -> None:
    """--bits, --ram-budget, --vram-budget, --policy (for generate and serve)."""
    p.add_argument("--bits", metavar="R", help="routed experts at R bits: 1-8 or auto (the most that fit "
                   "--ram-budget); a model that is not a moed store is converted to one on first use")
    p.add_argument("--ram-budget", metavar="SIZE", help="RAM for experts: bytes (512MiB, 2G), a percentage of "
                   "the experts' 8-bit bytes (25%%) or of the memory free once the rest of the model is loaded "
                   "(80%%free, within any cgroup limit); the rest is read from flash when used")
    p.add_argument("--vram-budget", metavar="SIZE", help="GPU memory for experts, same forms (needs a GPU)")
    p.add_argument("--policy", choices=tuple(CACHE_POLICIES), help="expert cache policy (default moed)")
    p.add_argument("--dense-bits", type=int, choices=(8, 4), help="hold the dense weights (attention, shared and "
                   "dense MLPs, lm_head) at 8 bits, as a Q8_0 GGUF does, or at 4, as a Q4_0 one (the embedding at 8; "
                   "default: as stored)")


def offload_options(a: argparse.Namespace):
    """OffloadOptions from the flags of add_offload_args (None when none is given)."""
    from daemon.config import load_config
    cfg = load_config(None, env={}, flags={"bits": a.bits, "ram_budget": a.ram_budget,
                                           "vram_budget": a.vram_budget, "policy": a.policy})
    return cfg.offload()


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
    offload = offload_options(a)
    if (not a.in_process and offload is None and not a.record_trace and a.dense_bits is None
            and (a.socket or a.tcp or not a.model)):
        # a running daemon serves it
        from daemon.client import daemon_target, generate_via_daemon
        target = daemon_target(a.socket, a.tcp)
        if target is not None:
            return generate_via_daemon(target, a.prompt, a.chat, params, a.model or "", a.json)
    lm = load_model(a.model or default_model_path(), offload=offload, dense_bits=a.dense_bits)
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
    g.add_argument("--model", help="HF model folder or GGUF file (default: the built-in pydoc-moe)")
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
    add_offload_args(g)
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
