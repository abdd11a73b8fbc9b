"""IIF in Stable-Baselines3: `IIFPPO`, SB3's PPO with a per-round record filter (the semantics of `fastattr train`).

    from fastattr.integrations.sb3 import IIFPPO
    model = IIFPPO("MlpPolicy", "LunarLander-v3", filter="iif", p=0.5, seed=0).learn(100_000)
    model.last_scores, model.last_keep          # the last round's scores and keep-mask, [n_steps * n_envs]

Each round, after the rollout and before the update, at the current parameters theta(k) (`IIFPPO.train`):
  1. the epoch-1 minibatch order is drawn exactly as SB3's `RolloutBuffer.get()` draws it
     (`np.random.permutation(n_steps * n_envs)`, numpy's global RNG), before scoring;
  2. `fastattr.iif.select` scores every record of the flattened buffer (record i = SB3's flattened index i) on the
     actor's parameters (everything but `value_net`, `mlp_extractor.value_net` and an unshared `vf_features_extractor`):
     score_i = <grad l_i, grad f>, l_i = -A~_i log pi(a_i|s_i) with A~ normalised per minibatch of that order as the
     update normalises it, f = -(1/N) sum_j A_j log pi(a_j|s_j) with the raw GAE advantages; the filter
     (iif | iif-all-neg | random | none) turns the scores into a keep-mask;
  3. SB3's own `PPO.train` runs on a `FilteredRolloutBuffer` whose minibatches hold only the kept records: epoch 1
     visits the order of step 1 restricted to them, later epochs a fresh `np.random.permutation` of them, and the last
     partial minibatch of an epoch is used (minibatch_remainder="keep", SB3's behaviour) or skipped ("drop", the
     paper's official code). With filter="none" and "keep" the minibatches and RNG draws are SB3's, so training is
     bit-identical to `PPO` (the scores are still computed).
The round's scores and mask land in `last_scores` / `last_keep`, and SB3's logger records `attribution/kept_fraction`
and `attribution/seconds` (shown in TensorBoard when `tensorboard_log` is set).

Supported: MlpPolicy and CnnPolicy with Discrete, Box (DiagGaussian, `log_std` scored by fastattr's general path) and
MultiDiscrete actions; MultiBinary actions and gSDE take the same code path but are untested. Dict observation spaces
(MultiInputPolicy, SB3's DictRolloutBuffer) are not supported and are refused.
"""
from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Generator
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.type_aliases import RolloutBufferSamples

import fastattr
from fastattr import iif

FILTERS = ("iif", "iif-all-neg", "random", "none")
REMAINDERS = ("keep", "drop")
_CRITIC_PREFIXES = ("value_net.", "mlp_extractor.value_net.", "vf_features_extractor.")
# fastattr.score keywords a user may set; `params` is the actor and `reduce` has no meaning for the one return target
_SCORE_KWARGS = tuple(name for name, prm in inspect.signature(fastattr.score).parameters.items()
                      if prm.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("params", "reduce"))


def is_actor_param(name: str) -> bool:
    """The parameters the scores are taken over: every parameter of an SB3 ActorCriticPolicy except the critic's
    (`value_net`, `mlp_extractor.value_net`, and `vf_features_extractor` when the extractor is not shared). A shared
    features extractor is named `features_extractor` and counts as the actor's."""
    return not name.startswith(_CRITIC_PREFIXES)


class FilteredRolloutBuffer(RolloutBuffer):
    """SB3's RolloutBuffer whose minibatches hold only the records kept for the round (`restrict`).

    The first `get` after `restrict` yields the kept records in the given epoch-1 order, later calls a fresh
    `np.random.permutation` of them; with `drop_remainder` the last partial minibatch of each call is skipped. Before
    `restrict` (and after every `reset`) it behaves exactly as RolloutBuffer.
    """

    def reset(self) -> None:
        super().reset()
        self.kept = np.arange(self.buffer_size * self.n_envs)
        self.drop_remainder = False
        self._epoch1_order: np.ndarray | None = None

    def flatten(self) -> None:
        """Flattens the stored arrays from [n_steps, n_envs, ...] to [n_steps * n_envs, ...] as `get` does (once per
        rollout), so that record i is the index SB3's minibatches use."""
        if not self.generator_ready:
            for name in ("observations", "actions", "values", "log_probs", "advantages", "returns"):
                self.__dict__[name] = self.swap_and_flatten(self.__dict__[name])
            self.generator_ready = True

    def restrict(self, epoch1_order: np.ndarray, keep: np.ndarray, drop_remainder: bool) -> None:
        """Keeps only the records where `keep` [N] is True until the next `reset`; the next `get` visits
        `epoch1_order` [N] (a permutation of all records) restricted to them."""
        self.kept = np.flatnonzero(keep)
        self._epoch1_order = epoch1_order[keep[epoch1_order]]
        self.drop_remainder = drop_remainder

    def get(self, batch_size: int | None = None) -> Generator[RolloutBufferSamples, None, None]:
        assert self.full, "the rollout buffer is not full: collect a rollout first"
        if self._epoch1_order is not None:
            indices, self._epoch1_order = self._epoch1_order, None
        else:
            indices = self.kept[np.random.permutation(len(self.kept))]
        self.flatten()
        batch_size = len(indices) if batch_size is None else batch_size
        for start in range(0, len(indices), batch_size):
            batch = indices[start:start + batch_size]
            if self.drop_remainder and len(batch) < batch_size:
                return
            yield self._get_samples(batch)


class IIFPPO(PPO):
    """Stable-Baselines3's PPO with IIF's per-round record filter (see the module docstring for the semantics).

    Takes every argument of `stable_baselines3.PPO`, plus:
        filter: iif (drop the bottom p of the negative-score records) | iif-all-neg (drop every negative-score record)
            | random (drop as many records as iif would, at random; the control) | none (keep all; scores computed).
        p: the fraction of the negative-score records iif drops (random drops as many), in (0, 1].
        minibatch_remainder: keep (SB3: the last partial minibatch of an epoch is used) | drop (it is skipped).
        score_kwargs: keywords for fastattr.score (e.g. {"dtype": torch.float64, "chunk_size": 1024}).

    After each update `last_scores` ([n_steps * n_envs] CPU float tensor, SB3's flattened record order) and
    `last_keep` ([n_steps * n_envs] bool tensor) hold that round's scores and keep-mask (None before the first).
    `rollout_buffer_class` may be a subclass of `FilteredRolloutBuffer`; Dict observation spaces are refused.
    """

    def __init__(self, policy, env, *args, filter: str = "iif", p: float = 0.5, minibatch_remainder: str = "keep",
                 score_kwargs: dict[str, Any] | None = None, **kwargs):
        iif.check_trainer_args("IIFPPO", filter, p, FILTERS, plain="PPO", records="records")
        if minibatch_remainder not in REMAINDERS:
            raise ValueError(f"IIFPPO: minibatch_remainder must be 'keep' (SB3: use the last partial minibatch) or "
                             f"'drop' (skip it), got {minibatch_remainder!r}")
        score_kwargs = {} if score_kwargs is None else score_kwargs
        if not isinstance(score_kwargs, dict):
            raise ValueError(f"IIFPPO: score_kwargs must be a dict of fastattr.score keywords or None, got "
                             f"{type(score_kwargs).__name__}")
        unknown = sorted(set(score_kwargs) - set(_SCORE_KWARGS))
        if unknown:
            raise ValueError(f"IIFPPO: score_kwargs {unknown} are not accepted; pass only fastattr.score keywords "
                             f"among {', '.join(_SCORE_KWARGS)} (IIFPPO chooses the actor's parameters itself)")
        self.filter = filter
        self.p = float(p)
        self.minibatch_remainder = minibatch_remainder
        self.score_kwargs = dict(score_kwargs)
        self.last_scores: torch.Tensor | None = None
        self.last_keep: torch.Tensor | None = None
        super().__init__(policy, env, *args, **kwargs)

    def _setup_model(self) -> None:
        if isinstance(self.observation_space, spaces.Dict):
            raise ValueError("IIFPPO does not support Dict observation spaces (MultiInputPolicy, DictRolloutBuffer); "
                             "flatten the observations (e.g. gymnasium.wrappers.FlattenObservation) or use plain PPO")
        if self.rollout_buffer_class is None:
            self.rollout_buffer_class = FilteredRolloutBuffer
        elif not (isinstance(self.rollout_buffer_class, type)
                  and issubclass(self.rollout_buffer_class, FilteredRolloutBuffer)):
            raise ValueError(f"IIFPPO: rollout_buffer_class must be FilteredRolloutBuffer or a subclass of it (the "
                             f"filter removes records through it), got {self.rollout_buffer_class!r}; omit it for the "
                             "default")
        super()._setup_model()

    def set_random_seed(self, seed: int | None = None) -> None:
        """SB3's seeding, plus the numpy Generator of the random filter (its own stream: numpy's global RNG, which
        draws the minibatch orders, is not touched by the filter)."""
        super().set_random_seed(seed)
        self._filter_rng = np.random.default_rng(seed)

    def train(self) -> None:
        """Scores the buffer at the current parameters, restricts the buffer to the kept records, then runs SB3's
        PPO.train on them."""
        buffer = self.rollout_buffer
        buffer.flatten()
        t0 = time.perf_counter()
        order = np.random.permutation(buffer.buffer_size * buffer.n_envs)  # = SB3's epoch-1 draw in RolloutBuffer.get
        obs = buffer.to_torch(buffer.observations)
        actions = buffer.to_torch(buffer.actions.astype(np.float32, copy=False))
        if isinstance(self.action_space, spaces.Discrete):
            actions = actions.long().flatten()  # as PPO.train converts them for evaluate_actions
        advantages = buffer.to_torch(buffer.advantages.flatten())

        def log_prob(policy):
            return policy.get_distribution(obs).log_prob(actions)

        self.policy.set_training_mode(False)
        sel = iif.select(self.policy, log_prob, advantages, method=self.filter, p=self.p, batch_size=self.batch_size,
                         order=torch.from_numpy(order), adv_norm="minibatch" if self.normalize_advantage else "none",
                         params=is_actor_param, rng=self._filter_rng, **self.score_kwargs)
        keep = sel.keep.cpu()
        buffer.restrict(order, keep.numpy(), drop_remainder=self.minibatch_remainder == "drop")
        self.last_scores, self.last_keep = sel.scores.detach().cpu(), keep
        self.logger.record("attribution/kept_fraction", sel.kept_fraction)
        self.logger.record("attribution/seconds", time.perf_counter() - t0)
        n_kept = int(keep.sum())
        if self.minibatch_remainder == "drop" and n_kept < self.batch_size:
            warnings.warn(f"IIFPPO: {n_kept} records kept, fewer than batch_size={self.batch_size}: with "
                          "minibatch_remainder='drop' there is no minibatch, so this round has no update",
                          RuntimeWarning, stacklevel=2)
            return
        super().train()
