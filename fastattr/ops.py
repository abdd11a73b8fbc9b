"""Typed wrappers over the fastattr ops, their fake (meta) kernels, and the choice of path for each call.

| op              | CPU kernel                          | CUDA kernel                          | reference                    |
|-----------------|-------------------------------------|--------------------------------------|------------------------------|
| grad_dot        | csrc/cpu/grad_dot_cpu.cpp           | csrc/cuda/grad_dot_cuda.cu           | reference.grad_dot           |
| grad_sim_reduce | csrc/cpu/grad_sim_reduce_cpu.cpp    | csrc/cuda/grad_sim_reduce_cuda.cu    | reference.grad_sim_reduce    |
| grad_norm       | csrc/cpu/grad_sim_reduce_cpu.cpp    | csrc/cuda/grad_sim_reduce_cuda.cu    | reference.grad_norm          |

Every wrapper takes `backend`: "kernel" (the compiled op; an error when it is not built), "eager" (the fast form in
eager torch: for grad_dot one GEMM over the wider side and a row-dot, ((g @ target) * x).sum(-1) or its mirror; for
grad_sim_reduce the per-layer Gram GEMMs (Xa Xb^T) * (Ga Gb^T) summed over layers, chunked over records so that an
[chunk, M] tile stays bounded; grad_norm has no other eager form than its reference), "reference" (fastattr.reference,
the oracle), or "auto" (default): the path `choose` picks from the crossovers measured by benchmarks/bench_ops.py
and recorded in fastattr/crossovers.py. All paths compute the same scores, to rounding. The kernels' results never
depend on the thread count (fixed blocks, one BLAS thread per block). The pure-torch paths follow torch: MKL splits
some small GEMMs (e.g. 9 x 64 by 64 x 16) differently on two threads than on one, so inside fastattr.score with
deterministic=True (the passes pinned to one thread, see fastattr.threads) they stay on that one thread.

When auto picks a kernel that is not built for the device, the wrapper warns once and runs the reference;
FASTATTR_STRICT=1 makes that an error instead (benchmarks set it, so they never time the fallback by accident).
"""
from __future__ import annotations

import os
import warnings
from contextlib import nullcontext

import torch
from torch import Tensor

from . import crossovers, reference
from .threads import pinned, use_threads

try:
    from . import _C  # noqa: F401  (loading the .so registers the ops)

    HAS_C = True
    _IMPORT_ERROR: Exception | None = None
except ImportError as e:  # pragma: no cover - exercised only without a build
    HAS_C = False
    _IMPORT_ERROR = e

OPS = ("grad_dot", "grad_sim_reduce", "grad_norm")
BACKENDS = ("auto", "kernel", "eager", "reference")
PATHS = ("kernel", "eager", "reference")
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
        warnings.warn(why + "; using the exact but slower pure-torch reference", RuntimeWarning, stacklevel=4)
    return False


# ---- which path: the measured crossovers -----------------------------------------------------------------------------
# A shape per op, in plain ints (what choose and the benchmark's records are keyed by):
#   grad_dot:         (N, T, d_in, d_out)
#   grad_sim_reduce:  (N, M, ((T, S, d_in, d_out) per layer))
#   grad_norm:        (N, ((T, d_in, d_out) per layer))
# Rules, one per (op, device type, precision), from fastattr/crossovers.py: below `threshold_flops` the path `below`,
# from there on `above` (threshold None: `above` everywhere). A combination without a rule takes the kernel.
_RULES = {(r["op"], r["device"], r["precision"]): r for r in crossovers.RULES}
EAGER_TILE_VALUES = 2**24
"""Largest Gram tile [chunk*T, M*S] the eager grad_sim_reduce forms (64 MB in float32; it holds three at a time)."""


def precision(device: torch.device | str, dtype: torch.dtype) -> str:
    """The crossover table's precision key: fp64 | fp32 | tf32 (float32 CUDA matmuls, TF32 allowed) | bf16 | fp16."""
    if dtype == torch.float32 and torch.device(device).type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return {torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def flops(op: str, shape: tuple) -> int:
    """Multiply-adds x 2 of the op's GEMM form at `shape` (the unit of the crossover thresholds)."""
    if op == "grad_dot":
        n, t, d_in, d_out = shape
        return 2 * n * t * d_in * d_out
    if op == "grad_sim_reduce":
        n, m, layers = shape
        return 2 * n * m * sum(t * s * (d_in + d_out) for t, s, d_in, d_out in layers)
    n, layers = shape
    return 2 * n * sum(t * t * (d_in + d_out) for t, d_in, d_out in layers)


def _eager_fits(shape: tuple) -> bool:
    """Whether the eager grad_sim_reduce can form the Gram tile of one record against all M targets."""
    _, m, layers = shape
    return max((t * m * s for t, s, _, _ in layers), default=0) <= EAGER_TILE_VALUES


def choose(op: str, device: torch.device | str, dtype: torch.dtype, shape: tuple) -> str:
    """The path backend="auto" takes for `op` on this device, dtype and shape: "kernel" | "eager" | "reference"."""
    rule = _RULES.get((op, torch.device(device).type, precision(device, dtype)))
    if rule is None:
        return "kernel"
    threshold = rule["threshold_flops"]
    path = rule["above"] if threshold is None or flops(op, shape) >= threshold else rule["below"]
    if path == "eager" and op == "grad_sim_reduce" and not _eager_fits(shape):
        return "kernel"
    return path


def _path(op: str, backend: str, device: torch.device, dtype: torch.dtype, shape: tuple) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"fastattr.ops.{op}: backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "kernel":
        if not has_kernel(op, device):
            raise RuntimeError(f"fastattr.ops.{op}: backend='kernel' but no {device.type} kernel for {op} is built "
                               f"({_IMPORT_ERROR or 'not compiled for this device'}); rebuild with `pip install "
                               "--no-build-isolation -e .` (FASTATTR_FORCE_CUDA=1 for CUDA kernels) or use 'auto'")
        return "kernel"
    if backend != "auto":
        return backend
    path = choose(op, device, dtype, shape)
    return "reference" if path == "kernel" and not _use_kernel(op, device) else path


def _positions(t: Tensor) -> int:
    return t.shape[1] if t.dim() == 3 else 1


def _torch_threads(device: torch.device):
    """The thread context of a pure-torch path: inside fastattr.score's pinned passes (deterministic=True), one thread
    on CPU, as the passes (see the module docstring); torch.compile traces no thread changes."""
    if device.type == "cpu" and pinned.caller is not None and not torch.compiler.is_compiling():
        return use_threads(1)
    return nullcontext()


def _kernel(op: str, *args) -> Tensor:
    """The compiled op. When no input needs a gradient (fastattr.score passes detached tensors) it is called below the
    autograd key: the autograd formula registered at the end of this file only raises on backward, and going through
    its Python wrapper costs ~10 us per call."""
    fn = getattr(torch.ops.fastattr, op).default
    tensors = [a for arg in args for a in (arg if isinstance(arg, (list, tuple)) else [arg]) if isinstance(a, Tensor)]
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return fn(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return fn(*args)


# ---- the ops -------------------------------------------------------------------------------------------------------
def grad_dot(x: Tensor, g: Tensor, target: Tensor, target_bias: Tensor | None = None, backend: str = "auto") -> Tensor:
    """Per-record <g_i x_i^T, target> (+ <g_i, target_bias>) for one layer, summed over positions t.

    x: [N, d_in] or [N, T, d_in]; g: [N, d_out] or [N, T, d_out]; target: [d_out, d_in]; target_bias: [d_out].
    Returns [N] (float64 for float64 inputs, else float32). Equivalent to reference.grad_dot.
    """
    path = _path("grad_dot", backend, x.device, x.dtype, (x.shape[0], _positions(x), x.shape[-1], g.shape[-1]))
    if path == "kernel":
        return _kernel("grad_dot", x, g, target, target_bias)
    with _torch_threads(x.device):
        if path == "eager":
            return _eager_grad_dot(x, g, target, target_bias)
        return reference.grad_dot(x, g, target, target_bias)


def grad_sim_reduce(xa: list[Tensor], ga: list[Tensor], xb: list[Tensor], gb: list[Tensor], reduce: str = "none",
                    threshold: float = 0.0, backend: str = "auto") -> Tensor:
    """Pairwise per-sample-gradient similarity of N records and M targets summed over layers, reduced over M.

    xa[l]: [N, (T,) d_in_l], ga[l]: [N, (T,) d_out_l], xb[l]: [M, (S,) d_in_l], gb[l]: [M, (S,) d_out_l].
    reduce: 'none' -> [N, M]; 'sum' | 'mean' | 'max' | 'min' | 'count_gt' (entries > threshold) -> [N].
    """
    layers = tuple((_positions(x), _positions(y), x.shape[-1], g.shape[-1]) for x, g, y in zip(xa, ga, xb))
    path = _path("grad_sim_reduce", backend, xa[0].device, xa[0].dtype, (xa[0].shape[0], xb[0].shape[0], layers))
    if path == "kernel":
        return _kernel("grad_sim_reduce", list(xa), list(ga), list(xb), list(gb), reduce, float(threshold))
    with _torch_threads(xa[0].device):
        if path == "eager":
            return _eager_grad_sim_reduce(xa, ga, xb, gb, reduce, threshold)
        return reference.grad_sim_reduce(xa, ga, xb, gb, reduce, threshold)


def grad_norm(x: list[Tensor], g: list[Tensor], backend: str = "auto") -> Tensor:
    """Squared per-sample gradient norms summed over layers (ghost norm): [N]. "eager" is the reference here."""
    layers = tuple((_positions(a), a.shape[-1], b.shape[-1]) for a, b in zip(x, g))
    if _path("grad_norm", backend, x[0].device, x[0].dtype, (x[0].shape[0], layers)) == "kernel":
        return _kernel("grad_norm", list(x), list(g))
    with _torch_threads(x[0].device):
        return reference.grad_norm(x, g)


# ---- the eager paths -----------------------------------------------------------------------------------------------
def _eager_grad_dot(x: Tensor, g: Tensor, target: Tensor, target_bias: Tensor | None) -> Tensor:
    """grad_dot as one GEMM and a row-dot: the GEMM contracts the wider side, so the [N, T, w] intermediate has
    w = min(d_in, d_out) columns."""
    acc = reference.score_dtype(x.dtype)
    x3, g3, w = reference._as_3d(x).to(acc), reference._as_3d(g).to(acc), target.to(acc)
    if x3.shape[-1] < g3.shape[-1]:
        out = ((g3 @ w) * x3).sum((1, 2))
    else:
        out = ((x3 @ w.t()) * g3).sum((1, 2))
    if target_bias is not None:
        out = out + g3.sum(1) @ target_bias.to(acc)
    return out


def _eager_grad_sim_reduce(xa, ga, xb, gb, reduce: str, threshold: float) -> Tensor:
    """grad_sim_reduce from per-layer Gram GEMMs on chunks of records: sim = sum_l (Xa_l Xb_l^T) * (Ga_l Gb_l^T),
    summed over position pairs, reduced over M chunk by chunk (the [N, M] matrix is formed only for reduce='none')."""
    acc = reference.score_dtype(xa[0].dtype)
    n, m = xa[0].shape[0], xb[0].shape[0]
    if m == 0 and reduce not in ("none", "sum", "count_gt"):  # as the kernels, also when N = 0
        return reference.reduce_sim(xa[0].new_zeros(n, 0, dtype=acc), reduce, threshold)
    # [rows*T, d] on the record side, [d, M*S] on the target side (one transpose per call, not per chunk); explicit
    # widths, as a layer with T = 0 or S = 0 positions would make a -1 ambiguous (it adds 0)
    a = [(reference._as_3d(x).to(acc), reference._as_3d(g).to(acc)) for x, g in zip(xa, ga)]
    b = []
    for x, g in zip(xb, gb):
        x3, g3 = reference._as_3d(x).to(acc), reference._as_3d(g).to(acc)
        s = x3.shape[1]
        b.append((x3.reshape(m * s, x3.shape[2]).t(), g3.reshape(m * s, g3.shape[2]).t(), s))
    widest = max(x.shape[1] * s for (x, _), (_, _, s) in zip(a, b))  # T * S
    chunk = max(1, EAGER_TILE_VALUES // max(1, widest * m))
    out = torch.empty((n, m) if reduce == "none" else (n,), dtype=acc, device=xa[0].device)
    for r0 in range(0, n, chunk):
        rows = min(n, r0 + chunk) - r0
        sim = torch.zeros(rows, m, dtype=acc, device=out.device)
        for (x, g), (x_bt, g_bt, s) in zip(a, b):
            t = x.shape[1]
            kx = x[r0:r0 + rows].reshape(rows * t, x.shape[2]) @ x_bt
            gram = kx.mul_(g[r0:r0 + rows].reshape(rows * t, g.shape[2]) @ g_bt)
            sim += gram if t == s == 1 else gram.view(rows, t, m, s).sum((1, 3))
        out[r0:r0 + rows] = reference.reduce_sim(sim, reduce, threshold)
    return out


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
