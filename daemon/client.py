"""The CLI's gRPC client: finds the daemon, streams a generation, reads Status."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from daemon.errors import MoedError
from daemon.listen import client_sockets, socket_answers
from daemon.sampling import SamplingParams
from proto.moed.v1 import moed_pb2 as pb
from proto.moed.v1 import moed_pb2_grpc as pb_grpc


def find_daemon() -> Path | None:
    """The first default socket a daemon answers on, or None."""
    for path in client_sockets():
        if path.is_socket() and socket_answers(path):
            return path
    return None


def daemon_target(socket: str | None = None, tcp: str | None = None) -> str | None:
    """gRPC target for --socket/--tcp, else the default socket if a daemon answers there, else None."""
    if tcp:
        return tcp
    if socket:
        return f"unix:{socket}"
    found = find_daemon()
    return f"unix:{found}" if found else None


class Client:
    """A connection to moed; token (or $MOED_TOKEN) is sent as `authorization: Bearer <token>`."""

    def __init__(self, target: str, token: str | None = None) -> None:
        self.target = target
        token = token if token is not None else os.environ.get("MOED_TOKEN")
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.MoedStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def health(self, service: str = "", timeout: float = 5.0) -> int:
        """The health status (health_pb2.HealthCheckResponse.SERVING, ...)."""
        r = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout,
                                   metadata=self.metadata)
        return r.status

    def wait_serving(self, timeout: float = 60.0) -> bool:
        """Wait until health reports SERVING; False on timeout."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if self.health(timeout=1.0) == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        return False

    def generate(self, request: pb.GenerateRequest, timeout: float | None = None) -> Iterator[pb.GenerateResponse]:
        """Stream a generation's messages."""
        return self.stub.Generate(request, timeout=timeout, metadata=self.metadata)

    def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        """Token ids of a text or chat."""
        return self.stub.Tokenize(request, metadata=self.metadata)

    def status(self, timeout: float = 10.0) -> pb.StatusResponse:
        """The daemon's Status."""
        return self.stub.Status(pb.StatusRequest(), timeout=timeout, metadata=self.metadata)


def rpc_error(e: grpc.RpcError, target: str) -> MoedError:
    """A one-line user error for a failed call."""
    if e.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" not in (e.details() or ""):
        return MoedError(f"cannot reach moed at {target}: {e.details()} (is `moed serve` running?)")
    return MoedError(f"{e.code().name}: {e.details()}")


def generate_request(prompt: str, chat: bool, params: SamplingParams, max_tokens: int, model: str = "",
                     request_id: str = "") -> pb.GenerateRequest:
    """A GenerateRequest for a text prompt (wrapped in the chat template when chat)."""
    sampling = pb.SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                 min_p=params.min_p, repetition_penalty=params.repetition_penalty)
    if params.seed is not None:
        sampling.seed = params.seed
    req = pb.GenerateRequest(model=model, sampling=sampling, max_tokens=max_tokens, stop=list(params.stop),
                             request_id=request_id or f"cli-{os.getpid()}", ignore_eos=params.ignore_eos)
    if chat:
        req.chat.messages.add(role="user", content=prompt)
    else:
        req.text = prompt
    return req


def generate_via_daemon(target: str, prompt: str, chat: bool, params: SamplingParams, model: str = "",
                        as_json: bool = False) -> int:
    """`moed generate` through the daemon: stream text to stdout (or one JSON object), a summary to stderr."""
    req = generate_request(prompt, chat, params, params.max_tokens, model)
    tokens: list[int] = []
    text: list[str] = []
    steps: list[float] = []
    summary = None
    with Client(target) as c:
        try:
            for m in c.generate(req):
                tokens.extend(m.token_ids)
                text.append(m.text)
                if m.HasField("timing"):
                    steps.append(m.timing.step_seconds)
                if not as_json:
                    sys.stdout.write(m.text)
                    sys.stdout.flush()
                if m.HasField("summary"):
                    summary = m.summary
            prompt_ids = list(c.tokenize(pb.TokenizeRequest(model=model, chat=req.chat) if chat else
                                         pb.TokenizeRequest(model=model, text=prompt)).token_ids) if as_json else []
        except grpc.RpcError as e:
            if not as_json:
                sys.stdout.write("\n")
            raise rpc_error(e, target) from None
    if summary is None:
        raise MoedError(f"the daemon at {target} ended the stream without a summary")
    reason = pb.FinishReason.Name(summary.finish_reason).removeprefix("FINISH_REASON_").lower()
    if as_json:
        print(json.dumps({
            "model": summary.model, "prompt_tokens": prompt_ids, "tokens": tokens, "text": "".join(text),
            "finish_reason": reason, "daemon": target,
            "timings": {"prefill_s": summary.prefill_seconds, "queue_s": summary.queue_seconds,
                        "ttft_s": summary.ttft_seconds, "prefill_tokens_per_s": summary.prefill_tokens_per_second,
                        "decode_tokens_per_s": summary.decode_tokens_per_second, "step_s": steps},
        }))
    else:
        sys.stdout.write("\n")
        print(f"[{summary.prompt_tokens} prompt tokens, {summary.generated_tokens} generated, "
              f"ttft {summary.ttft_seconds * 1000:.0f} ms, decode {summary.decode_tokens_per_second:.1f} tok/s, "
              f"finish: {reason}, via {target}]", file=sys.stderr)
    return 0
