"""The PPO update of one round: minibatches over the kept records, and the torch autograd step."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import targets
from .agent import Agent
from .config import Args
from .numpy_step import NumpySGDStep
from .rollout import Buffer


def minibatches(n_kept_order_epoch1: torch.Tensor | None, kept_idx: torch.Tensor, args: Args,
                generator: torch.Generator):
    """Yields the minibatch index tensors of one update: epoch 1 in the given order (or a fresh permutation), later
    epochs freshly permuted from `generator`; the last partial minibatch kept or dropped per args."""
    for epoch in range(args.n_epochs):
        if epoch == 0 and n_kept_order_epoch1 is not None:
            order = n_kept_order_epoch1
        else:
            order = kept_idx[torch.randperm(len(kept_idx), generator=generator)]
        for start in range(0, len(order), args.batch_size):
            mb = order[start:start + args.batch_size]
            if len(mb) < args.batch_size and args.minibatch_remainder == "drop":
                break
            yield mb


def ppo_update(agent: Agent, optimizer: torch.optim.Optimizer, buf: Buffer, keep: torch.Tensor | None, args: Args,
               generator: torch.Generator, epoch1_order: torch.Tensor | None = None,
               weights: torch.Tensor | None = None) -> dict:
    """n_epochs of clipped-surrogate PPO (SB3 semantics) over the records where `keep` is True (None = all).

    Epoch 1 visits `epoch1_order` restricted to kept records (the order the scores' A~ normalisation used), later
    epochs a fresh permutation of the kept records from `generator`. `weights` [N] scale each record's policy loss
    (iif-reweight); args.method == "dtv-loo" filters each minibatch before its step (`TorchStep`); with
    args.target_kl > 0 the update stops at the first minibatch whose approx. KL exceeds 1.5 x target_kl, before its
    step (SB3). Returns mean losses and diagnostics. MLP agents trained with plain SGD take the numpy fast path
    (`NumpySGDStep`, same loss and step) unless args.update_backend == "torch" or a weight or per-minibatch filter
    needs the torch step."""
    n = buf.n
    keep = torch.ones(n, dtype=torch.bool) if keep is None else keep
    kept_idx = keep.nonzero().squeeze(1)
    kept_epoch1 = epoch1_order[keep[epoch1_order]] if epoch1_order is not None else None
    plain = weights is None and args.method != "dtv-loo"
    use_numpy = plain and (args.update_backend == "numpy" or (args.update_backend == "auto" and
                                                              NumpySGDStep.supports(agent, optimizer)))
    if args.update_backend == "numpy" and not use_numpy:
        raise ValueError("--update-backend numpy needs an MLP agent, plain SGD (no momentum, no weight decay) and a "
                         "method without weights or minibatch filters; use --update-backend torch")
    step = NumpySGDStep(agent, optimizer, buf, args) if use_numpy else TorchStep(agent, optimizer, buf, args, weights)
    sums, steps, seen, dropped = np.zeros(4), 0, 0, 0  # pg_loss, v_loss, approx_kl, clipfrac
    kl_limit = 1.5 * args.target_kl if args.target_kl > 0 else None
    for mb in minibatches(kept_epoch1, kept_idx, args, generator):
        stats = step(mb, kl_limit)
        if stats is None:  # the approx. KL passed the limit: no step, and the update ends here
            break
        sums += stats[:4]
        steps += 1
        seen += len(mb)
        dropped += int(stats[4]) if len(stats) > 4 else 0
    pg, vl, kl, cf = (sums / max(steps, 1)).tolist()
    with torch.no_grad():
        ent = agent.evaluate_actions(buf.obs[kept_idx], buf.actions[kept_idx])[1].mean().item()
    out = {"pg_loss": pg, "v_loss": vl, "entropy": ent, "approx_kl": kl, "clipfrac": cf, "optimizer_steps": steps}
    if args.method == "dtv-loo":
        out["minibatch_kept_fraction"] = 1.0 - dropped / max(seen, 1)
    return out


class TorchStep:
    """One minibatch step through torch autograd: any agent, any optimiser (the reference for NumpySGDStep);
    per-record policy-loss weights, and DTV-LOO's per-minibatch filter (args.method == "dtv-loo")."""

    def __init__(self, agent: Agent, optimizer, buf: Buffer, args: Args, weights: torch.Tensor | None = None):
        self.agent, self.optimizer, self.buf, self.args, self.weights = agent, optimizer, buf, args, weights

    def _policy_losses(self, agent: Agent, mb: torch.Tensor, entropy: bool = False, newlogp: torch.Tensor = None,
                       norm_over: torch.Tensor | None = None):
        """(per-record clipped-surrogate losses [b], log-ratio, ratio, entropy, V) on minibatch mb (from the given
        log-probabilities, when given: then entropy and V are None). Advantages are normalised over the records
        `norm_over` (default: mb itself)."""
        buf, args = self.buf, self.args
        ent = newvalue = None
        if newlogp is None:
            newlogp, ent, newvalue = agent.evaluate_actions(buf.obs[mb], buf.actions[mb], entropy)
        logratio = newlogp - buf.logp[mb]
        ratio = logratio.exp()
        adv = buf.advantages[mb]
        ref = buf.advantages[mb if norm_over is None else norm_over]
        if args.norm_adv and len(ref) > 1:
            adv = (adv - ref.mean()) / (ref.std() + 1e-8)
        per = -torch.min(adv * ratio, adv * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef))
        return per, logratio, ratio, ent, newvalue

    def dtv_loo_keep(self, mb: torch.Tensor) -> torch.Tensor:
        """DTV-LOO: each record of the minibatch against the mean gradient of the others, <g_j, (1/(b-1)) sum_{i!=j}
        g_i>, from the exact b x b Gram matrix of the per-record policy losses (fastattr.score with the minibatch's
        own losses as b targets; actor parameters). Keeps the records scoring >= 0 (all of them when none does)."""
        import fastattr

        b = len(mb)
        if b < 3:
            return mb

        def losses(m):  # log pi through the actor's modules (evaluate_actions takes a shortcut past them)
            per = self._policy_losses(m, mb, newlogp=m.log_prob(self.buf.obs[mb], self.buf.actions[mb]))[0]
            return per, per

        gram = fastattr.score(self.agent, losses, params=Agent.is_actor_param)  # [b, b]
        loo = (gram.sum(1) - gram.diagonal()) / (b - 1)
        keep = loo >= 0
        return mb[keep] if keep.any() else mb

    def __call__(self, mb: torch.Tensor, kl_limit: float | None = None) -> np.ndarray | None:
        agent, args = self.agent, self.args
        full = mb
        if args.method == "dtv-loo":  # the kept records keep the advantages they were scored with
            mb = self.dtv_loo_keep(mb)
        need_entropy = args.ent_coef != 0.0  # the paper's ent_coef is 0: skip the entropy graph
        per, logratio, ratio, entropy, newvalue = self._policy_losses(agent, mb, need_entropy, norm_over=full)
        with torch.no_grad():
            approx_kl = ((ratio - 1) - logratio).mean()
        if kl_limit is not None and float(approx_kl) > kl_limit:
            return None
        if self.weights is not None:
            per = per * self.weights[mb]
        pg_loss = per.mean()
        v_loss = F.mse_loss(newvalue, self.buf.returns[mb])  # SB3: no 1/2 factor, vf_coef 0.5
        loss = pg_loss + args.vf_coef * v_loss
        if need_entropy:
            loss = loss - args.ent_coef * entropy.mean()

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad:
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
        self.optimizer.step()
        with torch.no_grad():
            return np.array([float(pg_loss), float(v_loss), float(approx_kl),
                             float(((ratio - 1.0).abs() > args.clip_coef).float().mean()), len(full) - len(mb)])


def lookahead_target_grads(agent: Agent, optimizer: torch.optim.Optimizer, buf: Buffer, args: Args,
                           generator: torch.Generator, epoch1_order: torch.Tensor) -> dict[str, torch.Tensor]:
    """The return target's gradient at the parameters a plain (unfiltered) update of this round would reach, on the
    round's buffer: a copy of the agent and optimiser takes that update (with a copy of the minibatch generator, so
    the real update's draws are untouched), then targets.return_target_grads there."""
    import copy

    ahead = copy.deepcopy(agent)
    opt = type(optimizer)(ahead.parameters(), **optimizer.defaults)
    opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    gen = torch.Generator().manual_seed(0)
    gen.set_state(generator.get_state())
    plain = dataclasses.replace(args, method="ppo", target_kl=0.0)
    ppo_update(ahead, opt, buf, None, plain, gen, epoch1_order=epoch1_order)
    return targets.return_target_grads(ahead, lambda m: m.log_prob(buf.obs, buf.actions), buf.advantages,
                                       params=Agent.is_actor_param)
