"""TCP listening: loopback only unless --allow-remote, and then every TCP call needs the token."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from daemon.errors import MoedError
from proto.moed.v1 import moed_pb2 as pb
from proto.moed.v1 import moed_pb2_grpc as pb_grpc

TOKEN = "correct horse battery staple"


def test_non_loopback_bind_is_refused_without_allow_remote(moed_server):
    with pytest.raises(MoedError, match="refusing to listen on non-loopback address 0.0.0.0:0"):
        moed_server(load=False, tcp="0.0.0.0:0")
    with pytest.raises(MoedError, match="needs a token"):
        moed_server(load=False, tcp="0.0.0.0:0", allow_remote=True)


@pytest.fixture(scope="module")
def remote(moed_server):
    return moed_server(tcp="0.0.0.0:0", allow_remote=True, token=TOKEN)


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),),
                                      (("x-token", TOKEN),)], ids=["none", "wrong", "no-bearer", "other-key"])
def test_tcp_call_without_the_right_token_is_unauthenticated(remote, metadata):
    channel = grpc.insecure_channel(f"127.0.0.1:{remote.tcp_port}")
    with pytest.raises(grpc.RpcError) as e:
        pb_grpc.MoedStub(channel).Status(pb.StatusRequest(), metadata=metadata)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "token" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(pb_grpc.MoedStub(channel).Generate(pb.GenerateRequest(text="x", max_tokens=2), metadata=metadata))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), metadata=metadata)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tcp_call_with_the_token_and_unix_calls_without_it_are_served(remote):
    good = (("authorization", f"Bearer {TOKEN}"),)
    tcp = pb_grpc.MoedStub(grpc.insecure_channel(f"127.0.0.1:{remote.tcp_port}"))
    msgs = list(tcp.Generate(pb.GenerateRequest(text="x", max_tokens=2, ignore_eos=True), metadata=good))
    assert msgs[-1].summary.generated_tokens == 2
    unix = grpc.insecure_channel(f"unix:{remote.socket_path}")
    assert pb_grpc.MoedStub(unix).Status(pb.StatusRequest()).state == pb.SERVING_STATE_SERVING
    assert health_pb2_grpc.HealthStub(unix).Check(health_pb2.HealthCheckRequest()).status == \
        health_pb2.HealthCheckResponse.SERVING


def test_client_sends_moed_token(remote, monkeypatch):
    from daemon.client import Client
    monkeypatch.setenv("MOED_TOKEN", TOKEN)
    with Client(f"127.0.0.1:{remote.tcp_port}") as c:
        assert c.status().model.architecture == "qwen3_moe"
