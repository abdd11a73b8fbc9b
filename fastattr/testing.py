"""Shipped test helpers (like torch_scatter.testing): devices, dtypes, sample inputs per op, tolerance by comparison.

No pytest import here: `fastattr info` uses these for its numeric self-test.
"""
from __future__ import annotations

import torch

from . import reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_layer(n: int, t: int, d_in: int, d_out: int, dtype=torch.float32, device="cpu", seed=0, flat=False):
    """x: [n, t, d_in], g: [n, t, d_out] (or 2-D when flat and t == 1) with values of a realistic spread."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d_in, generator=gen)
    g = torch.randn(n, t, d_out, generator=gen) * 0.1
    if flat:
        x, g = x[:, 0], g[:, 0]
    return x.to(device=device, dtype=dtype), g.to(device=device, dtype=dtype)


def sample_inputs(op: str, device="cpu", dtype=torch.float32) -> list[tuple]:
    """Argument tuples covering 2-D and 3-D inputs, bias / no bias, several layers and every reduction."""
    gen = torch.Generator().manual_seed(1)
    out = []
    if op == "grad_dot":
        for n, t, d_in, d_out, flat, bias in [(1, 1, 1, 1, True, True), (7, 1, 5, 3, True, False),
                                               (33, 4, 9, 6, False, True), (129, 2, 64, 33, False, True)]:
            x, g = make_layer(n, t, d_in, d_out, dtype, device, seed=n, flat=flat)
            target = torch.randn(d_out, d_in, generator=gen).to(device=device, dtype=dtype)
            b = torch.randn(d_out, generator=gen).to(device=device, dtype=dtype) if bias else None
            out.append((x, g, target, b))
    elif op in ("grad_sim_reduce", "grad_norm"):
        for n, m, shapes in [(1, 1, [(1, 1, 1, 1)]), (13, 5, [(1, 1, 5, 3), (2, 3, 4, 6)]),
                             (70, 300, [(1, 1, 9, 8), (3, 1, 7, 2)])]:
            xa, ga, xb, gb = [], [], [], []
            for i, (t, s, d_in, d_out) in enumerate(shapes):
                x, g = make_layer(n, t, d_in, d_out, dtype, device, seed=10 * n + i, flat=t == 1)
                y, h = make_layer(m, s, d_in, d_out, dtype, device, seed=10 * n + i + 5)
                xa.append(x), ga.append(g), xb.append(y), gb.append(h)
            if op == "grad_norm":
                out.append((xa, ga))
            else:
                for reduce in reference.REDUCTIONS:
                    out.append((xa, ga, xb, gb, reduce, 0.01))
    else:
        raise ValueError(f"unknown op {op!r}")
    return out


def to_double(args):
    def conv(a):
        if isinstance(a, torch.Tensor):
            return a.double()
        if isinstance(a, (list, tuple)):
            return type(a)(conv(b) for b in a)
        return a

    return tuple(conv(a) for a in args)


def error_vs_reference(op: str, args: tuple, kernel) -> tuple[float, float, float]:
    """(kernel error, torch's own error in the input dtype, scale) against the float64 reference."""
    ref = getattr(reference, op)
    exact = ref(*to_double(args)).double()
    torch_err = (ref(*args).double() - exact).abs().max().item() if exact.numel() else 0.0
    ours_err = (kernel(*args).double() - exact).abs().max().item() if exact.numel() else 0.0
    scale = exact.abs().max().item() if exact.numel() else 0.0
    return ours_err, torch_err, scale


def within_tolerance(ours: float, torch_err: float, scale: float, dtype: torch.dtype) -> bool:
    """Kernel error <= 2x torch's own error in the same dtype, plus a scale-relative floor."""
    floor = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-3)
    return ours <= 2 * torch_err + floor * max(scale, 1.0)


def brute_force_scores(model, record_loss, target_loss=None, params=None):
    """The oracle for fastattr.score: one autograd.grad per loss entry and per target, dotted in float64.

    Same arguments as fastattr.score (params: None for every parameter that requires grad, or a predicate on the
    name). Returns float64 scores shaped like the record losses, with a trailing M for M targets. Slow by design:
    per-record gradients are materialised one at a time."""
    named = [(k, p) for k, p in model.named_parameters() if (p.requires_grad if params is None else params(k))]
    ps = [p for _, p in named]
    saved = [p.requires_grad for p in ps]
    for p in ps:
        p.requires_grad_(True)
    try:
        def flat(out):
            gs = torch.autograd.grad(out, ps, retain_graph=True, allow_unused=True)
            gs = [torch.zeros_like(p) if g is None else g.to_dense() if g.is_sparse else g for g, p in zip(gs, ps)]
            return torch.cat([g.reshape(-1) for g in gs]).double()

        if target_loss is None:
            losses, target = record_loss(model)
        else:
            losses, target = record_loss(model), target_loss(model)
        rows = torch.stack([flat(l) for l in losses.reshape(-1)])
        t = flat(target)[None] if target.dim() == 0 else torch.stack([flat(target[m]) for m in range(len(target))])
        s = rows @ t.T
        s = s[:, 0] if target.dim() == 0 else s
        return s.reshape(tuple(losses.shape) + tuple(s.shape[1:]))
    finally:
        for p, r in zip(ps, saved):
            p.requires_grad_(r)
