"""Pure-torch versions of every fastattr op: the oracle the kernels are tested against, the fallback when a kernel is
not built, and the specification of what each op computes. Plain einsum / matmul, no performance tricks.

Shapes use N records, M targets, T (or S) positions per record, d_in / d_out layer widths. A 2-D [N, d] input means
T = 1. Scores come back in float64 for float64 inputs and in float32 otherwise.
"""
from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("none", "sum", "mean", "max", "min", "count_gt")


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_3d(t: Tensor) -> Tensor:
    return t.unsqueeze(1) if t.dim() == 2 else t


def grad_dot(x: Tensor, g: Tensor, target: Tensor, target_bias: Tensor | None = None) -> Tensor:
    """Per-record <grad_W l_i, target> + <grad_b l_i, target_bias> for one Linear-like layer.

    x: [N, (T,) d_in], g: [N, (T,) d_out], target: [d_out, d_in], target_bias: [d_out] or None -> [N].
    Equivalent to sum_t g_it^T target x_it + sum_t g_it . target_bias  (identity I1 in docs/method.md).
    """
    acc = score_dtype(x.dtype)
    x3, g3 = _as_3d(x).to(acc), _as_3d(g).to(acc)
    out = torch.einsum("nto,oi,nti->n", g3, target.to(acc), x3)
    if target_bias is not None:
        out = out + torch.einsum("nto,o->n", g3, target_bias.to(acc))
    return out


def grad_sim(xa: list[Tensor], ga: list[Tensor], xb: list[Tensor], gb: list[Tensor]) -> Tensor:
    """S[n, m] = sum_l sum_{t,s} (xa[l][n,t] . xb[l][m,s]) (ga[l][n,t] . gb[l][m,s])  -> [N, M]  (identity I2)."""
    acc = score_dtype(xa[0].dtype)
    total = None
    for x_a, g_a, x_b, g_b in zip(xa, ga, xb, gb):
        kx = torch.einsum("nti,msi->ntms", _as_3d(x_a).to(acc), _as_3d(x_b).to(acc))
        kg = torch.einsum("nto,mso->ntms", _as_3d(g_a).to(acc), _as_3d(g_b).to(acc))
        s = (kx * kg).sum((1, 3))
        total = s if total is None else total + s
    return total


def reduce_sim(sim: Tensor, reduce: str, threshold: float = 0.0) -> Tensor:
    """Reduces an [N, M] similarity over M: none | sum | mean | max | min | count_gt (entries > threshold)."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"grad_sim_reduce: reduce must be one of {', '.join(REDUCTIONS)}; got {reduce!r}")
    if reduce == "none":
        return sim
    if sim.shape[1] == 0 and reduce not in ("sum", "count_gt"):
        raise RuntimeError(f"grad_sim_reduce: reduce='{reduce}' over M=0 targets is undefined")
    if reduce == "sum":
        return sim.sum(1)
    if reduce == "mean":
        return sim.mean(1)
    if reduce == "max":
        return sim.amax(1)
    if reduce == "min":
        return sim.amin(1)
    return (sim > threshold).sum(1).to(sim.dtype)


def grad_sim_reduce(xa, ga, xb, gb, reduce: str = "none", threshold: float = 0.0) -> Tensor:
    """grad_sim followed by reduce_sim: [N, M] for reduce='none', else [N]."""
    return reduce_sim(grad_sim(xa, ga, xb, gb), reduce, threshold)


def grad_norm(x: list[Tensor], g: list[Tensor]) -> Tensor:
    """Squared per-sample gradient norm over the layers: sum_l <X_n X_n^T, G_n G_n^T>_F -> [N] (ghost norm)."""
    acc = score_dtype(x[0].dtype)
    total = None
    for x_l, g_l in zip(x, g):
        x3, g3 = _as_3d(x_l).to(acc), _as_3d(g_l).to(acc)
        s = (torch.einsum("nti,nsi->nts", x3, x3) * torch.einsum("nto,nso->nts", g3, g3)).sum((1, 2))
        total = s if total is None else total + s
    return total
