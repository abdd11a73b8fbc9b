"""Typed wrappers over the fastattr ops, their fake (meta) kernels, and the kernel-or-reference choice.

| op              | CPU kernel                          | CUDA kernel                          | reference                    |
|-----------------|-------------------------------------|--------------------------------------|------------------------------|
| grad_dot        | csrc/cpu/grad_dot_cpu.cpp           | csrc/cuda/grad_dot_cuda.cu           | reference.grad_dot           |
| grad_sim_reduce | csrc/cpu/grad_sim_reduce_cpu.cpp    | csrc/cuda/grad_sim_reduce_cuda.cu    | reference.grad_sim_reduce    |
| grad_norm       | csrc/cpu/grad_sim_reduce_cpu.cpp    | csrc/cuda/grad_sim_reduce_cuda.cu    | reference.grad_norm          |

When a kernel is not built for a device the wrapper warns once and runs the reference; FASTATTR_STRICT=1 makes that
an error instead (benchmarks set it, so they never time the fallback by accident).
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from . import reference

try:
    from . import _C  # noqa: F401  (loading the .so registers the ops)

    HAS_C = True
    _IMPORT_ERROR: Exception | None = None
except ImportError as e:  # pragma: no cover - exercised only without a build
    HAS_C = False
    _IMPORT_ERROR = e

OPS = ("grad_dot", "grad_sim_reduce", "grad_norm")
_warned: set[str] = set()


def cuda_version() -> int:
    """CUDA runtime version fastattr._C was built against, or -1 for a CPU-only build (or no build at all)."""
    return int(torch.ops.fastattr.cuda_version()) if HAS_C else -1


# Which kernels _C registered, read once at import (registrations are fixed then): a plain dict, so torch.compile
# traces the wrappers below without a graph break.
_KERNELS = {(op, dev): HAS_C and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattr::{op}", key)
            for op in OPS for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


def has_kernel(op: str, device: torch.device | str) -> bool:
    """True when a compiled kernel of `op` exists for the device type (cpu, cuda)."""
    return _KERNELS.get((op, torch.device(device).type), False)


def _use_kernel(op: str, device: torch.device) -> bool:
    if has_kernel(op, device):
        return True
    why = f"fastattr: no {device.type} kernel for {op} is built ({_IMPORT_ERROR or 'not compiled for this device'})"
    if os.getenv("FASTATTR_STRICT") == "1":
        raise RuntimeError(why + "; FASTATTR_STRICT=1 forbids the pure-torch fallback. Rebuild with "
                           "`pip install --no-build-isolation -e .` (FASTATTR_FORCE_CUDA=1 for CUDA kernels).")
    if op + device.type not in _warned:
        _warned.add(op + device.type)
        warnings.warn(why + "; using the exact but slower pure-torch reference", RuntimeWarning, stacklevel=3)
    return False


def grad_dot(x: Tensor, g: Tensor, target: Tensor, target_bias: Tensor | None = None) -> Tensor:
    """Per-record <g_i x_i^T, target> (+ <g_i, target_bias>) for one layer, summed over positions t.

    x: [N, d_in] or [N, T, d_in]; g: [N, d_out] or [N, T, d_out]; target: [d_out, d_in]; target_bias: [d_out].
    Returns [N] (float64 for float64 inputs, else float32). Equivalent to reference.grad_dot.
    """
    if _use_kernel("grad_dot", x.device):
        return torch.ops.fastattr.grad_dot.default(x, g, target, target_bias)
    return reference.grad_dot(x, g, target, target_bias)


def grad_sim_reduce(xa: list[Tensor], ga: list[Tensor], xb: list[Tensor], gb: list[Tensor], reduce: str = "none",
                    threshold: float = 0.0) -> Tensor:
    """Pairwise per-sample-gradient similarity of N records and M targets summed over layers, reduced over M.

    xa[l]: [N, (T,) d_in_l], ga[l]: [N, (T,) d_out_l], xb[l]: [M, (S,) d_in_l], gb[l]: [M, (S,) d_out_l].
    reduce: 'none' -> [N, M]; 'sum' | 'mean' | 'max' | 'min' | 'count_gt' (entries > threshold) -> [N].
    """
    if _use_kernel("grad_sim_reduce", xa[0].device):
        return torch.ops.fastattr.grad_sim_reduce.default(list(xa), list(ga), list(xb), list(gb), reduce,
                                                          float(threshold))
    return reference.grad_sim_reduce(xa, ga, xb, gb, reduce, threshold)


def grad_norm(x: list[Tensor], g: list[Tensor]) -> Tensor:
    """Squared per-sample gradient norms summed over layers (ghost norm): [N]."""
    if _use_kernel("grad_norm", x[0].device):
        return torch.ops.fastattr.grad_norm.default(list(x), list(g))
    return reference.grad_norm(x, g)


# ---- fake kernels: shapes, dtypes and devices, for torch.compile and opcheck (the kernels' checks, in short) ----
if HAS_C:

    def _rows(t: Tensor) -> int:
        torch._check(t.dim() in (2, 3), lambda: f"expected [N, d] or [N, T, d], got {tuple(t.shape)}")
        return t.shape[0]

    def _same(op: str, tensors) -> Tensor:
        """The first tensor, after checking that all are floating point of one dtype on one device (a meta tensor
        mixed with real ones would otherwise get an uninitialised real output)."""
        first = tensors[0]
        for t in tensors:
            torch._check(t.is_floating_point(), lambda: f"{op}: inputs must be floating point, got {t.dtype}")
            torch._check(t.dtype == first.dtype and t.device == first.device,
                         lambda: f"{op}: inputs on different devices or of different dtypes "
                                 f"({first.device}/{first.dtype} vs {t.device}/{t.dtype})")
        return first

    @torch.library.register_fake("fastattr::grad_dot")
    def _grad_dot_fake(x, g, target, target_bias):
        _same("grad_dot", [x, g, target] + ([target_bias] if target_bias is not None else []))
        n = _rows(x)
        torch._check(g.shape[0] == n, lambda: "grad_dot: x and g disagree on N")
        torch._check(target.dim() == 2 and target.shape[0] == g.shape[-1] and target.shape[1] == x.shape[-1],
                     lambda: "grad_dot: target must be [d_out, d_in]")
        torch._check(target_bias is None or tuple(target_bias.shape) == (g.shape[-1],),
                     lambda: "grad_dot: target_bias must be [d_out]")
        return x.new_empty((n,), dtype=reference.score_dtype(x.dtype))

    @torch.library.register_fake("fastattr::grad_sim_reduce")
    def _grad_sim_reduce_fake(xa, ga, xb, gb, reduce, threshold=0.0):
        torch._check(len(xa) > 0 and len(xa) == len(ga) == len(xb) == len(gb), lambda: "one entry per layer")
        torch._check(reduce in reference.REDUCTIONS, lambda: f"grad_sim_reduce: unknown reduce {reduce!r}")
        first = _same("grad_sim_reduce", list(xa) + list(ga) + list(xb) + list(gb))
        n, m = _rows(xa[0]), _rows(xb[0])
        torch._check(m != 0 or reduce in ("none", "sum", "count_gt"),
                     lambda: f"grad_sim_reduce: reduce='{reduce}' over M=0 targets is undefined")
        shape = (n, m) if reduce == "none" else (n,)
        return first.new_empty(shape, dtype=reference.score_dtype(first.dtype))

    @torch.library.register_fake("fastattr::grad_norm")
    def _grad_norm_fake(x, g):
        torch._check(len(x) > 0 and len(x) == len(g), lambda: "one entry per layer")
        first = _same("grad_norm", list(x) + list(g))
        return first.new_empty((_rows(x[0]),), dtype=reference.score_dtype(first.dtype))

    def _no_backward(op: str):
        def backward(ctx, *grads):
            raise RuntimeError(f"fastattr::{op} has no backward: scores are computed from detached activations and "
                               "output gradients. Detach its inputs (fastattr.score does), or differentiate "
                               f"fastattr.reference.{op} instead")
        return backward

    for _op in OPS:  # forward-only ops: a backward through them is an error, never a silently missing gradient
        torch.library.register_autograd(f"fastattr::{_op}", _no_backward(_op))
