"""IIF in any PPO loop: score a flattened rollout batch at the current parameters and choose the records the update
will see, with the semantics of `fastattr train` (our own loop, the Stable-Baselines3 adapter and hand-written
CleanRL-style scripts all call `select`).

    order = torch.randperm(N)                                   # the epoch-1 minibatch order, drawn before scoring
    sel = fastattr.iif.select(agent, lambda m: log_prob(m, b_obs, b_actions), b_advantages,
                              method="iif", p=0.5, batch_size=minibatch_size, order=order, params=actor_params)
    # epoch 1 visits sel.epoch1_order (the order restricted to kept records), later epochs shuffle sel.kept_indices

Semantics (see fastattr/targets.py): score_i = <grad l_i, grad f> at the current parameters, l_i = -A~_i log pi(a_i|s_i)
with A~ normalised exactly as the update will normalise it in epoch 1 (per minibatch of `order`), f the return target
with the raw advantages; then `filtering.keep_mask` (iif: drop the bottom p of the negative-score records; iif-all-neg;
random: as many records at random; none/ppo: keep all). A filter that would keep no record keeps all of them (with a
warning), so an update never runs on an empty batch.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from . import filtering, targets

FILTERS = ("iif", "iif-all-neg", "random", "none", "ppo")  # 'none' and 'ppo' are the same: keep every record


@dataclass
class Selection:
    """One round's choice of records."""

    scores: Tensor
    """[N] float: each record's influence on the return target (> 0 helps)"""
    keep: Tensor
    """[N] bool: the records the update sees"""
    epoch1_order: Tensor
    """[n_kept] long: the epoch-1 order restricted to kept records (the order the scores' A~ normalisation used)"""
    adv_record: Tensor
    """[N]: the normalised advantages A~ the record losses used"""
    seconds: float
    """wall-clock time of scoring and filtering"""
    fallback: bool = False
    """True when the filter would have kept nothing and every record was kept instead"""

    @property
    def kept_indices(self) -> Tensor:
        return self.keep.nonzero().squeeze(1)

    @property
    def kept_fraction(self) -> float:
        return float(self.keep.float().mean()) if self.keep.numel() else 1.0


def check_filter(method: str) -> str:
    if method not in FILTERS:
        raise ValueError(f"filter must be one of {', '.join(FILTERS)}, got {method!r}")
    return "ppo" if method == "none" else method


def select(model: nn.Module, log_prob: Callable[[nn.Module], Tensor], advantages: Tensor, *, method: str = "iif",
           p: float = 0.5, batch_size: int = 64, order: Tensor | None = None, adv_norm: str = "minibatch",
           params=None, rng: np.random.Generator | None = None, generator: torch.Generator | None = None,
           **score_kwargs) -> Selection:
    """Scores the batch at the model's current parameters and returns which records to keep.

    Arguments:
        model: the module holding the policy's parameters (an actor-critic is fine: choose the actor with `params`).
        log_prob: `log_prob(model) -> Tensor[N]`, log pi(a_i|s_i) of the batch's actions, through the model's modules.
        advantages: [N] raw advantages (GAE) of the flattened batch.
        method: iif | iif-all-neg | random | none (= ppo: keep all; the scores are still computed).
        p: the fraction of the negative-score records `iif` drops (random drops as many), in (0, 1].
        batch_size: the update's minibatch size (A~ is normalised per minibatch of `order`, as the update does).
        order: [N] the epoch-1 minibatch order; drawn with `generator` when None.
        adv_norm: minibatch | buffer | none, how A~ is normalised (minibatch = as the update does it).
        params: which parameters are scored (see fastattr.score), e.g. a predicate excluding the critic.
        rng: numpy Generator for the random control (required for method='random').
        score_kwargs: passed to fastattr.score (e.g. deterministic=, chunk_size=).
    """
    method = check_filter(method)
    filtering.check_p(p)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    t0 = time.perf_counter()
    advantages = torch.as_tensor(advantages).detach()
    n = advantages.shape[0]
    if order is None:
        order = torch.randperm(n, generator=generator)
    order = torch.as_tensor(order, dtype=torch.long)
    if order.shape != (n,) or not torch.equal(order.sort().values, torch.arange(n)):
        raise ValueError(f"order must be a permutation of the {n} records, got shape {tuple(order.shape)}")
    adv_record = targets.normalize_advantages(advantages, order, batch_size, adv_norm)
    scores = targets.return_scores(model, log_prob, adv_record, advantages, params=params, **score_kwargs)
    keep = filtering.keep_mask(method, scores.detach().cpu(), p, rng)
    fallback = False
    if not keep.any():
        warnings.warn(f"the {method} filter would keep no records; training on all of them this round", RuntimeWarning,
                      stacklevel=2)
        keep, fallback = torch.ones(n, dtype=torch.bool), True
    return Selection(scores=scores, keep=keep, epoch1_order=order[keep[order]], adv_record=adv_record,
                     seconds=time.perf_counter() - t0, fallback=fallback)
