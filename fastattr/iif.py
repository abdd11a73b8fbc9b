"""IIF in any PPO loop: score a flattened rollout batch at the current parameters and choose the records the update
will see, with the semantics of `fastattr train` (our own loop, the Stable-Baselines3 adapter and hand-written
CleanRL-style scripts all call `select`).

    order = torch.randperm(N)                                   # the epoch-1 minibatch order, drawn before scoring
    sel = fastattr.iif.select(agent, lambda m: log_prob(m, b_obs, b_actions), b_advantages,
                              method="iif", p=0.5, batch_size=minibatch_size, order=order, params=actor_params)
    # epoch 1 visits sel.epoch1_order (the order restricted to kept records), later epochs shuffle sel.kept_indices

Semantics (see fastattr/targets.py): score_i = <grad l_i, grad f> at the current parameters, l_i = -A~_i log pi(a_i|s_i)
with A~ normalised exactly as the update will normalise it in epoch 1 (per minibatch of `order`), f the return target
with the raw advantages (or a given target gradient: `target_grads`); then the method chooses:

    iif           drop the bottom p of the negative-score records (the paper's rule, filtering.iif_keep_mask)
    iif-all-neg   drop every negative-score record
    random        drop as many records as iif would, at random (the control)
    none / ppo    keep every record (the scores are still computed)
    iif-reweight  drop the records with score <= 0 and weight the others by score / mean score (as I-PPO)
    iif-adam      iif's rule, scored against the target gradient Adam's next step would follow (the caller passes
                  it: targets.adam_precondition)
A filter that would keep no record keeps all of them (with a warning), so an update never runs on an empty batch.
(dtv-loo filters inside each minibatch of the update instead: fastattr/rl/update.py.)
"""
from __future__ import annotations

import numbers
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from . import filtering, targets

FILTERS = ("iif", "iif-all-neg", "random", "none", "ppo", "iif-reweight", "iif-adam")  # 'none' = 'ppo': keep all


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
    weights: Tensor | None = None
    """[N] float: each kept record's weight in the policy loss (iif-reweight; None = all 1)"""

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


def check_trainer_args(owner: str, filter: str, p, filters: tuple[str, ...], plain: str, records: str) -> None:
    """The argument checks every trainer adapter shares: `filter` among the adapter's `filters`, p in (0, 1]."""
    if filter not in filters:
        raise ValueError(f"{owner}: filter must be one of {', '.join(map(repr, filters))}, got {filter!r}; use 'none' "
                         f"to train as plain {plain} while still computing the scores")
    if not isinstance(p, numbers.Real) or isinstance(p, bool) or not 0.0 < float(p) <= 1.0:
        raise ValueError(f"{owner}: p (the fraction of negative-score {records} to drop) must be a number in (0, 1], "
                         f"got {p!r}; the paper uses 0.5, 0.125 or 0.0625")


def select(model: nn.Module, log_prob: Callable[[nn.Module], Tensor], advantages: Tensor, *, method: str = "iif",
           p: float = 0.5, batch_size: int = 64, order: Tensor | None = None, adv_norm: str = "minibatch",
           params=None, rng: np.random.Generator | None = None, generator: torch.Generator | None = None,
           target_grads: dict[str, Tensor] | None = None, **score_kwargs) -> Selection:
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
        target_grads: {parameter name: G}, a target gradient to score against instead of the return target's.
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
    if method == "iif-adam" and target_grads is None:
        raise ValueError("method iif-adam scores against Adam's preconditioned target gradient: pass target_grads "
                         "(fastattr.targets.adam_precondition)")
    scores = targets.return_scores(model, log_prob, adv_record, advantages, params=params, target_grads=target_grads,
                                   **score_kwargs)
    s = scores.detach().cpu()
    weights = None
    if method == "iif-reweight":
        keep = s > 0
        if keep.any():
            weights = torch.where(keep, s / s[keep].mean(), torch.zeros_like(s))
    else:
        keep = filtering.keep_mask("iif" if method == "iif-adam" else method, s, p, rng)
    fallback = False
    if not keep.any():
        warnings.warn(f"the {method} filter would keep no records; training on all of them this round", RuntimeWarning,
                      stacklevel=2)
        keep, fallback, weights = torch.ones(n, dtype=torch.bool), True, None
    return Selection(scores=scores, keep=keep, epoch1_order=order[keep[order]], adv_record=adv_record,
                     seconds=time.perf_counter() - t0, fallback=fallback, weights=weights)
