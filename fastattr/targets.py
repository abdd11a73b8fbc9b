"""What a score is measured against: the attribution targets, defined once for the PPO loop, the trainer adapters and
every application.

A record's loss and a target are both *losses* (negated objectives), so a positive score means that training on the
record moves the parameters the way the target wants (it helps), a negative one that it hurts:

    record loss   l_i = -A~_i log pi(a_i|s_i)                 the PPO surrogate at ratio 1 (same gradient at theta(k))
    return target f   = -(1/N) sum_j A_j log pi(a_j|s_j)      the policy-gradient estimate of the expected return
    action target f_m = -log pi(a_m|s_m)                      "make the policy take a_m in s_m" (one per probe pair)

A~ is the advantage as the update normalises it (per minibatch of the epoch-1 order, `normalize_advantages`), A the raw
GAE advantage. `log_prob(model) -> Tensor[N]` is any closure that computes log pi(a|s) of the buffer's actions
through the model's modules, so the same definitions serve our Agent, a Stable-Baselines3 policy or a CleanRL agent.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

ADV_NORMS = ("minibatch", "buffer", "none")


def normalize_advantages(adv: Tensor, order: Tensor, batch_size: int, mode: str = "minibatch") -> Tensor:
    """A~ [N]: 'minibatch' = (A - mean) / (std + 1e-8) within each consecutive batch_size chunk of `order` (torch's
    unbiased std, as Stable-Baselines3 and CleanRL; a chunk of one record is left raw, as SB3 skips it), 'buffer' = over
    the whole buffer, 'none' = raw."""
    if mode not in ADV_NORMS:
        raise ValueError(f"advantage normalisation must be one of {', '.join(ADV_NORMS)}, got {mode!r}")
    if mode == "none":
        return adv.clone()
    if mode == "buffer":
        return (adv - adv.mean()) / (adv.std() + 1e-8)
    out = adv.clone()
    for chunk in torch.as_tensor(order).split(batch_size):
        a = adv[chunk]
        if len(chunk) > 1:
            out[chunk] = (a - a.mean()) / (a.std() + 1e-8)
    return out


def surrogate_records(logp: Tensor, adv_record: Tensor) -> Tensor:
    """l_i = -A~_i log pi(a_i|s_i), [N]."""
    return -adv_record.detach() * logp


def return_target(logp: Tensor, adv: Tensor) -> Tensor:
    """f = -(1/N) sum_j A_j log pi(a_j|s_j), a scalar."""
    return -(adv.detach() * logp).mean()


def action_targets(logp: Tensor) -> Tensor:
    """f_m = -log pi(a_m|s_m), [M]: one target per (state, action) pair."""
    return -logp


def return_target_grads(model: nn.Module, log_prob: Callable[[nn.Module], Tensor], adv: Tensor,
                        params: Callable[[str], bool] | None = None) -> dict[str, Tensor]:
    """{name: d f / d p} of the return target at the model's current parameters, for the parameters `params` selects
    (default: all that require grad); zeros where f does not depend on one."""
    named = {n: p for n, p in model.named_parameters() if (params(n) if params is not None else p.requires_grad)}
    with torch.enable_grad():
        grads = torch.autograd.grad(return_target(log_prob(model), adv), list(named.values()), allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(p)).detach() for (n, p), g in zip(named.items(), grads)}


def adam_precondition(grads: dict[str, Tensor], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """P^-1 G with P = sqrt(v_hat) + eps per parameter, Adam's bias-corrected second moments: the direction Adam's
    next step would move a gradient G (before any step, v = 0 and P = eps)."""
    group = optimizer.param_groups[0]
    beta2, eps = group["betas"][1], group["eps"]
    out = {}
    for name, p in model.named_parameters():
        if name not in grads:
            continue
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" in state:
            t = float(state["step"])
            v_hat = state["exp_avg_sq"] / (1 - beta2 ** t)
        else:
            v_hat = torch.zeros_like(p)
        out[name] = grads[name] / (v_hat.sqrt() + eps)
    return out


def linear_target(grads: dict[str, Tensor]) -> Callable[[nn.Module], Tensor]:
    """A target whose gradient is `grads` (a fixed vector): t(theta) = sum_p <p, G_p>. Scoring against it gives
    <grad l_i, G> for any given G, e.g. a preconditioned or a look-ahead target gradient."""
    fixed = {n: g.detach() for n, g in grads.items()}

    def target(model: nn.Module) -> Tensor:
        params = dict(model.named_parameters())
        return sum((params[n] * g).sum() for n, g in fixed.items())

    return target


def return_scores(model: nn.Module, log_prob: Callable[[nn.Module], Tensor], adv_record: Tensor, adv_target: Tensor,
                  *, params=None, extra_targets: Callable[[nn.Module], Tensor] | None = None,
                  target_grads: dict[str, Tensor] | None = None, **score_kwargs) -> Tensor:
    """Per-record influence on the return target at the model's current parameters: [N] (or [N, 1 + M] with
    `extra_targets(model) -> Tensor[M]`, further target losses, column 0 being the return target).

    score_i = <grad l_i, grad f> with l_i = -adv_record_i log pi(a_i|s_i) and f = -(1/N) sum_j adv_target_j log pi,
    summed over `params` (e.g. the actor's parameters). Both come from one forward pass through `log_prob(model)`.
    With `target_grads` ({name: G}), grad f is replaced by that fixed vector (adv_target is then unused).
    """
    import fastattr

    if target_grads is not None:
        return fastattr.score(model, lambda m: surrogate_records(log_prob(m), adv_record),
                              linear_target(target_grads), params=params, **score_kwargs)
    if extra_targets is None:
        def record_and_target(m):
            logp = log_prob(m)
            return surrogate_records(logp, adv_record), return_target(logp, adv_target)

        return fastattr.score(model, record_and_target, params=params, **score_kwargs)

    def records(m):
        return surrogate_records(log_prob(m), adv_record)

    def targets(m):
        ret = return_target(log_prob(m), adv_target)
        return torch.cat([ret.reshape(1), torch.as_tensor(extra_targets(m)).reshape(-1)])

    return fastattr.score(model, records, targets, params=params, **score_kwargs)


def action_scores(model: nn.Module, log_prob: Callable[[nn.Module, Tensor, Tensor], Tensor], obs: Tensor,
                  actions: Tensor, adv_record: Tensor, target_idx, *, params=None) -> Tensor:
    """[N]: each record's mean influence on the M action targets f_m = -log pi(a_m|s_m), m in target_idx:
    (1/M) sum_m <grad l_i, grad f_m> with l_i = -adv_record_i log pi(a_i|s_i). log_prob(model, obs, actions)."""
    import fastattr

    t_obs, t_act = obs[target_idx], actions[target_idx]
    return fastattr.score(model, lambda m: surrogate_records(log_prob(m, obs, actions), adv_record),
                          lambda m: action_targets(log_prob(m, t_obs, t_act)), params=params, reduce="mean")


def pick_targets(mask: np.ndarray, n_targets: int) -> np.ndarray:
    """Up to n_targets record indices where mask is True, evenly spread over the buffer (deterministic)."""
    match = np.nonzero(mask)[0]
    return match[np.unique(np.linspace(0, len(match) - 1, min(n_targets, len(match))).round().astype(int))]


def probe_scores(agent: nn.Module, obs: Tensor, actions: Tensor, adv_record: Tensor, probe_spec: str, n_targets: int,
                 env_id: str) -> dict:
    """What `fastattr train --probe` stores per round: probe_mask [N], probe_targets [M] (record indices) and
    score_action [N], each record's mean influence on log pi(a_m|s_m) over the probe's records (no score_action when
    nothing matches). `agent` is fastattr's Agent (log_prob(obs, actions), is_actor_param)."""
    from .probes import get_probe

    probe = get_probe(probe_spec)
    probe.check_env(env_id)
    mask = probe(obs.numpy(), actions.numpy())
    target_idx = pick_targets(mask, n_targets)
    out = {"probe_mask": mask, "probe_targets": target_idx}
    if len(target_idx):
        out["score_action"] = action_scores(agent, lambda m, o, a: m.log_prob(o, a), obs, actions, adv_record,
                                            target_idx, params=agent.is_actor_param)
    return out


def return_objective(log_prob: Tensor, adv: Tensor) -> float:
    """J = (1/N) sum_j A_j log pi(a_j|s_j), the value whose gradient the return target follows (f = -J)."""
    return float((adv.detach() * log_prob.detach()).mean().double())
