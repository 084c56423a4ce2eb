"""`moed serve` (the daemon) and `moed status` (what it is doing)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time

from daemon.errors import MoedError

log = logging.getLogger("moed")
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
STATUS_PERIOD = 10.0  # seconds between STATUS= updates while serving


class LineFormatter(logging.Formatter):
    """One line per record: `<priority>logger: message key=value...` for journald, timestamped otherwise."""

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += " exc=" + json.dumps(self.formatException(record.exc_info))
        msg = msg.replace("\n", " | ")
        if self.journal:
            return f"<{PRIORITIES.get(record.levelno, 6)}>{record.name}: {msg}"
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        return f"{ts}.{int(record.msecs):03d} {record.levelname.lower()} {record.name}: {msg}"


def setup_logging(level: str) -> None:
    """Structured lines on stderr; syslog priority prefixes when stderr goes to the journal."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter(journal=bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger("moed")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def run_daemon(config) -> int:
    """Serve until SIGTERM/SIGINT, then drain; returns the exit status."""
    import torch

    from daemon.cli import default_model_path
    from daemon.engine import Engine
    from daemon.listen import default_socket
    from daemon.metrics import Metrics
    from daemon.server import Server
    from daemon.systemd import Notifier, Watchdog, extending_timeout, watchdog_interval

    setup_logging(config.log_level)
    if config.threads:
        torch.set_num_threads(config.threads)
    stop, now = threading.Event(), threading.Event()  # first signal: drain; second: cancel at once

    def on_signal(signum: int, frame) -> None:
        (now if stop.is_set() else stop).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    notifier = Notifier.from_env()
    metrics = Metrics()
    engine = Engine(config, metrics)
    server = Server(config, engine, metrics)
    engine.on_state = server.on_engine_state
    notifier.status("starting")
    server.start()
    watchdog = None
    try:
        engine.start()
        model = config.model or str(default_model_path())
        with extending_timeout(notifier, f"loading {model}"):
            view = engine.load(model)
        where = " ".join(server.listening)
        notifier.ready(f"serving {view.name} on {where}")
        log.info("serving model=%s on %s (max_batch=%d max_queue=%d keep_alive=%s)", view.name, where,
                 config.max_batch, config.max_queue, config.keep_alive)
        hint = "" if server.socket_path == default_socket() else f" --socket {server.socket_path}"
        log.info('talk to it from another terminal: moed generate%s --prompt "Hello"; moed status%s', hint, hint)
        interval = watchdog_interval()
        if interval:
            watchdog = Watchdog(notifier, interval, lambda: engine.alive(stall=interval)).start()
        while not stop.wait(STATUS_PERIOD):
            q, m = engine.queue_view(), metrics.view()
            notifier.status(f"serving {view.name}: {q.running} running, {q.waiting} waiting, "
                            f"{m.decode_tokens_per_second:.1f} tok/s")
    except BaseException:
        server.stop()
        raise
    q = engine.queue_view()
    log.info("stopping: draining %d running and %d waiting requests (grace %.0f s)", q.running, q.waiting,
             config.grace_period)
    notifier.stopping(f"draining {q.running + q.waiting} requests")
    cancelled = server.shutdown(config.grace_period, now)
    if watchdog is not None:
        watchdog.stop()
    log.info("stopped (%d requests cancelled at the end of the grace period)", cancelled)
    notifier.close()
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    """Run the daemon."""
    from daemon.config import load_config
    flags = {"model": a.model, "socket": a.socket, "tcp": a.tcp, "allow_remote": True if a.allow_remote else None,
             "token_file": a.token_file, "max_batch": a.max_batch, "max_queue": a.max_queue,
             "keep_alive": a.keep_alive, "grace_period": a.grace_period, "threads": a.threads,
             "warmup": False if a.no_warmup else None, "log_level": a.log_level, "bits": a.bits,
             "ram_budget": a.ram_budget, "vram_budget": a.vram_budget, "policy": a.policy,
             "dense_bits": a.dense_bits}
    return run_daemon(load_config(a.config, flags=flags))


def cmd_status(a: argparse.Namespace) -> int:
    """Print the daemon's Status."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from daemon.client import Client, daemon_target, rpc_error
    target = daemon_target(a.socket, a.tcp)
    if target is None:
        raise MoedError("no daemon answers on the default sockets (start one with `moed serve`, or pass --socket)")
    with Client(target) as c:
        try:
            s = c.status()
        except grpc.RpcError as e:
            raise rpc_error(e, target) from None
    if a.json:
        print(json.dumps(MessageToDict(s, preserving_proto_field_name=True), indent=2))
    else:
        print(format_status(s))
    return 0


def format_status(s) -> str:
    """Status as a few human-readable lines."""
    from proto.moed.v1 import moed_pb2 as pb
    gib = 2 ** 30
    state = pb.ServingState.Name(s.state).removeprefix("SERVING_STATE_").lower()
    lines = [f"moed {s.version}  pid {s.pid}  up {s.uptime_seconds:.0f} s  {state}",
             f"listening: {' '.join(s.listening)}"]
    if s.HasField("model"):
        m = s.model
        lines.append(f"model: {m.name} ({m.architecture}, {m.parameters / 1e6:.1f}M parameters, {m.layers} layers, "
                     f"{m.experts_per_layer} experts top-{m.experts_per_token}, context {m.context_length}, "
                     f"{m.dtype}) {pb.ModelState.Name(m.state).removeprefix('MODEL_STATE_').lower()}")
        lines.append(f"       {m.path}")
    else:
        lines.append("model: none loaded")
    q = s.queue
    lines.append(f"queue: {q.running}/{q.max_batch} running, {q.waiting}/{q.max_queue} waiting, "
                 f"{q.completed} completed, {q.rejected} rejected, {q.engine_steps} steps")
    for d in s.devices:
        lines.append(f"device {d.name}: {d.description}, {d.memory_used_bytes / gib:.1f}/"
                     f"{d.memory_total_bytes / gib:.1f} GiB used" + (f", {d.threads} threads" if d.threads else ""))
    for t in s.tiers:
        lines.append(f"tier {t.name}: {t.used_bytes / 2**20:.1f} MiB of {t.budget_bytes / gib:.1f} GiB, "
                     f"{t.experts_resident}/{t.experts_total} experts, hit rate {t.hit_rate:.2f}")
    for k in s.links:
        lines.append(f"link {k.source}->{k.target}: {k.bytes_moved / 2**20:.1f} MiB in {k.transfers} transfers, "
                     f"busy {k.busy_seconds:.2f} s")
    lines.append(f"memory: rss {s.rss_bytes / 2**20:.0f} MiB (peak {s.peak_rss_bytes / 2**20:.0f} MiB)")
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `serve` and `status` to the moed command."""
    from daemon.cli import add_offload_args
    s = sub.add_parser("serve", help="run the daemon (gRPC on a unix socket, optionally loopback TCP)")
    s.add_argument("--model", help="model folder or GGUF file (default: the built-in pydoc-moe)")
    s.add_argument("--socket", help="unix socket path (default: $XDG_RUNTIME_DIR/moed/moed.sock, "
                                    "/run/moed/moed.sock under systemd)")
    s.add_argument("--tcp", metavar="HOST:PORT", help="also listen on TCP (loopback unless --allow-remote)")
    s.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --tcp address (needs a token)")
    s.add_argument("--token-file", help="file with the token TCP clients must send (or set MOED_TOKEN)")
    s.add_argument("--config", help="TOML config file (settings: see deploy/moed.toml)")
    s.add_argument("--max-batch", type=int, help="sequences per decode step (default 8)")
    s.add_argument("--max-queue", type=int, help="waiting requests before RESOURCE_EXHAUSTED (default 64)")
    s.add_argument("--keep-alive", help="unload the weights after this idle time: 30s, 5m, -1 = never (default 5m)")
    s.add_argument("--grace-period", help="time running streams get to finish on SIGTERM (default 30s)")
    s.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    s.add_argument("--no-warmup", action="store_true", help="serve without a warm-up generation")
    s.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    add_offload_args(s)
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("status", help="print what the running daemon is doing")
    t.add_argument("--socket", help="unix socket of the daemon (default: the first that answers)")
    t.add_argument("--tcp", metavar="HOST:PORT", help="TCP address of the daemon")
    t.add_argument("--json", action="store_true", help="print the Status message as JSON")
    t.set_defaults(func=cmd_status)
