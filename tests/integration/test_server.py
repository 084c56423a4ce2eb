"""The real gRPC server on a unix socket and loopback TCP: health, reflection, batching, limits."""

from __future__ import annotations

import os
import stat
import threading
import time

import grpc
import pytest
import torch
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from proto.moed.v1 import moed_pb2 as pb
from proto.moed.v1 import moed_pb2_grpc as pb_grpc

TIE = 1e-4  # greedy choices closer than this may go either way
PROMPTS = [f"Request {i}: the experts of layer {i % 3} said" + " more" * (i % 5) for i in range(16)]


@pytest.fixture(scope="module")
def server(moed_server):
    return moed_server(tcp="127.0.0.1:0", max_batch=16, max_queue=8)


def targets(server) -> list[str]:
    return [f"unix:{server.socket_path}", f"127.0.0.1:{server.tcp_port}"]


def stub(target: str) -> pb_grpc.MoedStub:
    return pb_grpc.MoedStub(grpc.insecure_channel(target))


def run(s: pb_grpc.MoedStub, req: pb.GenerateRequest, **kw) -> tuple[list[int], list[pb.GenerateResponse]]:
    msgs = list(s.Generate(req, **kw))
    return [t for m in msgs for t in m.token_ids], msgs


def greedy(text: str, n: int = 24) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=text, max_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_health_goes_serving_after_load(moed_server, tiny_model, transport):
    srv = moed_server(load=False, tcp="127.0.0.1:0")
    target = targets(srv)[transport == "tcp"]
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    for service in ("", "moed.v1.Moed"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
    s = stub(target)
    assert s.Status(pb.StatusRequest()).state == pb.SERVING_STATE_NO_MODEL
    with pytest.raises(grpc.RpcError) as e:
        run(s, greedy("hello"))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no model" in e.value.details()
    srv.engine.load(str(tiny_model("qwen3_moe")))
    for service in ("", "moed.v1.Moed"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    assert s.Status(pb.StatusRequest()).state == pb.SERVING_STATE_SERVING
    assert len(run(s, greedy("hello", 3))[0]) == 3


def test_socket_mode_is_0660(server):
    st = os.stat(server.socket_path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_reflection_lists_the_services(server, transport):
    channel = grpc.insecure_channel(targets(server)[transport == "tcp"])
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {"moed.v1.Moed", "grpc.health.v1.Health"} <= services
    pool = descriptor_pool.DescriptorPool(db)
    moed = pool.FindServiceByName("moed.v1.Moed")
    assert {m.name for m in moed.methods} == {"Generate", "Tokenize", "ListModels", "LoadModel", "UnloadModel",
                                              "Status", "Watch"}
    assert moed.methods_by_name["Generate"].server_streaming
    assert pool.FindMessageTypeByName("moed.v1.GenerateSummary").fields_by_name["ttft_seconds"]
    assert pool.FindServiceByName("grpc.health.v1.Health").methods_by_name["Check"]


def first_tie(loaded_model, prompt: list[int], got: list[int], want: list[int]) -> tuple[int, float]:
    """Index of the first difference and the top-2 logit gap there, computed in-process."""
    i = next(k for k, (a, b) in enumerate(zip(got, want)) if a != b)
    with torch.inference_mode():
        logits = loaded_model.model(torch.tensor([prompt + want[:i]]), loaded_model.model.new_cache())[0, -1]
    top2 = logits.topk(2).values
    return i, (top2[0] - top2[1]).item()


@pytest.mark.slow
def test_16_concurrent_greedy_streams_match_each_alone(server, loaded):
    s = stub(targets(server)[0])
    alone = [run(s, greedy(p))[0] for p in PROMPTS]
    results: list[tuple[list[int], list[pb.GenerateResponse]] | None] = [None] * 16
    barrier = threading.Barrier(16)

    def client(i: int) -> None:
        barrier.wait()
        results[i] = run(stub(targets(server)[i % 2]), greedy(PROMPTS[i]))  # half over TCP

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    batch_sizes = [m.timing.batch_size for r in results for m in r[1] if m.HasField("timing")]
    assert max(batch_sizes) >= 12, "the streams did not share decode steps"
    lm = loaded("qwen3_moe")
    for i, ((got, _), want) in enumerate(zip(results, alone)):
        assert len(got) == len(want) == 24
        if got != want:
            k, gap = first_tie(lm, lm.tokenizer.encode(PROMPTS[i]), got, want)
            assert gap < TIE, f"stream {i} token {k}: {got[k]} vs alone {want[k]} (top-2 gap {gap})"


def test_requests_join_a_running_batch(server):
    s = stub(targets(server)[0])
    long = s.Generate(greedy("A long one", 200))
    first = next(long)
    time.sleep(0.05)
    _, short = run(s, greedy("A short one", 4))
    joined = [m.timing.batch_size for m in short if m.HasField("timing")]
    assert joined and min(joined) == 2  # it ran next to the long stream, which had not finished
    rest = list(long)
    assert rest[-1].summary.generated_tokens == 200
    assert first.timing.engine_step < short[0].timing.engine_step < rest[-2].timing.engine_step


def test_cancelled_stream_frees_its_slot_within_one_step(moed_server):
    srv = moed_server(max_batch=1, max_queue=2)
    s = stub(targets(srv)[0])
    a = s.Generate(greedy("cancel me", 2000), wait_for_ready=True)
    next(a)
    b = s.Generate(greedy("waiting for a slot", 3))
    time.sleep(0.2)
    assert srv.engine.queue_view().waiting == 1
    a.cancel()
    b_msgs = list(b)
    rec = next(r for r in srv.engine.finished() if r.reason == "cancelled")
    assert rec.steps_late <= 1 and rec.generated < 2000
    assert b_msgs[0].timing.engine_step == rec.freed_step + 1  # B took the slot at that very boundary
    assert srv.engine.queue_view().running == 0


def test_stream_past_its_deadline_frees_its_slot_within_one_step(moed_server):
    srv = moed_server(max_batch=1, max_queue=2)
    s = stub(targets(srv)[0])
    a = s.Generate(greedy("too slow", 3000), timeout=0.5, wait_for_ready=True)
    next(a)  # A holds the slot before B arrives
    b = s.Generate(greedy("next in line", 3))
    try:  # the engine ends it just before gRPC's deadline, with a summary saying so
        assert list(a)[-1].summary.finish_reason == pb.FINISH_REASON_DEADLINE
    except grpc.RpcError as e:  # or gRPC's deadline won the race to the client
        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    b_msgs = list(b)
    rec = next(r for r in srv.engine.finished() if r.reason == "deadline")
    assert rec.steps_late <= 1 and 0 < rec.generated < 3000
    assert b_msgs[0].timing.engine_step == rec.freed_step + 1


def test_queue_limit_gives_resource_exhausted(moed_server):
    srv = moed_server(max_batch=1, max_queue=1)
    s = stub(targets(srv)[0])
    a = s.Generate(greedy("hold the slot", 3000))
    next(a)
    b = s.Generate(greedy("hold the queue", 3))
    time.sleep(0.2)
    with pytest.raises(grpc.RpcError) as e:
        run(s, greedy("one too many", 3))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in e.value.details()
    assert s.Status(pb.StatusRequest()).queue.rejected == 1
    a.cancel()
    assert len([t for m in b for t in m.token_ids]) == 3
    assert len(run(s, greedy("after", 2))[0]) == 2


def test_tokenize_matches_the_tokenizer(server, loaded):
    s = stub(targets(server)[0])
    tok = loaded("qwen3_moe").tokenizer
    r = s.Tokenize(pb.TokenizeRequest(text="The expert said hello"))
    assert list(r.token_ids) == tok.encode("The expert said hello")
    assert "".join(r.pieces) == "The expert said hello"
    chat = pb.TokenizeRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")]))
    assert list(s.Tokenize(chat).token_ids) == tok.encode(tok.apply_chat_template([{"role": "user",
                                                                                     "content": "hi"}]))


def test_chat_and_token_prompts_generate_like_text(server, loaded):
    s = stub(targets(server)[0])
    tok = loaded("qwen3_moe").tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Which experts ran?"}])
    by_text, _ = run(s, greedy(text, 6))
    by_ids, _ = run(s, pb.GenerateRequest(tokens=pb.TokenIds(ids=tok.encode(text)), max_tokens=6, ignore_eos=True))
    by_chat, msgs = run(s, pb.GenerateRequest(chat=pb.ChatMessages(messages=[
        pb.ChatMessage(role="user", content="Which experts ran?")]), max_tokens=6, ignore_eos=True,
        request_id="chat-1"))
    assert by_text == by_ids == by_chat
    assert all(m.request_id == "chat-1" for m in msgs)
    sm = msgs[-1].summary
    assert sm.prompt_tokens == len(tok.encode(text)) and sm.generated_tokens == 6
    assert sm.finish_reason == pb.FINISH_REASON_LENGTH and sm.ttft_seconds > 0 and sm.decode_tokens_per_second > 0
    assert "".join(m.text for m in msgs) == tok.decode(by_chat)


def test_seeded_sampling_is_reproducible_and_stop_strings_stop(server):
    s = stub(targets(server)[0])
    req = pb.GenerateRequest(text="The expert said", max_tokens=12, ignore_eos=True,
                             sampling=pb.SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=1234))
    assert run(s, req)[0] == run(s, req)[0]
    _, msgs = run(s, greedy("The expert said", 40))
    text = "".join(m.text for m in msgs)
    stop = text[5:8]
    _, stopped = run(s, pb.GenerateRequest(text="The expert said", max_tokens=40, ignore_eos=True, stop=[stop]))
    out = "".join(m.text for m in stopped)
    assert stop not in out and text.startswith(out) and stopped[-1].summary.finish_reason == pb.FINISH_REASON_STOP


def test_status_and_watch_report_the_model_queue_and_experts(server):
    s = stub(targets(server)[0])
    run(s, greedy("count my experts", 8))
    st = s.Status(pb.StatusRequest())
    assert st.model.name == "qwen3_moe" and st.model.state == pb.MODEL_STATE_LOADED
    assert st.model.moe_layers == 2 and st.model.experts_per_layer == 8 and st.model.parameters > 0
    assert st.devices[0].kind == "cpu" and st.devices[0].memory_total_bytes > 0
    from quant import native
    if native.library() is not None:  # loaded: the path its dot products take here is named
        cpu = s.Status(pb.StatusRequest()).devices[0].description
        assert cpu.endswith(f" (moed kernels: {native.simd()})") and native.simd() in native.SIMD_PATHS
    ram = st.tiers[0]
    assert ram.name == "ram" and ram.used_bytes == 2 * 8 * 3 * 256 * 256 * 4  # layers x experts x 3 mats, fp32
    assert ram.experts_resident == ram.experts_total == 16 and ram.hit_rate == 1.0
    assert st.queue.max_batch == 16 and st.queue.engine_steps > 0 and st.uptime_seconds > 0
    assert st.version and st.pid == os.getpid() and st.rss_bytes > 0 and len(st.listening) == 2
    watch = s.Watch(pb.WatchRequest(interval_seconds=0.05, include_experts=True))
    a, b = next(watch), next(watch)
    watch.cancel()
    assert b.uptime_seconds > a.uptime_seconds
    assert [u.layer for u in a.expert_use] == [0, 1] and all(len(u.counts) == 8 for u in a.expert_use)
    # every processed token picked top-k=2 experts in each MoE layer
    assert sum(a.expert_use[0].counts) == sum(a.expert_use[1].counts) == ram.hits // 2
    assert a.generated_tokens_total > 0 and a.ttft_seconds.count > 0 and a.inter_token_seconds.p50 > 0
    assert a.finished_by_reason["length"] >= 1 and a.step_seconds.p99 >= a.step_seconds.p50 > 0


def test_list_load_unload(moed_server, tiny_model):
    srv = moed_server(models_dir=str(tiny_model("olmoe").parent))
    s = stub(targets(srv)[0])
    listed = {m.name: m for m in s.ListModels(pb.ListModelsRequest()).models}
    assert listed["qwen3_moe"].state == pb.MODEL_STATE_LOADED
    assert listed["olmoe"].state == pb.MODEL_STATE_AVAILABLE
    with pytest.raises(grpc.RpcError) as e:
        s.LoadModel(pb.LoadModelRequest(path="/no/such/model"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        s.UnloadModel(pb.UnloadModelRequest(model="olmoe"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert s.LoadModel(pb.LoadModelRequest(path="olmoe")).model.architecture == "olmoe"  # by name
    assert run(s, pb.GenerateRequest(text="hi", max_tokens=2, ignore_eos=True, model="olmoe"))[1][-1].summary.model \
        == "olmoe"
    s.UnloadModel(pb.UnloadModelRequest())
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(targets(srv)[0]))
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as e:
        run(s, greedy("x"))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_idle_unload_after_keep_alive_and_reload_on_demand(moed_server):
    srv = moed_server(keep_alive=0.3)
    s = stub(targets(srv)[0])
    before = run(s, greedy("keep me alive", 5))[0]
    deadline = time.monotonic() + 10
    while s.Status(pb.StatusRequest()).model.state != pb.MODEL_STATE_IDLE_UNLOADED:
        assert time.monotonic() < deadline, "the model was not unloaded after its keep-alive"
        time.sleep(0.05)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(targets(srv)[0]))
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    assert run(s, greedy("keep me alive", 5))[0] == before  # loaded again for the request
    assert s.Status(pb.StatusRequest()).model.state in (pb.MODEL_STATE_LOADED, pb.MODEL_STATE_IDLE_UNLOADED)


def test_an_unexpected_failure_fails_one_request_with_internal(moed_server, tiny_model):
    srv = moed_server()
    model = srv.engine.loaded.model
    poison = 7
    with torch.no_grad():
        model.model.embed_tokens.weight[poison] = float("nan")
    s = stub(targets(srv)[0])
    alone = run(s, greedy("a healthy neighbour", 30))[0]
    good = s.Generate(greedy("a healthy neighbour", 30))
    next(good)
    with pytest.raises(grpc.RpcError) as e:
        run(s, pb.GenerateRequest(tokens=pb.TokenIds(ids=[3, poison, 4]), max_tokens=5))
    assert e.value.code() == grpc.StatusCode.INTERNAL and "non-finite" in e.value.details()
    rest = [t for m in good for t in m.token_ids]
    assert alone[0:1] + rest == alone
    assert len(run(s, greedy("still serving", 3))[0]) == 3
