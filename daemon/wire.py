"""Protobuf messages <-> the engine's records; nothing else."""

from __future__ import annotations

import time

from daemon.costcheck import CostCheck
from daemon.metrics import MetricsView, Percentiles
from daemon.records import Finished, GenRequest, ModelView, Prompt, QueueView, TokenEvent
from daemon.resources import DeviceView, LinkView, TierView
from daemon.sampling import SamplingParams
from proto.moed.v1 import moed_pb2 as pb

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "cancelled": pb.FINISH_REASON_CANCELLED,
    "deadline": pb.FINISH_REASON_DEADLINE, "shutdown": pb.FINISH_REASON_SHUTDOWN,
}
EXPERT_TIERS = {"flash": pb.EXPERT_TIER_FLASH, "ram": pb.EXPERT_TIER_RAM, "vram": pb.EXPERT_TIER_VRAM}
MODEL_STATES = {"loading": pb.MODEL_STATE_LOADING, "loaded": pb.MODEL_STATE_LOADED,
                "idle_unloaded": pb.MODEL_STATE_IDLE_UNLOADED, "available": pb.MODEL_STATE_AVAILABLE}


def prompt(m: pb.GenerateRequest | pb.TokenizeRequest) -> Prompt:
    """The request's prompt: text, token ids or chat messages (whichever is set)."""
    which = m.WhichOneof("prompt" if isinstance(m, pb.GenerateRequest) else "input")
    if which == "text":
        return Prompt(text=m.text)
    if which == "tokens":
        return Prompt(token_ids=tuple(m.tokens.ids))
    if which == "chat":
        return Prompt(chat=tuple((c.role, c.content) for c in m.chat.messages))
    return Prompt()


def sampling(m: pb.GenerateRequest) -> SamplingParams:
    """SamplingParams from the request; unset fields keep their defaults."""
    s, d = m.sampling, SamplingParams()

    def get(name: str, default):
        return getattr(s, name) if s.HasField(name) else default

    return SamplingParams(temperature=get("temperature", d.temperature), top_k=get("top_k", d.top_k),
                          top_p=get("top_p", d.top_p), min_p=get("min_p", d.min_p),
                          repetition_penalty=get("repetition_penalty", d.repetition_penalty),
                          seed=get("seed", None), stop=tuple(m.stop), ignore_eos=m.ignore_eos)


def gen_request(m: pb.GenerateRequest, deadline: float | None) -> GenRequest:
    """The engine's request for a GenerateRequest; deadline in time.monotonic() seconds."""
    return GenRequest(prompt(m), sampling(m), m.max_tokens if m.HasField("max_tokens") else None,
                      m.request_id, m.model, deadline)


def token_response(ev: TokenEvent, request_id: str) -> pb.GenerateResponse:
    """One step's tokens, text and timings."""
    return pb.GenerateResponse(request_id=request_id, token_ids=ev.ids, text=ev.text, timing=pb.StepTiming(
        step_seconds=ev.step_seconds, since_previous_seconds=ev.since_previous, batch_size=ev.batch_size,
        engine_step=ev.engine_step))


def final_response(ev: Finished, request_id: str) -> pb.GenerateResponse:
    """The last message: remaining text and the summary."""
    s = ev.summary
    return pb.GenerateResponse(request_id=request_id, text=ev.text, summary=pb.GenerateSummary(
        prompt_tokens=s.prompt_tokens, generated_tokens=s.generated_tokens,
        finish_reason=FINISH_REASONS.get(s.finish_reason, pb.FINISH_REASON_UNSPECIFIED), ttft_seconds=s.ttft,
        decode_tokens_per_second=s.decode_tps, queue_seconds=s.queue_seconds, prefill_seconds=s.prefill_seconds,
        prefill_tokens_per_second=s.prefill_tps, total_seconds=s.total_seconds, model=s.model))


def model_info(v: ModelView) -> pb.ModelInfo:
    """ModelInfo of the served model."""
    return pb.ModelInfo(name=v.name, path=v.path, architecture=v.architecture,
                        state=MODEL_STATES.get(v.state, pb.MODEL_STATE_UNSPECIFIED), parameters=v.parameters,
                        layers=v.layers, moe_layers=v.moe_layers, experts_per_layer=v.experts_per_layer,
                        experts_per_token=v.experts_per_token, context_length=v.context_length,
                        vocab_size=v.vocab_size, dtype=v.dtype, load_seconds=v.load_seconds)


def queue_info(q: QueueView) -> pb.QueueInfo:
    """QueueInfo from the engine's queue view."""
    return pb.QueueInfo(running=q.running, waiting=q.waiting, max_batch=q.max_batch, max_queue=q.max_queue,
                        completed=q.completed, rejected=q.rejected, engine_steps=q.engine_steps)


def device(d: DeviceView) -> pb.Device:
    """Device message."""
    return pb.Device(name=d.name, kind=d.kind, description=d.description, memory_total_bytes=d.memory_total,
                     memory_used_bytes=d.memory_used, threads=d.threads, utilization=d.utilization,
                     pcie_tx_bytes_per_second=d.pcie_tx, pcie_rx_bytes_per_second=d.pcie_rx)


def tier(t: TierView) -> pb.MemoryTier:
    """MemoryTier message."""
    return pb.MemoryTier(name=t.name, device=t.device, budget_bytes=t.budget, used_bytes=t.used,
                         experts_resident=t.experts_resident, experts_total=t.experts_total, hits=t.hits,
                         misses=t.misses, hit_rate=t.hit_rate, experts_by_bits=t.experts_by_bits)


def link(k: LinkView) -> pb.LinkStats:
    """LinkStats message."""
    return pb.LinkStats(source=k.source, target=k.target, bytes_moved=k.bytes_moved, transfers=k.transfers,
                        busy_seconds=k.busy_seconds)


def percentiles(p: Percentiles) -> pb.Percentiles:
    """Percentiles message."""
    return pb.Percentiles(count=p.count, p50=p.p50, p90=p.p90, p95=p.p95, p99=p.p99, max=p.max)


def expert_use(layer: int, counts: list[int], held: list[tuple[str, int]]) -> pb.LayerExpertUse:
    """One layer's expert use counts and where each expert is held ((tier, bits) per expert, or none)."""
    return pb.LayerExpertUse(layer=layer, counts=counts, bits=[b for _, b in held],
                             tier=[EXPERT_TIERS[t] for t, _ in held])


def cost_model(c: CostCheck) -> pb.CostModelCheck:
    """CostModelCheck message."""
    return pb.CostModelCheck(problem=c.problem, predicted_step_seconds=c.predicted, measured_step_seconds=c.measured,
                             relative_error=c.relative_error, steps=c.steps, batch=c.batch, context=c.context,
                             bits=c.bits, machine=c.machine)


def snapshot(m: MetricsView, q: QueueView, experts: list[tuple[int, list[int], list[tuple[str, int]]]],
             tiers: list[TierView], links: list[LinkView], rss: int, cost: CostCheck | None = None
             ) -> pb.MetricsSnapshot:
    """One Watch message; experts: (layer, use counts, (tier, bits) per expert)."""
    return pb.MetricsSnapshot(
        timestamp=time.time(), uptime_seconds=m.uptime_seconds, window_seconds=m.window_seconds,
        prefill_tokens_per_second=m.prefill_tokens_per_second, decode_tokens_per_second=m.decode_tokens_per_second,
        ttft_seconds=percentiles(m.ttft), inter_token_seconds=percentiles(m.inter_token),
        step_seconds=percentiles(m.step), queue=queue_info(q), requests_total=m.requests_total,
        finished_by_reason=m.finished_by_reason, prompt_tokens_total=m.prompt_tokens_total,
        generated_tokens_total=m.generated_tokens_total,
        expert_use=[expert_use(*e) for e in experts], tiers=[tier(t) for t in tiers], links=[link(k) for k in links],
        rss_bytes=rss, mean_batch_size=m.mean_batch_size, cost_model=cost_model(cost) if cost else None)
