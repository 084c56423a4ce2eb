"""The gRPC server: a thin servicer over the engine, error mapping, token check, health, reflection."""

from __future__ import annotations

import hmac
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from daemon import __version__, wire
from daemon.config import Config
from daemon.engine import Engine, model_name
from daemon.errors import MoedError
from daemon.listen import check_tcp, default_socket, grpc_tcp_target, prepare_socket
from daemon.costcheck import CostCheck, StepPredictor
from daemon.metrics import Metrics, MetricsView
from daemon.records import TokenEvent
from daemon.request_errors import RequestError
from daemon.resources import CpuMeter, devices, gpu_note, ram_tier, rss_bytes
from proto.moed.v1 import moed_pb2 as pb

log = logging.getLogger("moed.server")
SERVICE = pb.DESCRIPTOR.services_by_name["Moed"]
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING_STATES = {"none": pb.SERVING_STATE_NO_MODEL, "loading": pb.SERVING_STATE_STARTING,
                  "loaded": pb.SERVING_STATE_SERVING, "idle_unloaded": pb.SERVING_STATE_SERVING}
DEADLINE_MARGIN = 0.005  # seconds


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A request body protobuf could not parse (e.g. invalid UTF-8 in a string field)."""

    error: str


def status_of(e: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message for an exception raised while serving a call."""
    if isinstance(e, RequestError):
        return getattr(grpc.StatusCode, e.code), str(e)
    if isinstance(e, (MoedError, ValueError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"


def _abort(context: grpc.ServicerContext, method: str, e: BaseException) -> None:
    code, message = status_of(e)
    if code == grpc.StatusCode.INTERNAL:
        log.error("call failed method=%s code=%s: %s", method, code.name, message, exc_info=e)
    else:
        log.info("call refused method=%s code=%s: %s", method, code.name, message)
    context.abort(code, message)


def guarded(name: str, fn: Callable, streaming: bool, draining: threading.Event) -> Callable:
    """fn with undecodable requests, draining and exceptions turned into gRPC statuses."""
    def check(request, context) -> None:
        if isinstance(request, Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {name} request: {request.error}")
        if draining.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "the daemon is shutting down")

    if streaming:
        def call_stream(request, context) -> Iterator:
            check(request, context)
            try:
                yield from fn(request, context)
            except Exception as e:
                _abort(context, name, e)
        return call_stream

    def call(request, context):
        check(request, context)
        try:
            return fn(request, context)
        except Exception as e:
            _abort(context, name, e)
    return call


def _parser(cls) -> Callable[[bytes], object]:
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return Undecodable(str(e))
    return parse


def moed_handler(servicer: "MoedServicer", draining: threading.Event) -> grpc.GenericRpcHandler:
    """The moed.v1.Moed service's handlers, every method guarded."""
    handlers = {}
    for m in SERVICE.methods:
        req, resp = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[m.name] = make(guarded(m.name, getattr(servicer, m.name), m.server_streaming, draining),
                                request_deserializer=_parser(req), response_serializer=resp.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)


class TokenInterceptor(grpc.ServerInterceptor):
    """Calls over TCP must carry `authorization: Bearer <token>` (compared in constant time)."""

    def __init__(self, token: str) -> None:
        self._want = f"Bearer {token}".encode()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        given = next((v for k, v in details.invocation_metadata or () if k == "authorization"), "")
        ok = hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._want)

        def wrap(behavior):
            def call(request, context):
                if not ok and context.peer().startswith(("ipv4:", "ipv6:")):
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token (send metadata "
                                  "'authorization: Bearer <token>')")
                return behavior(request, context)
            return call

        kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
        return handler._replace(**{k: wrap(getattr(handler, k)) for k in kinds if getattr(handler, k)})


class MoedServicer:
    """moed.v1.Moed: converts protobuf to the engine's records and back; no logic of its own."""

    def __init__(self, engine: Engine, metrics: Metrics, listening: list[str], stop: threading.Event) -> None:
        self.engine, self.metrics, self.listening, self._stop = engine, metrics, listening, stop
        self.started = time.monotonic()
        self.cpu = CpuMeter()  # Status reports the CPUs' busy share since the previous Status
        # one cost model for every Watch stream, refined by what the engine measures while serving
        self.predictor = StepPredictor()
        self._predict_lock = threading.Lock()

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        """Stream a generation."""
        left = context.time_remaining()
        # a hair before gRPC's own deadline, so the engine drops the request as expired, not as cancelled
        deadline = time.monotonic() + left - DEADLINE_MARGIN if left is not None and left < 1e9 else None
        handle = self.engine.submit(wire.gen_request(request, deadline))
        if not context.add_callback(handle.cancel):
            handle.cancel()
        rid = request.request_id
        for ev in handle.events():
            yield wire.token_response(ev, rid) if isinstance(ev, TokenEvent) else wire.final_response(ev, rid)

    def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        """Token ids of a text or chat."""
        ids, pieces = self.engine.tokenize(wire.prompt(request), request.model, not request.no_special)
        return pb.TokenizeResponse(token_ids=ids, pieces=pieces)

    def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        """The served model, then the others in the models directory."""
        out, seen = [], set()
        view = self.engine.model_view()
        if view is not None:
            out.append(wire.model_info(view))
            seen.add(Path(view.path).resolve())
        folder = self.engine.models_dir()
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if p.resolve() in seen or p.name.startswith("."):
                    continue
                if (p / "config.json").exists() or (p.is_file() and p.suffix == ".gguf"):
                    out.append(pb.ModelInfo(name=model_name(p), path=str(p), state=pb.MODEL_STATE_AVAILABLE))
        return pb.ListModelsResponse(models=out)

    def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.LoadModelResponse:
        """Load a model by path or name."""
        if not request.path:
            raise RequestError("path is empty")
        return pb.LoadModelResponse(model=wire.model_info(self.engine.load(request.path)))

    def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.UnloadModelResponse:
        """Unload the served model."""
        self.engine.unload(request.model)
        return pb.UnloadModelResponse()

    def Status(self, request: pb.StatusRequest, context) -> pb.StatusResponse:
        """What the daemon is and holds."""
        view = self.engine.model_view()
        rss, peak = rss_bytes()
        state = pb.SERVING_STATE_DRAINING if self._stop.is_set() else SERVING_STATES[self.engine.state]
        devs = devices(self.cpu)
        return pb.StatusResponse(
            version=__version__, uptime_seconds=time.monotonic() - self.started, state=state,
            model=wire.model_info(view) if view else None, devices=[wire.device(d) for d in devs],
            gpu_note=gpu_note(devs), tiers=[wire.tier(t) for t in self._tiers()],
            links=[wire.link(k) for k in self._links()], queue=wire.queue_info(self.engine.queue_view()),
            listening=self.listening, pid=os.getpid(), rss_bytes=rss, peak_rss_bytes=peak,
            keep_alive_seconds=self.engine.config.keep_alive)

    def Watch(self, request: pb.WatchRequest, context) -> Iterator[pb.MetricsSnapshot]:
        """Metrics snapshots every interval until the client leaves or the daemon stops."""
        interval = request.interval_seconds or 1.0
        if not math.isfinite(interval) or not 0.01 <= interval <= 3600:
            raise RequestError(f"interval_seconds must be in [0.01, 3600] (got {interval})")
        while context.is_active():
            experts = self._experts() if request.include_experts else []
            metrics = self.metrics.view()
            yield wire.snapshot(metrics, self.engine.queue_view(), experts, self._tiers(), self._links(),
                                rss_bytes()[0], self._cost_check(metrics))
            if self._stop.wait(interval):
                return

    def _bits(self) -> int:
        """The bit-width the served model's experts are computed at (tiered: the provider's)."""
        view, lm = self.engine.model_view(), self.engine.loaded
        if lm is not None and hasattr(lm.experts, "bits"):
            return lm.experts.bits
        return {"float32": 32, "float16": 16, "bfloat16": 16}.get(view.dtype, 0) if view else 0

    def _experts(self) -> list[tuple[int, list[int], list[tuple[str, int]]]]:
        """Per MoE layer: use counts and each expert's (tier, bits): tiered experts say where they are; else
        all are in RAM at the model's precision."""
        lm, use = self.engine.loaded, self.engine.expert_use()
        p = lm.experts if lm is not None else None
        if hasattr(p, "tier_views"):  # tiered: resident(tier) -> {(layer, expert): bits}
            ram, vram = p.resident("ram"), p.resident("vram")

            def where(key: tuple[int, int]) -> tuple[str, int]:
                return ("vram", vram[key]) if key in vram else ("ram", ram[key]) if key in ram else ("flash", 0)
        elif hasattr(p, "ensure"):  # a store read on first use: resident(layer, expert) -> Resident | None
            def where(key: tuple[int, int]) -> tuple[str, int]:
                r = p.resident(*key)
                return ("ram", r.bits) if r is not None else ("flash", 0)
        else:
            bits = self._bits()
            return [(layer, c, [("ram", bits)] * len(c)) for layer, c in use]
        return [(layer, c, [where((layer, e)) for e in range(len(c))]) for layer, c in use]

    def _cost_check(self, metrics: MetricsView) -> CostCheck | None:
        """The cost model's decode step time against the measured one (None: no machine profile), after it
        takes in the timings the tiered experts measured since the last check."""
        view, lm = self.engine.model_view(), self.engine.loaded
        if view is None or view.state != "loaded" or lm is None:
            return None
        timings = getattr(lm.experts, "timings", None)
        with self._predict_lock:
            observed = [timings.popleft() for _ in range(len(timings))] if timings is not None else []
            return self.predictor.check(view.path, lm.args.raw, self._bits(), metrics, observed)

    def _tiers(self):
        view, lm = self.engine.model_view(), self.engine.loaded
        if view is None or view.state != "loaded" or lm is None:
            return []
        if hasattr(lm.experts, "tier_views"):  # tiered experts report their own budgets and hits
            return lm.experts.tier_views()
        uses = sum(sum(c) for _, c in self.engine.expert_use())
        return [ram_tier(view.expert_bytes, view.moe_layers * view.experts_per_layer, uses, self._bits())]

    def _links(self):
        lm = self.engine.loaded
        return lm.experts.link_views() if lm is not None and hasattr(lm.experts, "link_views") else []


@dataclass(slots=True)
class Server:
    """The daemon's gRPC server on a unix socket (and optionally TCP) around an engine."""

    config: Config
    engine: Engine
    metrics: Metrics
    socket_path: Path | None = None
    tcp_port: int | None = None
    listening: list[str] = field(default_factory=list)
    draining: threading.Event = field(default_factory=threading.Event)
    health: health.HealthServicer = field(default_factory=lambda: health.HealthServicer(
        experimental_non_blocking=True))
    _grpc: grpc.Server | None = None

    def start(self) -> "Server":
        """Bind the socket (mode 0660) and TCP port, register services, start serving (health NOT_SERVING)."""
        cfg = self.config
        tcp = check_tcp(cfg.tcp, cfg.allow_remote, cfg.secret) if cfg.tcp else None
        workers = cfg.max_batch + cfg.max_queue + 16
        interceptors = [TokenInterceptor(cfg.secret)] if tcp and cfg.secret else []
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moed-rpc"),
                             interceptors=interceptors, maximum_concurrent_rpcs=workers)
        servicer = MoedServicer(self.engine, self.metrics, self.listening, self.draining)
        server.add_generic_rpc_handlers((moed_handler(servicer, self.draining),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE.full_name, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
        self.set_serving(False)
        path = Path(cfg.socket) if cfg.socket else default_socket()
        prepare_socket(path)
        old = os.umask(0o117)  # the socket is created 0660
        try:
            if not server.add_insecure_port(f"unix:{path}"):
                raise MoedError("cannot listen on this unix socket", path)
        finally:
            os.umask(old)
        os.chmod(path, 0o660)
        self.socket_path = path
        self.listening.append(f"unix:{path}")
        if tcp:
            try:
                port = server.add_insecure_port(grpc_tcp_target(*tcp))
            except RuntimeError as e:
                port = 0
                log.error("tcp bind failed: %s", e)
            if not port:
                server.stop(None)
                raise MoedError(f"cannot listen on tcp {cfg.tcp} (in use or not a local address)")
            self.tcp_port = port
            self.listening.append(f"tcp:{grpc_tcp_target(tcp[0], port)}")
        server.start()
        self._grpc = server
        log.info("listening on %s", " ".join(self.listening))
        return self

    def set_serving(self, serving: bool) -> None:
        """Health of the server ("") and of moed.v1.Moed."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE.full_name):
            self.health.set(name, status)

    def on_engine_state(self, state: str) -> None:
        """Engine state listener: SERVING when loaded (or idle-unloaded: it reloads on demand)."""
        self.set_serving(state in ("loaded", "idle_unloaded"))

    def shutdown(self, grace: float, now: threading.Event | None = None) -> int:
        """NOT_SERVING, refuse new calls, let streams finish for `grace` s (or until `now` is set), cancel
        the rest with a final message; return how many were cancelled."""
        self.health.enter_graceful_shutdown()
        self.draining.set()
        self.engine.drain()
        end = time.monotonic() + grace
        cancelled = 0
        while not self.engine.wait_idle(min(0.1, max(0.0, end - time.monotonic()))):
            if time.monotonic() >= end or (now is not None and now.is_set()):
                cancelled = self.engine.cancel_all("shutdown")
                log.warning("cancelled %d running or waiting requests (%s)", cancelled,
                            "grace period over" if time.monotonic() >= end else "second signal")
                break
        if self._grpc is not None:
            self._grpc.stop(5.0).wait()
        self.engine.stop()
        return cancelled

    def stop(self) -> None:
        """Stop at once (tests, start-up failures)."""
        self.draining.set()
        if self._grpc is not None:
            self._grpc.stop(None)
        self.engine.stop()
