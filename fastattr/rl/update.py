"""The PPO update of one round: minibatches over the kept records, and the torch autograd step."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

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
               generator: torch.Generator, epoch1_order: torch.Tensor | None = None) -> dict:
    """n_epochs of clipped-surrogate PPO (SB3 semantics) over the records where `keep` is True (None = all).

    Epoch 1 visits `epoch1_order` restricted to kept records (the order the scores' A~ normalisation used), later
    epochs a fresh permutation of the kept records from `generator`. Returns mean losses and diagnostics.
    MLP agents trained with SGD take the numpy fast path (`NumpySGDStep`, same loss and step) unless
    args.update_backend == "torch"."""
    n = buf.n
    keep = torch.ones(n, dtype=torch.bool) if keep is None else keep
    kept_idx = keep.nonzero().squeeze(1)
    order1 = epoch1_order[keep[epoch1_order]] if epoch1_order is not None else None
    use_numpy = args.update_backend == "numpy" or (args.update_backend == "auto" and NumpySGDStep.supports(
        agent, optimizer))
    if use_numpy:
        if not NumpySGDStep.supports(agent, optimizer):
            raise ValueError("--update-backend numpy needs an MLP agent and plain SGD (no momentum, no weight decay); "
                             "use --update-backend torch")
        step = NumpySGDStep(agent, optimizer, buf, args)
    else:
        step = TorchStep(agent, optimizer, buf, args)
    sums, steps = np.zeros(4), 0  # pg_loss, v_loss, approx_kl, clipfrac
    for mb in minibatches(order1, kept_idx, args, generator):
        sums += step(mb)
        steps += 1
    pg, vl, kl, cf = (sums / max(steps, 1)).tolist()
    with torch.no_grad():
        ent = agent.evaluate_actions(buf.obs[kept_idx], buf.actions[kept_idx])[1].mean().item()
    return {"pg_loss": pg, "v_loss": vl, "entropy": ent, "approx_kl": kl, "clipfrac": cf, "optimizer_steps": steps}


class TorchStep:
    """One minibatch step through torch autograd: any agent, any optimiser (the reference for NumpySGDStep)."""

    def __init__(self, agent: Agent, optimizer, buf: Buffer, args: Args):
        self.agent, self.optimizer, self.buf, self.args = agent, optimizer, buf, args

    def __call__(self, mb: torch.Tensor) -> np.ndarray:
        agent, buf, args = self.agent, self.buf, self.args
        need_entropy = args.ent_coef != 0.0  # the paper's ent_coef is 0: skip the entropy graph
        newlogp, entropy, newvalue = agent.evaluate_actions(buf.obs[mb], buf.actions[mb], need_entropy)
        logratio = newlogp - buf.logp[mb]
        ratio = logratio.exp()
        adv = buf.advantages[mb]
        if args.norm_adv and len(mb) > 1:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        pg_loss = -torch.min(adv * ratio, adv * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)).mean()
        v_loss = F.mse_loss(newvalue, buf.returns[mb])  # SB3: no 1/2 factor, vf_coef 0.5
        loss = pg_loss + args.vf_coef * v_loss
        if need_entropy:
            loss = loss - args.ent_coef * entropy.mean()

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad:
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
        self.optimizer.step()
        with torch.no_grad():
            return torch.stack([pg_loss, v_loss, ((ratio - 1) - logratio).mean(),
                                ((ratio - 1.0).abs() > args.clip_coef).float().mean()]).numpy().astype(np.float64)

