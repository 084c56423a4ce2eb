"""The cost model checked while serving: decode step time predicted from `moed profile`'s machine
profile against the step times the metrics measured."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import MoedError
from daemon.metrics import MetricsView
from offload.schedule import LayerCosts
from profiler.machine import CostTimes, load_machine
from profiler.profile import default_profile_path
from profiler.shapes import ModelShape
from profiler.simulator import best_split


@dataclass(frozen=True, slots=True)
class CostCheck:
    """The cost model's decode step time against the measured one; `problem` says why there is none."""

    machine: str
    problem: str = ""
    predicted: float = 0.0  # seconds per decode step, mean over the measured steps' batch sizes
    measured: float = 0.0  # mean seconds of the decode-only steps
    steps: int = 0
    batch: float = 0.0
    context: float = 0.0
    bits: int = 0

    @property
    def relative_error(self) -> float:
        """(predicted - measured) / measured; 0 without a measurement."""
        return (self.predicted - self.measured) / self.measured if self.measured else 0.0


def routed_counts(tokens: int, experts: int, top_k: int) -> tuple[int, ...]:
    """Tokens per expert when `tokens` tokens each pick `top_k` of `experts` uniformly: expected distinct
    experts, the tokens spread evenly over them."""
    picks = tokens * top_k
    distinct = round(experts * (1 - (1 - top_k / experts) ** tokens))
    distinct = min(max(distinct, top_k), experts, picks)
    return tuple(picks // distinct + (i < picks % distinct) for i in range(distinct))


class StepPredictor:
    """Decode step times of a model from `moed profile`'s machine profile (re-read when the file changes)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.observed = 0  # engine timings the cost model has taken in
        self._key: tuple | None = None  # (profile path, its mtime, model, bits) of what _loaded holds
        self._loaded: tuple[str, CostTimes | str] = ("", "")  # machine description, op times or a problem

    def profile_path(self) -> Path:
        """The profile this predictor reads (this machine's stored one unless given)."""
        return self.path or default_profile_path()

    def check(self, model: str, config: dict, bits: int, view: MetricsView,
              observed: Iterable[tuple[str, float, float]] = ()) -> CostCheck | None:
        """Predicted vs measured decode step time of `model` (its config.json dict); None: no profile.

        observed: timings the engine measured since the last check, (kind, x, seconds) as CostTimes.observe
        takes them; they refine the cost model (kept until the profile file changes) before it predicts.
        """
        path = self.profile_path()
        try:
            key = (str(path), path.stat().st_mtime_ns, model, bits)
        except OSError:
            return None
        if key != self._key:
            self._key, self._loaded = key, _load_times(path, config, bits)
        machine, times = self._loaded
        if isinstance(times, str):
            return CostCheck(machine, problem=times, bits=bits)
        for kind, x, seconds in observed:
            self.observed += times.observe(kind, x, seconds)
        steps = sum(n for n, _ in view.decode_steps.values())
        done = sum(view.finished_by_reason.values())
        context = (view.prompt_tokens_total + view.generated_tokens_total / 2) / done if done else 0.0
        if not steps:
            return CostCheck(machine, context=context, bits=bits)
        try:
            predicted = sum(n * decode_step_seconds(times, b, int(context)) for b, (n, _) in view.decode_steps.items())
        except (KeyError, ValueError) as e:  # UnknownOp is a KeyError
            return CostCheck(machine, problem=f"the profile cannot time this model: {e}", bits=bits)
        return CostCheck(machine, predicted=predicted / steps,
                         measured=sum(s for _, s in view.decode_steps.values()) / steps, steps=steps,
                         batch=sum(b * n for b, (n, _) in view.decode_steps.items()) / steps, context=context,
                         bits=bits)


def _load_times(path: Path, config: dict, bits: int) -> tuple[str, CostTimes | str]:
    try:
        machine = load_machine(path)
    except MoedError as e:
        return "", f"cannot read the profile: {e}"
    try:
        return machine.description, machine.times(ModelShape.from_config(config), bits)
    except (KeyError, ValueError) as e:
        return machine.description, f"the profile cannot time this model: {e}"


def decode_step_seconds(times: CostTimes, batch: int, context: int) -> float:
    """One decode step of `batch` sequences: every layer's attention, then its routed experts (all resident,
    the best GPU/CPU split, tokens spread as routed_counts says) or its dense MLP; then the head (lm_head)."""
    shape = times.shape
    counts = routed_counts(batch, shape.num_experts, shape.top_k)
    moe = set(shape.moe_layers)
    return times.head(batch) + sum(times.attention(batch, context) +
                                   (best_split(times, batch, counts) if layer in moe else times.dense_mlp(batch))
                                   for layer in range(shape.num_layers))


def profile_costs(config: dict, bits: int, path: Path | None = None) -> LayerCosts | None:
    """Op times for the intra-layer scheduler (offload.schedule) of a model (its config.json dict) with
    experts at `bits`, from this machine's stored profile (or `path`); None without a profile that times
    experts on a GPU (the plan would put every expert on the CPU)."""
    try:
        machine = load_machine(path or default_profile_path())
        shape = ModelShape.from_config(config)
        costs = LayerCosts.from_op_times({bits: machine.times(shape, bits)}, shape) if machine.has_gpu else None
        if costs is not None:
            costs.gpu(1, bits)  # the profile can time a GPU expert of this model
    except (MoedError, KeyError, ValueError):  # UnknownOp is a KeyError
        return None
    return costs
