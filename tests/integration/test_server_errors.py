"""Bad input gets the fitting gRPC status with a message, and the server keeps serving."""

from __future__ import annotations

import math

import grpc
import pytest

from proto.moed.v1 import moed_pb2 as pb
from proto.moed.v1 import moed_pb2_grpc as pb_grpc

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
CONTEXT = 4096  # the tiny models' max_position_embeddings


def gen(**kw) -> pb.GenerateRequest:
    kw.setdefault("text", "The expert said")
    kw.setdefault("max_tokens", 4)
    sampling = kw.pop("sampling", None)
    req = pb.GenerateRequest(**kw)
    if sampling:
        req.sampling.CopyFrom(pb.SamplingParams(**sampling))
    return req


def utf8_broken(field: str) -> bytes:
    """A GenerateRequest whose `field` holds invalid UTF-8 (no client library would build it)."""
    marker = "MARKER"
    if field == "text":
        req = gen(text=marker)
    elif field == "stop":
        req = gen(stop=[marker])
    else:
        req = pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=marker)]))
    return req.SerializeToString().replace(marker.encode(), b"ab\xff\xfeef")


# (case, method, request (message or raw bytes), expected code, words the message must contain)
CASES = [
    ("empty text", "Generate", gen(text=""), INVALID, "empty"),
    ("no prompt", "Generate", pb.GenerateRequest(max_tokens=4), INVALID, "empty"),
    ("empty token list", "Generate", pb.GenerateRequest(tokens=pb.TokenIds(), max_tokens=4), INVALID, "empty"),
    ("empty chat", "Generate", pb.GenerateRequest(chat=pb.ChatMessages(), max_tokens=4), INVALID, "empty"),
    ("max_tokens 0", "Generate", gen(max_tokens=0), INVALID, "max_tokens"),
    ("max_tokens negative", "Generate", gen(max_tokens=-3), INVALID, "max_tokens"),
    ("max_tokens above the context", "Generate", gen(max_tokens=CONTEXT + 1), INVALID, "exceeds the context"),
    ("prompt + max_tokens above the context", "Generate",
     pb.GenerateRequest(tokens=pb.TokenIds(ids=[5] * 4000), max_tokens=200), INVALID, "exceeds the context"),
    ("temperature negative", "Generate", gen(sampling={"temperature": -0.5}), INVALID, "temperature"),
    ("temperature NaN", "Generate", gen(sampling={"temperature": math.nan}), INVALID, "temperature"),
    ("temperature inf", "Generate", gen(sampling={"temperature": math.inf}), INVALID, "temperature"),
    ("top_p 0", "Generate", gen(sampling={"top_p": 0.0}), INVALID, "top_p"),
    ("top_p above 1", "Generate", gen(sampling={"top_p": 1.01}), INVALID, "top_p"),
    ("top_p negative", "Generate", gen(sampling={"top_p": -0.2}), INVALID, "top_p"),
    ("top_p NaN", "Generate", gen(sampling={"top_p": math.nan}), INVALID, "top_p"),
    ("top_k negative", "Generate", gen(sampling={"top_k": -1}), INVALID, "top_k"),
    ("min_p above 1", "Generate", gen(sampling={"min_p": 2.0}), INVALID, "min_p"),
    ("repetition_penalty 0", "Generate", gen(sampling={"repetition_penalty": 0.0}), INVALID, "repetition_penalty"),
    ("repetition_penalty NaN", "Generate", gen(sampling={"repetition_penalty": math.nan}), INVALID,
     "repetition_penalty"),
    ("empty stop string", "Generate", gen(stop=[""]), INVALID, "stop"),
    ("unknown model", "Generate", gen(model="no-such-model"), NOT_FOUND, "no-such-model"),
    ("prompt longer than the context (ids)", "Generate",
     pb.GenerateRequest(tokens=pb.TokenIds(ids=[5] * (CONTEXT + 10))), INVALID, "context"),
    ("prompt longer than the context (text)", "Generate", gen(text="experts " * 5000, max_tokens=None), INVALID,
     "context"),
    ("token id negative", "Generate", pb.GenerateRequest(tokens=pb.TokenIds(ids=[3, -1])), INVALID, "token ids"),
    ("token id = vocab size", "Generate", pb.GenerateRequest(tokens=pb.TokenIds(ids=[512])), INVALID, "token ids"),
    ("token id huge", "Generate", pb.GenerateRequest(tokens=pb.TokenIds(ids=[2 ** 40])), INVALID, "token ids"),
    ("invalid UTF-8 in the prompt", "Generate", utf8_broken("text"), INVALID, "UTF-8"),
    ("invalid UTF-8 in a stop string", "Generate", utf8_broken("stop"), INVALID, "UTF-8"),
    ("invalid UTF-8 in a chat message", "Generate", utf8_broken("chat"), INVALID, "UTF-8"),
    ("not a protobuf at all", "Generate", b"\xff\xff\xff\xff", INVALID, "malformed"),
    ("tokenize nothing", "Tokenize", pb.TokenizeRequest(), INVALID, "empty"),
    ("tokenize for an unknown model", "Tokenize", pb.TokenizeRequest(text="x", model="nope"), NOT_FOUND, "nope"),
    ("load an empty path", "LoadModel", pb.LoadModelRequest(), INVALID, "path"),
    ("load a missing model", "LoadModel", pb.LoadModelRequest(path="/no/such/model"), NOT_FOUND, "/no/such/model"),
    ("unload an unknown model", "UnloadModel", pb.UnloadModelRequest(model="nope"), NOT_FOUND, "nope"),
    ("watch with a negative interval", "Watch", pb.WatchRequest(interval_seconds=-1), INVALID, "interval"),
    ("watch with a NaN interval", "Watch", pb.WatchRequest(interval_seconds=math.nan), INVALID, "interval"),
]
STREAMING = {"Generate", "Watch"}
RESPONSES = {"Generate": pb.GenerateResponse, "Tokenize": pb.TokenizeResponse, "LoadModel": pb.LoadModelResponse,
             "UnloadModel": pb.UnloadModelResponse, "Watch": pb.MetricsSnapshot}


@pytest.fixture(scope="module")
def server(moed_server):
    return moed_server()


@pytest.fixture(scope="module")
def channel(server):
    ch = grpc.insecure_channel(f"unix:{server.socket_path}")
    yield ch
    ch.close()


def call(channel: grpc.Channel, method: str, request: pb.GenerateRequest | bytes) -> None:
    """Call a method with a message or with raw bytes, reading every response."""
    path = f"/moed.v1.Moed/{method}"
    serialize = (lambda b: b) if isinstance(request, bytes) else type(request).SerializeToString
    des = RESPONSES[method].FromString
    if method in STREAMING:
        for _ in channel.unary_stream(path, request_serializer=serialize, response_deserializer=des)(
                request, timeout=30):
            pass
    else:
        channel.unary_unary(path, request_serializer=serialize, response_deserializer=des)(request, timeout=30)


@pytest.mark.parametrize("case,method,request_,code,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_status_and_the_server_keeps_serving(channel, case, method, request_, code, words):
    with pytest.raises(grpc.RpcError) as e:
        call(channel, method, request_)
    assert e.value.code() == code, (case, e.value.code(), e.value.details())
    assert words in e.value.details(), (case, e.value.details())
    good = list(pb_grpc.MoedStub(channel).Generate(gen(max_tokens=2, ignore_eos=True), timeout=30))
    assert [t for m in good for t in m.token_ids] and good[-1].summary.generated_tokens == 2


def test_the_daemon_served_every_case_without_a_crash(server, channel):
    st = pb_grpc.MoedStub(channel).Status(pb.StatusRequest())
    assert st.state == pb.SERVING_STATE_SERVING and server.engine.alive()
