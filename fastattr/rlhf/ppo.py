"""The paper's PPO path for RLHF, scaled down: a sequence-level PPO loop with IIF's record filter.

One round (`SequencePPO.round`), at the current parameters theta(k):
  1. generate: one completion for each of `batch_size` train prompts (drawn without replacement);
  2. reward: the task's reward (the reward model's neutral logit), minus `kl_coef` * sum_t (log pi - log pi_ref) when
     a KL penalty to the reference model is asked for; advantages A = reward - mean over the batch (the baseline),
     divided by their std when `normalize_advantages`;
  3. score + filter: fastattr scores every record (the pair) against the paper's sequence target on D_val with fresh
     generations from the reference policy, or with target_policy='current' from the policy being trained (the
     on-policy gradient of the validation reward); record loss l_i = -A_i sum_t log pi(y_it | ...), the update's
     loss of record i at ratio 1 (fastattr.rlhf.scores). The filter keeps records by fastattr.filtering.keep_mask:
     'iif' with p = 1 keeps the records with a non-negative score (the paper's RLHF setting, about half of them),
     'random' drops as many records at random (the control), 'none' keeps all;
  4. update: `epochs` passes of Adam over the kept records in mini-batches of `minibatch_size` (the paper: 1, 4
     epochs), token-level clipped surrogate with the sequence's advantage, summed over the completion's tokens.

Every random draw of a round (prompts, sampling, target generations, the random filter, mini-batch orders) comes from
a seed derived from (seed, round, purpose), never from a running RNG: the state of a run is the policy, the optimiser
and the round number, which makes checkpoints and bit-identical resumption simple. The reference policy is the
pretrained model: for a peft policy its base model (adapters disabled), else a frozen copy made at construction.
"""
from __future__ import annotations

import contextlib
import copy
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .. import filtering
from ..seeds import derived_seed
from . import scores
from .sequences import Sequences

FILTERS = ("none", "iif", "iif-all-neg", "random")
TARGETS = ("val", "batch")
TARGET_POLICIES = ("reference", "current")


@dataclass
class PPOConfig:
    """The loop's settings (the paper's, scaled down: mini-batch 1, 4 epochs, Adam)."""

    batch_size: int = 32  # prompts (records) per round
    epochs: int = 4
    minibatch_size: int = 1
    lr: float = 5e-5
    clip: float = 0.2
    kl_coef: float = 0.0  # KL penalty to the reference model, in the reward
    normalize_advantages: bool = True
    filter: str = "none"
    p: float = 1.0  # iif: the fraction of negative-score records dropped (1: keep the non-negative ones)
    attribute: bool = True  # score every round even with filter='none' (the scores are logged)
    target: str = "val"  # 'val': the sequence target on D_val; 'batch': the round's own records
    target_policy: str = "reference"  # who generates the D_val target's completions: the reference, or the policy

    def __post_init__(self):
        if self.filter not in FILTERS:
            raise ValueError(f"filter must be one of {', '.join(FILTERS)}, got {self.filter!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.target_policy not in TARGET_POLICIES:
            raise ValueError(f"target_policy must be one of {', '.join(TARGET_POLICIES)}, got "
                             f"{self.target_policy!r}")
        filtering.check_p(self.p)
        for name in ("batch_size", "epochs", "minibatch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")


@dataclass
class Round:
    """What one round did (`SequencePPO.round`)."""

    records: Sequences
    advantages: Tensor
    rewards: Tensor
    scores: Tensor | None
    keep: Tensor
    stats: dict


def ppo_loss(policy: nn.Module, seqs: Sequences, advantages: Tensor, old_logp: Tensor, clip: float) -> Tensor:
    """Clipped surrogate, per token with the sequence's advantage, summed over tokens, averaged over sequences."""
    logp = seqs.logprobs(policy)
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    return -(surrogate * seqs.completion_mask).sum(1).mean()


class SequencePPO:
    """Sequence PPO with IIF's filter on `task` (fastattr.rlhf.task.Task). `policy` is trained in place."""

    def __init__(self, task, policy: nn.Module, config: PPOConfig | None = None, seed: int = 0):
        self.task, self.policy, self.cfg, self.seed = task, policy.eval(), config or PPOConfig(), seed
        self.round_index = 0
        self._peft = hasattr(policy, "disable_adapter")
        self._frozen = None if self._peft else copy.deepcopy(policy).requires_grad_(False).eval()
        self.params = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=self.cfg.lr)

    # -- state -------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"round": self.round_index, "policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                "config": asdict(self.cfg), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != asdict(self.cfg) or state["seed"] != self.seed:
            raise ValueError("the checkpoint was written by a run with another configuration or seed")
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.round_index = state["round"]

    # -- pieces of a round --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def reference(self):
        """The reference policy: the peft policy with its adapters disabled, or the frozen initial copy."""
        if self._peft:
            with self.policy.disable_adapter():
                yield self.policy
        else:
            yield self._frozen

    def target(self):
        """The round's attribution target: f_seq on D_val with fresh generations (from the reference policy, or from
        the current one with target_policy='current'), or 'batch'."""
        if self.cfg.target == "batch":
            return "batch"
        seed = derived_seed(self.seed, self.round_index, 2)
        if self.cfg.target_policy == "current":
            return scores.validation_target(self.task, self.policy, seed)
        with self.reference() as ref:
            return scores.validation_target(self.task, ref, seed)

    def score(self, records: Sequences, advantages: Tensor, **score_kwargs) -> Tensor:
        """The records' scores at the current parameters (record loss: the update's loss at ratio 1)."""
        return scores.score(self.policy, records, advantages, self.target(), **score_kwargs)

    def keep_mask(self, scores_: Tensor) -> Tensor:
        method = {"none": "ppo", "iif": "iif", "iif-all-neg": "iif-all-neg", "random": "random"}[self.cfg.filter]
        rng = np.random.default_rng([self.seed, self.round_index, 3])
        keep = filtering.keep_mask(method, scores_.detach().cpu(), self.cfg.p, rng)
        if not keep.any():
            warnings.warn(f"the {self.cfg.filter} filter would keep no records; training on all of them this round",
                          RuntimeWarning, stacklevel=2)
            keep = torch.ones_like(keep)
        return keep

    def round(self) -> Round:
        """One round: generate, reward, score + filter, update (see the module docstring)."""
        cfg, task, policy, k = self.cfg, self.task, self.policy, self.round_index
        t0 = time.perf_counter()
        pick = np.random.default_rng([self.seed, k, 0]).choice(len(task.prompts["train"]), cfg.batch_size,
                                                              replace=False)
        ids, mask = task.prompt_batch("train", pick)
        records = task.sample(policy, ids, mask, derived_seed(self.seed, k, 1))
        rewards = task.reward(records)
        with torch.no_grad():
            old_logp = records.logprobs(policy)
            shaped = rewards
            if cfg.kl_coef:
                with self.reference() as ref:
                    ref_logp = records.logprobs(ref)
                shaped = rewards - cfg.kl_coef * (old_logp - ref_logp).sum(1)
        adv = shaped - shaped.mean()
        if cfg.normalize_advantages and len(adv) > 1:
            adv = adv / (adv.std() + 1e-8)
        t1 = t2 = time.perf_counter()
        score_values, keep = None, torch.ones(len(records), dtype=torch.bool)
        if cfg.attribute or cfg.filter != "none":
            score_values = self.score(records, adv).detach()
            keep = self.keep_mask(score_values)
            t2 = time.perf_counter()
        kept = keep.nonzero().squeeze(1)
        for epoch in range(cfg.epochs):
            shuffle = torch.Generator().manual_seed(derived_seed(self.seed, k, 4, epoch))
            order = kept[torch.randperm(len(kept), generator=shuffle)]
            for mb in order.split(cfg.minibatch_size):
                loss = ppo_loss(policy, records.select(mb), adv[mb], old_logp[mb], cfg.clip)
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
        t3 = time.perf_counter()
        self.round_index += 1
        stats = {"kept_fraction": float(keep.float().mean()), "attr_seconds": t2 - t1, "update_seconds": t3 - t2,
                 "rollout_seconds": t1 - t0, "train_reward": float(rewards.mean()),
                 "train_toxicity": float(task.toxic(records).float().mean())}
        return Round(records, adv, rewards, score_values, keep, stats)
