"""Compute backends for quantised experts, registered by name: reference, torch, onnxruntime, native, cuda."""

from quant.kernels.base import (ACTIVATIONS, Backend, PreparedExpert, activation, available_backends, backend_names,
                                fast_cpu_backend, get_backend)
from quant.kernels import cuda, native, onnx, reference, torch_cpu  # noqa: F401  (importing registers the backends)

__all__ = ["ACTIVATIONS", "Backend", "PreparedExpert", "activation", "available_backends", "backend_names",
           "fast_cpu_backend", "get_backend"]
