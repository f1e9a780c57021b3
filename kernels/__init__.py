"""The ops behind the model, each dispatched to a backend by device, availability and user choice.

Call ops through `kernels.ops` (`from kernels import ops; ops.ssd_chunk_scan(...)`). Each op lives in its own
folder, `kernels/<op>/`: `reference.py` (plain PyTorch, the definition of correct and the CPU path, with the
op's decode step beside it), the Triton kernels (`triton_*.py`, training and decode step), and for attention
the FlexAttention / flash-attn backends. `kernels/registry.py` holds the table of which backend implements which
op and the choice among them: HYBRID_KERNELS (`auto` by default, `reference`, or a backend name) or
`set_backend(name)`. `python -m kernels` prints what each op uses here.
"""
from . import ops, registry
from .registry import BACKEND_ENV, KernelBackendError, backend, backends, register, requested, resolve, set_backend

__all__ = ["BACKEND_ENV", "KernelBackendError", "backend", "backends", "ops", "register", "registry", "requested",
           "resolve", "set_backend"]
