"""IIF's record selection: turn per-record influence scores into a keep-mask. Pure functions on tensors.

| method        | drops                                                                             |
|---------------|-----------------------------------------------------------------------------------|
| `ppo`         | nothing                                                                           |
| `iif`         | the bottom p of the negative-score records: thr = sorted(scores)[int(n_neg * p)], |
|               | drop every score < thr (the official code's `neg-bottom` rule)                    |
| `iif-all-neg` | every negative-score record (= `iif` with p = 1)                                  |
| `random`      | as many records as `iif` would drop, uniformly at random (the paper's control)    |
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

METHODS = ("ppo", "iif", "iif-all-neg", "random")


def check_p(p: float) -> float:
    if not isinstance(p, (int, float)) or not (0.0 < float(p) <= 1.0):
        raise ValueError(f"p (--p, the fraction of negative-influence records to drop) must be in (0, 1], got {p!r}; "
                         "the paper uses 0.5, 0.125 or 0.0625")
    return float(p)


def _check_scores(scores: Tensor) -> Tensor:
    scores = torch.as_tensor(scores)
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [N], got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).sum())
        raise ValueError(f"scores contain {bad} non-finite values (NaN/inf); check the advantages and the policy "
                         "for NaNs before filtering")
    return scores


def iif_keep_mask(scores: Tensor, p: float) -> Tensor:
    """Keep-mask [N] bool dropping the bottom p of the negative-score records (the paper's Algorithm 1).

    thr = sorted(scores)[int(n_neg * p)]; records with score < thr are dropped (all of them negative). With p = 1
    every negative record goes. Ties at thr are kept. Equivalent to the official `neg-bottom` selection.
    """
    p = check_p(p)
    scores = _check_scores(scores)
    n = scores.numel()
    n_neg = int((scores < 0).sum())
    idx = int(n_neg * p)
    if n == 0 or idx == 0:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    thr = torch.sort(scores).values[idx] if idx < n else torch.tensor(float("inf"), device=scores.device)
    return scores >= thr


def random_keep_mask(n: int, n_drop: int, rng: np.random.Generator) -> Tensor:
    """Keep-mask [n] dropping `n_drop` records chosen uniformly at random with `rng` (its own seeded generator)."""
    if not 0 <= n_drop <= n:
        raise ValueError(f"n_drop must be in [0, {n}], got {n_drop}")
    keep = torch.ones(n, dtype=torch.bool)
    keep[torch.from_numpy(rng.choice(n, size=n_drop, replace=False)).long()] = False
    return keep


def keep_mask(method: str, scores: Tensor | None, p: float, rng: np.random.Generator | None = None) -> Tensor:
    """Dispatch on the method name (see the module table). `scores` may be None only for `ppo`."""
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "ppo":
        if scores is None:
            raise ValueError("keep_mask('ppo', ...) needs scores only for their length; pass them or skip filtering")
        return torch.ones(torch.as_tensor(scores).numel(), dtype=torch.bool)
    if method == "iif":
        return iif_keep_mask(scores, p)
    if method == "iif-all-neg":
        return iif_keep_mask(scores, 1.0)
    if rng is None:
        raise ValueError("keep_mask('random', ...) needs its own numpy Generator (rng=...)")
    n_drop = int((~iif_keep_mask(scores, p)).sum())
    return random_keep_mask(torch.as_tensor(scores).numel(), n_drop, rng)


def apply_mask(batch: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
    """The records of a flattened buffer (dict of tensors with leading dim N) where mask is True."""
    mask = torch.as_tensor(mask, dtype=torch.bool)
    out = {}
    for key, value in batch.items():
        if value.shape[0] != mask.numel():
            raise ValueError(f"apply_mask: {key!r} has {value.shape[0]} records, mask has {mask.numel()}")
        out[key] = value[mask]
    return out
