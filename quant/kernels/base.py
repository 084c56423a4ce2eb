"""The backend interface: turn quantised views into a compute form, run an expert FFN on it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from quant.views import AffineTerm, ExpertViews, QuantView

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
}


@dataclass(frozen=True, slots=True)
class PreparedExpert:
    """An expert in a backend's compute form (gate, up, down), ready for `Backend.ffn`."""

    forms: tuple[Any, ...]
    act: str
    bits: int
    nbytes: int  # memory the compute form holds


@dataclass(frozen=True, slots=True)
class MsbMatrix:
    """One matrix of an MSB-scheme expert (quant.schemes.MSB) as the store holds it, by address: its shape, group,
    head (scale and minimum, float16 [2, n, k / group]) and bit-planes' bits (most significant first, n * k / 8
    bytes each), for a backend's prepare_msb."""

    n: int
    k: int
    group: int
    head: int
    planes: tuple[int, ...]


class Backend:
    """Runs expert FFNs down(act(gate x) * up x) on quantised weights; subclasses register by name."""

    name: ClassVar[str] = ""
    device: ClassVar[str] = "cpu"
    # True: ffn/linear calls on different experts may run at the same time, each on one thread, on
    # `pool`'s workers; False: one call at a time, each using the library's own threads
    concurrent: ClassVar[bool] = False
    # True: ffn_many(parallel=True) and large linears use threads of the backend's own (no Python hand-off)
    threads_inside: ClassVar[bool] = False
    # True: prepare takes views whose codes are still bit-planes (quant.planes.PackedCodes: Store.views(packed=))
    reads_planes: ClassVar[bool] = False
    _registry: ClassVar[dict[str, type["Backend"]]] = {}

    def __init_subclass__(cls, *, name: str, **kw) -> None:
        super().__init_subclass__(**kw)
        cls.name = name
        if name:  # "": a base for backends, not one
            Backend._registry[name] = cls

    @classmethod
    def available(cls) -> bool:
        """Whether this machine can run the backend."""
        return True

    def prepare(self, view: QuantView) -> Any:
        """The compute form of one matrix."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, form: Any) -> torch.Tensor:
        """x [T, K] -> x @ W^T [T, N] in float32."""
        raise NotImplementedError

    def prepare_rows(self, blocks: Iterable[QuantView], n: int) -> Any:
        """The compute form of one matrix of n rows given as consecutive blocks of its rows (same K, group and
        term bits), taken one at a time: a backend whose form is made per block never needs the whole matrix's
        codes at once. By default the blocks are joined and prepared as one."""
        views = list(blocks)
        return self.prepare(views[0] if len(views) == 1 else QuantView(
            tuple(AffineTerm(torch.cat([v.terms[i].codes for v in views]), t.bits,
                             torch.cat([v.terms[i].scale for v in views]), torch.cat([v.terms[i].zero for v in views]))
                  for i, t in enumerate(views[0].terms)), views[0].bits, views[0].group))

    def form_nbytes(self, form: Any) -> int:
        """Bytes a matrix's compute form holds."""
        return sum(t.numel() * t.element_size() for t in _tensors(form))

    def prepare_expert(self, views: ExpertViews, act: str) -> PreparedExpert:
        """The compute form of a whole expert."""
        activation(act)
        forms = tuple(self.prepare(v) for v in (views.gate, views.up, views.down))
        return PreparedExpert(forms, act, views.bits, sum(self.form_nbytes(f) for f in forms))

    def close(self) -> None:
        """Stop any workers the backend started."""

    def idle(self) -> None:
        """The caller is about to wait for something other than this backend (a read): threads of the backend's
        own that wait for work spinning may sleep now. By default nothing."""

    def recycle(self, e: PreparedExpert) -> None:
        """An expert's compute form is let go (its tier no longer holds it): a backend may make the next form of
        its size in its memory once nothing refers to it. By default nothing is kept."""

    def ffn_many(self, x: torch.Tensor, experts: list[PreparedExpert], parallel: bool = False) -> list[torch.Tensor]:
        """Each expert's output for the same x [T, D], one after another (a backend may make it one call);
        with `parallel`, a backend that has `threads_inside` splits them over its own threads."""
        return [self.ffn(x, e) for e in experts]

    def ffn(self, x: torch.Tensor, e: PreparedExpert) -> torch.Tensor:
        """The expert's output for x [T, D], float32 [T, D]."""
        gate, up, down = e.forms
        x = x.float()
        return self.linear(activation(e.act)(self.linear(x, gate)) * self.linear(x, up), down)


class PooledBackend(Backend, name=""):
    """A concurrent backend's workers: `threads` of them (default torch's thread count), made on first use."""

    concurrent = True

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or torch.get_num_threads()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    @property
    def pool(self) -> ThreadPoolExecutor:
        """The workers that run calls side by side (created on first use)."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=f"moed-{self.name}")
            return self._pool

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def split(self, fn: Callable[[Any], Any], parts: list) -> list:
        """[fn(p) for p in parts] as `threads` runs of consecutive parts: the caller runs the last run itself
        while threads - 1 workers run the others (one thread per core: a third thread on two cores made a
        150 MiB matrix 4.1 ms instead of 3.0)."""
        n = min(self.threads, len(parts))
        edges = [len(parts) * i // n for i in range(n + 1)]
        runs = [parts[a:b] for a, b in zip(edges, edges[1:])]
        futures = [self.pool.submit(lambda r=r: [fn(p) for p in r]) for r in runs[:-1]]
        last = [fn(p) for p in runs[-1]]
        return [y for f in futures for y in f.result()] + last


def get_backend(name: str, **options: Any) -> Backend:
    """A backend instance by name; ValueError if unknown or unavailable here. Without options it is the
    process's shared instance of that backend (one set of workers for the dense layers and the experts)."""
    cls = Backend._registry.get(name)
    if cls is None:
        raise ValueError(f"unknown kernel backend {name!r} (known: {', '.join(backend_names())})")
    if not cls.available():
        raise ValueError(f"kernel backend {name!r} is not available on this machine "
                         f"(available: {', '.join(available_backends())})")
    if options:
        return cls(**options)
    with _SHARED_LOCK:
        if name not in _SHARED:
            _SHARED[name] = cls()
        return _SHARED[name]


_SHARED: dict[str, Backend] = {}
_SHARED_LOCK = threading.Lock()


def backend_names() -> tuple[str, ...]:
    """Every registered backend."""
    return tuple(Backend._registry)


def available_backends() -> tuple[str, ...]:
    """The registered backends this machine can run."""
    return tuple(n for n, c in Backend._registry.items() if c.available())


# fastest first, measured in bench/results/quant_kernels.md (native: moed's own kernels, where they could be built)
FAST_CPU_BACKENDS = ("native", "onnxruntime", "torch", "reference")


def fast_cpu_backend() -> str:
    """The fastest CPU backend this machine has (FAST_CPU_BACKENDS order)."""
    have = available_backends()
    return next(b for b in FAST_CPU_BACKENDS if b in have)


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function named by a config (silu, swish, gelu, relu)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}") from None


def _tensors(form: Any):
    if isinstance(form, torch.Tensor):
        yield form
    elif isinstance(form, (tuple, list)):
        for f in form:
            yield from _tensors(f)
    elif hasattr(form, "__slots__"):
        for s in form.__slots__:
            yield from _tensors(getattr(form, s))
