"""PPO with per-round local data attribution and IIF (PAPER.md §1, §3, §4), in CleanRL's single-file shape.

Semantics are Stable-Baselines3's PPO as the paper ran it: n_steps 2048 with one env, minibatch 64, 10 epochs,
clip 0.2, GAE(0.99, 0.95), SGD lr 5e-3 (Adam 3e-4, eps 1e-5, for BipedalWalker), value loss MSE(returns, V) with
vf_coef 0.5, entropy 0, advantages normalised per minibatch, separate 2x64 tanh actor and critic with SB3's
orthogonal init, truncated episodes bootstrapped with r += gamma * V(final_obs), the last partial minibatch kept,
grad clipping off unless --clip-grad (the paper lists 0.5 but its code comments clipping out).

One round (the paper's round k, 0-based: theta(k) collects B(k) and is updated to theta(k+1)):
    collect_rollout   n_steps x num_envs transitions with pi_theta(k)
    compute_gae       GAE advantages (raw) and value targets; discounted_returns: Monte Carlo return-to-go
    FASTATTR          score_buffer at theta(k): score_i = <grad l_i, grad f>, actor parameters only, where
                        l_i = -A~_i log pi(a_i|s_i)     (the PPO surrogate at ratio 1; same gradient)
                        f   = -(1/n) sum_j A^_j log pi(a_j|s_j)   (the return target, raw GAE advantages)
                      A~ is normalised exactly as the update normalises it in epoch 1: per minibatch of the epoch-1
                      order, which is drawn *before* scoring (the official code's "consecutive 64-record chunks of
                      the epoch-1 order" is the same thing; --score-adv-norm buffer|none are variants)
                      filtering.keep_mask -> which records the update sees (IIF / all-neg / random / all)
    ppo_update        n_epochs over the kept records from theta(k): epoch 1 in the scored order restricted to
                      the kept records, later epochs freshly shuffled
    evaluate          stochastic policy on separately seeded eval envs (does not touch the training RNG)
The metrics line `round = r` describes theta(r) (r updates done; r = 0 is the initial policy); the attribution file
attribution/round_{k}.npz holds B(k) and its scores at theta(k), the buffer of the update that produced theta(k+1).

Speed (benchmarks/bench_ppo.py): rollout actions come from a numpy copy of the actor (`NumpyPolicy`; a step is a
batch of one, where torch's per-op overhead dominates) and log pi / V for the buffer from one torch pass after the
loop; MLP agents trained with plain SGD take `NumpySGDStep`, the same minibatch loss and step with the backward
written out in numpy (tested against torch autograd). Everything runs on one torch thread (bit-identical curves
whatever the thread count); `--threads` goes to fastattr.score's kernels.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import envs as envs_lib
from . import filtering, iif, targets

CHECKPOINT_FORMAT = 1
LOG_2PI = math.log(2 * math.pi)


@dataclass
class Args:
    env_id: str = "CartPole-v1"
    """gymnasium id of the environment"""
    method: str = "ppo"
    """ppo | iif | iif-all-neg | random: which records each round's update sees (see fastattr/filtering.py)"""
    seed: int = 0
    """seed of the agent's init, the rollouts, the minibatch order, the random filter and the evaluation"""
    total_timesteps: int = 100_000
    """env steps in total; the run has total_timesteps // (n_steps * num_envs) rounds"""
    run_dir: str = ""
    """output directory (args.json, metrics.jsonl, checkpoints/, attribution/); default runs/<env>__<method>__<seed>"""
    preset: str = ""
    """'' (generic defaults) or 'paper' (the paper's settings for this env; set by `fastattr train --preset paper`)"""
    env_kwargs: dict = field(default_factory=dict)
    """keyword arguments of gym.make, as JSON on the command line (e.g. '{"is_slippery": false}')"""
    p: float = 0.5
    """fraction of the negative-influence records IIF drops, in (0, 1] (random drops as many records)"""

    # PPO (Stable-Baselines3 semantics)
    num_envs: int = 1
    """parallel envs in the training rollout (the paper: 1)"""
    n_steps: int = 2048
    """steps per env per rollout; the buffer holds n_steps * num_envs records"""
    batch_size: int = 64
    """minibatch size"""
    n_epochs: int = 10
    """epochs over the (kept) buffer per round"""
    optimizer: str = "adam"
    """sgd | adam (the paper: sgd, adam for BipedalWalker)"""
    learning_rate: float = 3e-4
    """constant learning rate"""
    adam_eps: float = 1e-5
    """Adam epsilon (SB3's value)"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_coef: float = 0.2
    """PPO ratio clip range"""
    ent_coef: float = 0.0
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient (value loss = MSE(returns, V), SB3)"""
    clip_grad: bool = False
    """clip the global grad norm at max_grad_norm (the paper lists 0.5 but its code disables clipping)"""
    max_grad_norm: float = 0.5
    """max global grad norm when --clip-grad"""
    norm_adv: bool = True
    """normalise advantages per minibatch (SB3)"""
    update_backend: str = "auto"
    """auto | torch | numpy: the minibatch step; auto = numpy (same loss, hand-written backward, ~4x faster here)
    for MLP agents with plain SGD, torch autograd otherwise"""
    minibatch_remainder: str = "keep"
    """keep | drop: the last partial minibatch of an epoch (SB3 keeps it; the official IIF retrain drops it)"""
    env_stream: str = "continue"
    """continue | reseed: episodes continue across rounds (Algorithm 1, SB3), or every round starts from
    env.reset(seed=seed) as the official code's one-process-per-round pipeline does (its action RNG continues here)"""
    network: str = "auto"
    """auto | mlp | cnn: auto = the paper's CNN for image observations (MiniGrid), else 2x64 tanh MLPs"""
    hidden: int = 64
    """width of the actor's and critic's two hidden layers"""
    features_dim: int = 64
    """output width of the CNN feature extractor"""

    # attribution
    score_adv_norm: str = "minibatch"
    """minibatch | buffer | none: how A~ in the record loss is normalised (minibatch = as the update does it)"""
    save_attribution: bool = False
    """save every round's buffer and scores (attribution/round_k.npz) and theta(k) (checkpoints/theta_k.pt)"""
    probe: str = ""
    """with --save-attribution: also store each record's action-target influence (score_action: mean over up to
    --probe-targets records matching this probe, e.g. frozenlake-down; `fastattr behaviour --list-probes`)"""
    probe_targets: int = 32
    """how many probe-matching records serve as action targets per round"""

    # evaluation
    eval_episodes: int = 20
    """stochastic-policy episodes per evaluation (0 = no evaluation); the paper uses 1000 (100 for some envs)"""
    eval_every: int = 1
    """evaluate every this many rounds (and after the last)"""
    eval_envs: int = 0
    """parallel eval envs (0 = min(eval_episodes, 100))"""

    # run control
    threads: int = 1
    """torch threads for fastattr's scoring kernels; the PPO passes always run on one (results never depend on it)"""
    resume: bool = False
    """continue the run in run_dir from its last checkpoint (bit-identical on CPU); start it if there is none"""
    progress: bool = True
    """show a tqdm progress bar"""


# Fields that do not change the results: a run dir may be resumed with different values.
NON_SEMANTIC = ("run_dir", "resume", "progress", "threads")


def paper_overrides(env_id: str) -> dict:
    """The Args values `--preset paper` sets for env_id (PAPER.md §4; eval budgets are ours, see envs.py)."""
    pre = envs_lib.paper_preset(env_id)
    return dict(
        preset="paper", total_timesteps=pre.total_timesteps, p=pre.p, optimizer=pre.optimizer,
        learning_rate=pre.learning_rate, network=pre.network, eval_episodes=pre.eval_episodes,
        eval_every=pre.eval_every, env_kwargs=dict(pre.env_kwargs), num_envs=1, n_steps=2048, batch_size=64,
        n_epochs=10, gamma=0.99, gae_lambda=0.95, clip_coef=0.2, ent_coef=0.0, vf_coef=0.5, clip_grad=False,
    )


def validate_args(args: Args) -> Args:
    """Raises ValueError naming the bad argument and the fix."""
    def need(cond, msg):
        if not cond:
            raise ValueError(msg)

    need(args.method in filtering.METHODS, f"--method must be one of {', '.join(filtering.METHODS)}, got "
                                           f"{args.method!r}")
    filtering.check_p(args.p)
    for name in ("num_envs", "n_steps", "batch_size", "n_epochs", "threads", "eval_every", "hidden", "features_dim"):
        need(isinstance(getattr(args, name), int) and getattr(args, name) >= 1,
             f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)!r}")
    need(args.eval_episodes >= 0 and args.eval_envs >= 0, "--eval-episodes and --eval-envs must be >= 0")
    per_round = args.n_steps * args.num_envs
    need(args.total_timesteps >= per_round,
         f"--total-timesteps ({args.total_timesteps}) is less than one round of n_steps * num_envs = {per_round} "
         "env steps; raise it or lower --n-steps")
    need(args.optimizer in ("sgd", "adam"), f"--optimizer must be sgd or adam, got {args.optimizer!r}")
    need(args.learning_rate > 0, f"--learning-rate must be > 0, got {args.learning_rate}")
    need(0 <= args.gamma <= 1 and 0 <= args.gae_lambda <= 1, "--gamma and --gae-lambda must be in [0, 1]")
    need(args.clip_coef > 0, f"--clip-coef must be > 0, got {args.clip_coef}")
    need(args.network in ("auto", "mlp", "cnn"), f"--network must be auto, mlp or cnn, got {args.network!r}")
    need(args.score_adv_norm in ("minibatch", "buffer", "none"),
         f"--score-adv-norm must be minibatch, buffer or none, got {args.score_adv_norm!r}")
    need(args.update_backend in ("auto", "torch", "numpy"),
         f"--update-backend must be auto, torch or numpy, got {args.update_backend!r}")
    need(args.update_backend != "numpy" or (args.optimizer == "sgd" and args.network != "cnn"),
         "--update-backend numpy needs an MLP agent and plain SGD (--optimizer sgd); use --update-backend torch")
    need(args.env_stream in ("continue", "reseed"),
         f"--env-stream must be continue or reseed, got {args.env_stream!r}")
    need(args.minibatch_remainder in ("keep", "drop"),
         f"--minibatch-remainder must be keep or drop, got {args.minibatch_remainder!r}")
    need(args.preset in ("", "paper"), f"--preset must be 'paper' or empty, got {args.preset!r}")
    need(isinstance(args.env_kwargs, dict), f"--env-kwargs must be a JSON object, got {args.env_kwargs!r}")
    need(isinstance(args.seed, int) and 0 <= args.seed < 2**32, f"--seed must be in [0, 2^32), got {args.seed!r}")
    envs_lib.check_env_id(args.env_id)
    if args.probe:
        need(args.save_attribution, "--probe stores action-target scores with the attribution: add --save-attribution")
        need(args.probe_targets >= 1, f"--probe-targets must be >= 1, got {args.probe_targets}")
        from .probes import get_probe

        get_probe(args.probe).check_env(args.env_id)  # an unknown probe or one for another env fails before any I/O
    if not args.run_dir:
        args.run_dir = os.path.join("runs", f"{args.env_id}__{args.method}__{args.seed}")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Agent
# ----------------------------------------------------------------------------------------------------------------------
def layer_init(layer: nn.Module, gain: float, bias: float = 0.0) -> nn.Module:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.constant_(layer.bias, bias)
    return layer


class Agent(nn.Module):
    """Separate actor and critic (SB3 MlpPolicy: 2x64 tanh each) behind an optional shared CNN feature extractor
    (the paper's MiniGrid net: conv3x3 3->16, ReLU, conv3x3 16->32, ReLU, linear 288->64, ReLU; 32,359 actor
    parameters). Continuous actions: a diagonal Gaussian with a state-independent log-std (init 0, SB3).

    Parameter names: `features.*` (shared, counts as actor for attribution), `actor.*`, `actor_logstd`, `critic.*`.
    Observations are raw env observations; `preprocess` applies SB3's one-hot / flatten / image scaling.
    """

    def __init__(self, obs_space: gym.Space, act_space: gym.Space, network: str = "auto", hidden: int = 64,
                 features_dim: int = 64):
        super().__init__()
        is_image = (isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) == 3
                    and obs_space.dtype == np.uint8)
        if network == "auto":
            network = "cnn" if is_image else "mlp"
        if network == "cnn" and not is_image:
            raise ValueError(f"--network cnn needs uint8 HxWxC image observations, got {obs_space}")
        if network == "cnn" and obs_space.shape[0] < min(obs_space.shape[1:]):  # SB3's channel-first test
            raise ValueError(f"image observations {obs_space.shape} look channel-first (C, H, W); the CNN takes "
                             "(H, W, C): wrap the env with a transpose (gymnasium.wrappers.TransformObservation with "
                             "np.moveaxis(obs, 0, -1) and the matching space), or pass --network mlp")
        self.network = network
        if isinstance(obs_space, gym.spaces.Discrete):
            self.obs_kind, in_dim = "onehot", int(obs_space.n)
        elif network == "cnn":
            self.obs_kind = "image"
        else:
            self.obs_kind, in_dim = "flat", int(np.prod(obs_space.shape))
        self.n_obs = int(obs_space.n) if self.obs_kind == "onehot" else 0
        self.continuous = isinstance(act_space, gym.spaces.Box)
        n_out = int(np.prod(act_space.shape)) if self.continuous else int(act_space.n)

        if network == "cnn":
            h, w, c = obs_space.shape
            conv = nn.Sequential(layer_init(nn.Conv2d(c, 16, 3), math.sqrt(2)), nn.ReLU(),
                                 layer_init(nn.Conv2d(16, 32, 3), math.sqrt(2)), nn.ReLU(), nn.Flatten())
            with torch.no_grad():
                n_flat = conv(torch.zeros(1, c, h, w)).shape[1]
            self.features = nn.Sequential(*conv, layer_init(nn.Linear(n_flat, features_dim), math.sqrt(2)), nn.ReLU())
            in_dim = features_dim
        else:
            self.features = nn.Identity()
        self.actor = nn.Sequential(
            layer_init(nn.Linear(in_dim, hidden), math.sqrt(2)), nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden), math.sqrt(2)), nn.Tanh(),
            layer_init(nn.Linear(hidden, n_out), 0.01),
        )
        self.critic = nn.Sequential(
            layer_init(nn.Linear(in_dim, hidden), math.sqrt(2)), nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden), math.sqrt(2)), nn.Tanh(),
            layer_init(nn.Linear(hidden, 1), 1.0),
        )
        if self.continuous:
            self.actor_logstd = nn.Parameter(torch.zeros(n_out))
        # the same Parameter objects (updated in place by optimisers and load_state_dict), for _chain
        self._linears = {k: [(m.weight, m.bias) for m in getattr(self, k) if isinstance(m, nn.Linear)]
                         for k in ("actor", "critic")}

    @staticmethod
    def is_actor_param(name: str) -> bool:
        """Parameters the attribution scores: everything but the critic (the shared CNN extractor counts)."""
        return not name.startswith("critic.")

    def preprocess(self, obs: torch.Tensor) -> torch.Tensor:
        if self.obs_kind == "onehot":
            # == one_hot, written with a comparison so that torch.func.vmap can trace it
            return (obs.long().reshape(-1, 1) == torch.arange(self.n_obs, device=obs.device)).float()
        if self.obs_kind == "image":
            return obs.float().permute(0, 3, 1, 2) / 255.0
        return obs.float().reshape(obs.shape[0], -1)

    def _chain(self, z: torch.Tensor, which: str) -> torch.Tensor:
        """actor(z) / critic(z) with F.linear on the same Parameters, skipping nn.Module call overhead (a rollout
        step is ~10 tiny layer calls). Bit-identical to the modules (nn.Linear.forward is F.linear). The scoring
        path (`log_prob`) goes through the modules, whose forward hooks fastattr.score uses."""
        (w0, b0), (w1, b1), (w2, b2) = self._linears[which]
        return F.linear(torch.tanh(F.linear(torch.tanh(F.linear(z, w0, b0)), w1, b1)), w2, b2)

    def _log_prob_entropy(self, out: torch.Tensor, actions: torch.Tensor, entropy: bool = True):
        if self.continuous:
            logstd = self.actor_logstd.expand_as(out)
            logp = (-0.5 * ((actions - out) * torch.exp(-logstd)) ** 2 - logstd - 0.5 * LOG_2PI).sum(-1)
            return logp, ((0.5 + 0.5 * LOG_2PI + logstd).sum(-1) if entropy else None)
        logp_all = F.log_softmax(out, dim=-1)
        logp = logp_all.gather(1, actions.long().reshape(-1, 1)).squeeze(1)
        return logp, (-(logp_all.exp() * logp_all).sum(-1) if entropy else None)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi(a|s) [N] (summed over action dims for Gaussian actions); actor parameters only, via the modules."""
        return self._log_prob_entropy(self.actor(self.features(self.preprocess(obs))), actions)[0]

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """= log_prob (so torch.func.functional_call(agent, params, (obs, actions)) gives log pi(a|s))."""
        return self.log_prob(obs, actions)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self._chain(self.features(self.preprocess(obs)), "critic").squeeze(-1)

    def evaluate_actions(self, obs, actions, entropy: bool = True):
        """(log pi(a|s), entropy or None, V(s)), each [N], from one pass through the shared features (SB3's name)."""
        z = self.features(self.preprocess(obs))
        logp, entropy = self._log_prob_entropy(self._chain(z, "actor"), actions, entropy)
        return logp, entropy, self._chain(z, "critic").squeeze(-1)

    @torch.no_grad()
    def sample_actions(self, obs: np.ndarray, rng: np.random.Generator, policy: "NumpyPolicy | None" = None):
        """a ~ pi(.|s) for a batch of raw observations, drawn with the numpy Generator `rng` (one uniform per row for
        discrete actions: the inverse CDF of the softmax; a standard normal per dim for Gaussian actions).

        With `policy` (this agent's weights as numpy arrays, see `numpy_policy`) the MLP runs in numpy: a rollout step
        is a batch of one, where numpy's per-op cost is a fraction of torch's. Otherwise (the CNN) torch computes the
        logits. The buffer's log-probabilities and values are computed afterwards in one torch pass."""
        if policy is not None:
            out = policy.actor_out(obs)
        else:
            out = self._chain(self.features(self.preprocess(torch.as_tensor(obs, dtype=torch.float32))), "actor")
            out = out.numpy().astype(np.float64)
        if self.continuous:
            std = np.exp(self.actor_logstd.detach().numpy().astype(np.float64))
            return (out + std * rng.standard_normal(out.shape)).astype(np.float32)
        e = np.exp(out - out.max(-1, keepdims=True))
        cdf = np.cumsum(e, -1)
        u = rng.random((out.shape[0], 1)) * cdf[:, -1:]
        return np.minimum((cdf < u).sum(-1), out.shape[-1] - 1).astype(np.int64)

    def numpy_policy(self) -> "NumpyPolicy | None":
        """A frozen numpy copy of the MLP actor for sampling (None for the CNN). Rebuild it after each update."""
        return NumpyPolicy(self) if self.network == "mlp" else None


class NumpyPolicy:
    """The actor MLP of an Agent as float64 numpy arrays, for fast batched-of-one sampling during rollouts."""

    def __init__(self, agent: Agent):
        self.kind, self.n_obs = agent.obs_kind, agent.n_obs
        self.layers = [(w.detach().numpy().astype(np.float64).T.copy(), b.detach().numpy().astype(np.float64))
                       for w, b in agent._linears["actor"]]

    def actor_out(self, obs: np.ndarray) -> np.ndarray:
        if self.kind == "onehot":
            x = np.eye(self.n_obs)[np.asarray(obs).astype(np.int64).reshape(-1)]
        else:
            x = np.asarray(obs, dtype=np.float64).reshape(len(obs), -1)
        (w0, b0), (w1, b1), (w2, b2) = self.layers
        return np.tanh(np.tanh(x @ w0 + b0) @ w1 + b1) @ w2 + b2


def make_optimizer(agent: Agent, args: Args) -> torch.optim.Optimizer:
    if args.optimizer == "sgd":
        return torch.optim.SGD(agent.parameters(), lr=args.learning_rate)  # SB3 passes no momentum
    return torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=args.adam_eps)


# ----------------------------------------------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class RolloutState:
    """What carries over between rounds in the training envs (episodes continue across rounds, as in SB3)."""

    next_obs: np.ndarray
    ep_return: np.ndarray
    ep_length: np.ndarray
    rng: np.random.Generator
    """draws the rollout's actions"""
    global_step: int = 0


@dataclass
class Buffer:
    """One round's flattened buffer, N = n_steps * num_envs records in time-major order (index t * num_envs + e)."""

    obs: torch.Tensor        # [N, *obs_shape] raw observations
    actions: torch.Tensor    # [N] (discrete) or [N, act_dim]; Gaussian actions before clipping to the bounds
    logp: torch.Tensor       # [N] log pi_theta(k)(a|s)
    values: torch.Tensor     # [N] V_theta(k)(s)
    rewards: torch.Tensor    # [N] env rewards
    bootstrap: torch.Tensor  # [N] gamma * V(final_obs) on truncated steps (added to the reward for GAE, SB3), else 0
    dones: torch.Tensor      # [N] 1 where the episode ended at this step (terminated or truncated)
    terminated: torch.Tensor  # [N] 1 where it terminated
    next_value: torch.Tensor  # [num_envs] V of the observation after the last step
    num_envs: int = 1
    advantages: torch.Tensor | None = None  # [N] GAE, raw
    returns: torch.Tensor | None = None     # [N] advantages + values (the value targets)

    @property
    def n(self) -> int:
        return self.rewards.shape[0]


def _check_finite(x: np.ndarray, what: str, env_id: str, step: int) -> None:
    if not np.all(np.isfinite(x)):
        raise ValueError(
            f"{env_id} returned a non-finite {what} at env step {step}: {x}. Training stops here; the run dir keeps "
            "its last completed round (fix the env or wrap it, e.g. gymnasium.wrappers.TransformReward)."
        )


@torch.no_grad()
def collect_rollout(envs: gym.vector.VectorEnv, agent: Agent, state: RolloutState,
                    args: Args) -> tuple[Buffer, list[tuple[float, int]]]:
    """Runs n_steps in every env with pi_theta(k), actions drawn from state.rng. Returns the buffer (no advantages
    yet) and the (return, length) of every episode that finished. Observations and rewards are checked for NaN/inf
    (ValueError). log pi(a|s) and V(s) are computed for the whole buffer in one pass after the loop."""
    T, E = args.n_steps, envs.num_envs
    obs_buf = np.zeros((T, E) + tuple(envs.single_observation_space.shape), dtype=np.float32)
    act_shape = tuple(envs.single_action_space.shape) if agent.continuous else ()
    act_buf = np.zeros((T, E) + act_shape, dtype=np.float32 if agent.continuous else np.int64)
    rew_buf, boot_buf, done_buf, term_buf = (np.zeros((T, E), dtype=np.float32) for _ in range(4))
    finished: list[tuple[float, int]] = []
    if agent.continuous:
        low, high = envs.single_action_space.low, envs.single_action_space.high
    policy = agent.numpy_policy()
    next_obs = state.next_obs
    for t in range(T):
        obs_buf[t] = next_obs
        a_np = agent.sample_actions(next_obs, state.rng, policy)
        act_buf[t] = a_np
        # Gaussian actions are clipped for the env only; the buffer keeps the sample (SB3)
        next_obs, reward, terminated, truncated, info = envs.step(np.clip(a_np, low, high) if agent.continuous
                                                                  else a_np)
        state.global_step += E
        if not (np.isfinite(reward).all() and np.isfinite(next_obs).all()):
            _check_finite(reward, "reward", args.env_id, state.global_step)
            _check_finite(next_obs, "observation", args.env_id, state.global_step)
        done = terminated | truncated
        rew_buf[t], done_buf[t], term_buf[t] = reward, done, terminated
        state.ep_return += reward
        state.ep_length += 1
        if done.any():
            # A time-limit cut is not a real end: bootstrap with V(final obs) like SB3 (CleanRL does not)
            trunc_idx = np.nonzero(truncated & ~terminated)[0]
            if len(trunc_idx):
                final = np.stack([info["final_obs"][i] for i in trunc_idx]).astype(np.float32)
                _check_finite(final, "final observation", args.env_id, state.global_step)
                boot_buf[t, trunc_idx] = args.gamma * agent.value(torch.from_numpy(final)).numpy()
            for i in np.nonzero(done)[0]:
                finished.append((float(state.ep_return[i]), int(state.ep_length[i])))
                state.ep_return[i], state.ep_length[i] = 0.0, 0
    state.next_obs = next_obs
    next_value = agent.value(torch.as_tensor(np.asarray(next_obs, dtype=np.float32)))

    def flat(x):
        return torch.from_numpy(x.reshape((T * E,) + x.shape[2:]))

    obs, actions = flat(obs_buf), flat(act_buf)
    logp, _, values = agent.evaluate_actions(obs, actions)
    buf = Buffer(obs, actions, logp, values, flat(rew_buf), flat(boot_buf), flat(done_buf), flat(term_buf),
                 next_value, num_envs=E)
    return buf, finished


def compute_gae(buf: Buffer, gamma: float, gae_lambda: float) -> Buffer:
    """GAE(gamma, lambda) advantages and value targets (returns = advantages + values), in place; SB3's recursion
    with done_t = "the episode ended at step t" and rewards already including the truncation bootstrap."""
    E = buf.num_envs
    T = buf.n // E
    r = (buf.rewards + buf.bootstrap).reshape(T, E).numpy()
    v = buf.values.reshape(T, E).numpy()
    nonterminal = 1.0 - buf.dones.reshape(T, E).numpy()
    next_v = buf.next_value.numpy()
    adv = np.zeros((T, E), dtype=np.float32)
    last = np.zeros(E, dtype=np.float32)
    for t in reversed(range(T)):
        nv = next_v if t == T - 1 else v[t + 1]
        delta = r[t] + gamma * nv * nonterminal[t] - v[t]
        last = delta + gamma * gae_lambda * nonterminal[t] * last
        adv[t] = last
    buf.advantages = torch.from_numpy(adv.reshape(-1))
    buf.returns = buf.advantages + buf.values
    return buf


def discounted_returns(buf: Buffer, gamma: float) -> torch.Tensor:
    """Monte Carlo discounted return-to-go within each episode [N]: G_t = r_t + gamma * G_{t+1}, cut at episode
    ends, bootstrapped with V(final obs) at time-limit truncations and with V(next obs) at the end of the buffer."""
    E = buf.num_envs
    T = buf.n // E
    r = (buf.rewards + buf.bootstrap).reshape(T, E).numpy().astype(np.float64)
    nonterminal = 1.0 - buf.dones.reshape(T, E).numpy()
    g = buf.next_value.numpy().astype(np.float64)
    out = np.zeros((T, E))
    for t in reversed(range(T)):
        g = r[t] + gamma * nonterminal[t] * g
        out[t] = g
    return torch.from_numpy(out.reshape(-1).astype(np.float32))


# ----------------------------------------------------------------------------------------------------------------------
# FASTATTR: per-record scores and the keep-mask
# ----------------------------------------------------------------------------------------------------------------------
def normalize_advantages(adv: torch.Tensor, order: torch.Tensor, batch_size: int, mode: str = "minibatch"):
    """A~ [N], normalised as the update normalises it (see fastattr.targets.normalize_advantages)."""
    return targets.normalize_advantages(adv, order, batch_size, mode)


def score_buffer(agent: Agent, obs: torch.Tensor, actions: torch.Tensor, adv_record: torch.Tensor,
                 adv_target: torch.Tensor, extra_targets=None) -> torch.Tensor:
    """Per-record influence on the return target at the agent's current parameters, actor parameters only.

    score_i = <grad l_i, grad f>,  l_i = -adv_record_i * log pi(a_i|s_i),  f = -(1/N) sum_j adv_target_j log pi(a_j|s_j)
    Both are losses (negated objectives), so the sign is the paper's: > 0 helps the return, < 0 harms it.
    Computed by `fastattr.score` from one forward pass. Returns [N].

    extra_targets: optional `extra_targets(agent) -> Tensor[M]` of further target *losses* (e.g. -log pi(a|s) for
    probe pairs); then the result is [N, 1 + M] with the return target in column 0 (one extra forward).
    """
    return targets.return_scores(agent, lambda m: m.log_prob(obs, actions), adv_record, adv_target,
                                 params=Agent.is_actor_param, extra_targets=extra_targets)


# ----------------------------------------------------------------------------------------------------------------------
# Update
# ----------------------------------------------------------------------------------------------------------------------
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


class NumpySGDStep:
    """TorchStep's loss and plain-SGD step for the 2x64 tanh MLP agent, with the backward pass written out in numpy.

    At minibatch 64 a step is ~20 tiny ops whose per-call overhead dominates: torch autograd takes ~2 ms here,
    numpy ~0.5 ms (benchmarks/bench_ppo.py). The arrays are views of the torch Parameters, so the updates land in
    the agent directly (SGD keeps no optimiser state). Agrees with TorchStep to float32 rounding (tests/test_ppo.py).
    """

    @staticmethod
    def supports(agent: Agent, optimizer) -> bool:
        if agent.network != "mlp" or type(optimizer) is not torch.optim.SGD:
            return False
        g = optimizer.param_groups
        return len(g) == 1 and not g[0]["momentum"] and not g[0]["weight_decay"] and not g[0]["nesterov"] \
            and not g[0].get("maximize", False)

    def __init__(self, agent: Agent, optimizer, buf: Buffer, args: Args):
        self.agent, self.args = agent, args
        self.lr = np.float32(optimizer.param_groups[0]["lr"])
        # [W (out, in), b] per layer, sharing memory with the Parameters
        self.layers = {k: [(w.detach().numpy(), b.detach().numpy()) for w, b in agent._linears[k]]
                       for k in ("actor", "critic")}
        self.logstd = agent.actor_logstd.detach().numpy() if agent.continuous else None
        with torch.no_grad():
            self.x = agent.preprocess(buf.obs).numpy()
        self.actions = buf.actions.numpy()
        self.logp_old, self.adv = buf.logp.numpy(), buf.advantages.numpy()
        self.returns = buf.returns.numpy()

    @staticmethod
    def _forward(layers, x):
        (w0, b0), (w1, b1), (w2, b2) = layers
        h1 = np.tanh(x @ w0.T + b0)
        h2 = np.tanh(h1 @ w1.T + b1)
        return h1, h2, h2 @ w2.T + b2

    @staticmethod
    def _backward(layers, x, h1, h2, g):
        """Gradients [(gW, gb)] of sum(g * out) for out = MLP(x)."""
        (_, _), (w1, _), (w2, _) = layers
        g2 = (g @ w2) * (1 - h2 * h2)
        g1 = (g2 @ w1) * (1 - h1 * h1)
        return [(g1.T @ x, g1.sum(0)), (g2.T @ h1, g2.sum(0)), (g.T @ h2, g.sum(0))]

    def __call__(self, mb: torch.Tensor) -> np.ndarray:
        a = self.args
        idx = mb.numpy()
        n = len(idx)
        x, act = self.x[idx], self.actions[idx]
        h1, h2, out = self._forward(self.layers["actor"], x)
        c1, c2, v = self._forward(self.layers["critic"], x)
        v = v[:, 0]
        # log pi(a|s) and its gradient w.r.t. the actor's output (and the log-std)
        if self.logstd is None:
            z = out - out.max(1, keepdims=True)
            logp_all = z - np.log(np.exp(z).sum(1, keepdims=True))
            p = np.exp(logp_all)
            rows = np.arange(n)
            logp = logp_all[rows, act]
        else:
            inv_std = np.exp(-self.logstd)
            u = (act - out) * inv_std
            logp = (-0.5 * u * u - self.logstd - np.float32(0.5 * LOG_2PI)).sum(1)
        logratio = logp - self.logp_old[idx]
        ratio = np.exp(logratio)
        adv = self.adv[idx]
        if a.norm_adv and n > 1:
            adv = (adv - adv.mean()) / (adv.std(ddof=1) + np.float32(1e-8))
        lo, hi = 1 - a.clip_coef, 1 + a.clip_coef
        surr1, surr2 = adv * ratio, adv * np.clip(ratio, lo, hi)
        pg_loss = -np.minimum(surr1, surr2).mean()
        v_loss = ((v - self.returns[idx]) ** 2).mean()
        # d loss / d logp_i: torch.min routes the gradient to surr1 where surr1 <= surr2 (ties included); the clipped
        # branch passes gradient only strictly inside (lo, hi)
        d_ratio = np.where(surr1 <= surr2, adv, adv * ((ratio > lo) & (ratio < hi)))
        d_logp = (-(d_ratio * ratio) / n).astype(np.float32)
        grads = {}
        if self.logstd is None:
            g_out = -p * d_logp[:, None]
            g_out[rows, act] += d_logp
            if a.ent_coef:
                ent = -(p * logp_all).sum(1)
                g_out += (a.ent_coef / n) * p * (logp_all + ent[:, None])  # d(-c * mean H)/d logits
        else:
            g_out = d_logp[:, None] * u * inv_std
            g_logstd = (d_logp[:, None] * (u * u - 1)).sum(0) - (a.ent_coef if a.ent_coef else 0.0)
            grads["logstd"] = g_logstd.astype(np.float32)
        grads["actor"] = self._backward(self.layers["actor"], x, h1, h2, g_out.astype(np.float32))
        g_v = (a.vf_coef * 2.0 / n) * (v - self.returns[idx])
        grads["critic"] = self._backward(self.layers["critic"], x, c1, c2, g_v[:, None].astype(np.float32))
        scale = np.float32(1.0)
        if a.clip_grad:
            sq = sum(float((gw * gw).sum() + (gb * gb).sum()) for k in ("actor", "critic") for gw, gb in grads[k])
            sq += float((grads["logstd"] ** 2).sum()) if "logstd" in grads else 0.0
            scale = np.float32(min(1.0, a.max_grad_norm / (math.sqrt(sq) + 1e-6)))
        step = self.lr * scale
        for k in ("actor", "critic"):
            for (w, b), (gw, gb) in zip(self.layers[k], grads[k]):
                w -= step * gw
                b -= step * gb
        if "logstd" in grads:
            self.logstd -= step * grads["logstd"]
        clipfrac = (np.abs(ratio - 1.0) > a.clip_coef).mean()
        return np.array([pg_loss, v_loss, ((ratio - 1) - logratio).mean(), clipfrac], dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------
class torch_threads:
    """Runs the block with n torch intra-op threads. main() runs everything on one thread (BLAS and LAPACK split
    reductions across threads, so the same seed gave bit-different curves with 1 and 2 threads; these small nets gain
    nothing from a second thread, MACHINE.md §2) and gives `--threads` to fastattr.score, whose kernels are
    thread-count independent."""

    def __init__(self, n: int = 1):
        self.n = n

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def train_env_seeds(args: Args) -> int | list[int]:
    """Seeds of the training envs: args.seed for one env (the paper's runs); for E envs, E seeds derived from it, so
    runs with neighbouring seeds share no env (a plain seed gives env i seed + i, the next run's env i - 1)."""
    if args.num_envs == 1:
        return args.seed
    return [_derived_seed(args.seed, 0x7E5, i) % 2**31 for i in range(args.num_envs)]


EVAL_EPISODE_CAP = 100_000  # steps; an env without a time limit could otherwise evaluate forever


@torch.no_grad()
def evaluate(agent: Agent, eval_envs: gym.vector.VectorEnv, episodes: int, seed: int, round_: int) -> dict:
    """Mean undiscounted return of `episodes` episodes of the *stochastic* policy (as the paper).

    Env i of the vector env plays a fixed quota of episodes (no bias towards short episodes). The env seeds and the
    action-sampling generator derive from (seed, round_) only, so evaluation never perturbs training and a resumed
    run evaluates identically."""
    E = eval_envs.num_envs
    quota = np.array([episodes // E + (i < episodes % E) for i in range(E)])
    rng = np.random.default_rng(_derived_seed(seed, round_, 0xE7A1))
    policy = agent.numpy_policy()
    base = _derived_seed(seed, round_, 0x5EED) % (2**31 - E)
    obs, _ = eval_envs.reset(seed=[base + i for i in range(E)])
    first = getattr(eval_envs, "envs", [None])[0]  # SyncVectorEnv's own spec is None
    env_id = (first.spec.id if first is not None and first.spec is not None else "env") + " (evaluation)"
    step = 0
    _check_finite(obs, "observation", env_id, step)
    done_count = np.zeros(E, dtype=np.int64)
    ep_ret = np.zeros(E)
    ep_len = np.zeros(E, dtype=np.int64)
    returns, lengths = [], []
    continuous = agent.continuous
    if continuous:
        low, high = eval_envs.single_action_space.low, eval_envs.single_action_space.high
    while (done_count < quota).any():
        action = agent.sample_actions(obs, rng, policy)
        a = np.clip(action, low, high) if continuous else action
        obs, reward, terminated, truncated, _ = eval_envs.step(a)
        step += 1
        _check_finite(reward, "reward", env_id, step)
        _check_finite(obs, "observation", env_id, step)
        ep_ret += reward
        ep_len += 1
        if ep_len.max() > EVAL_EPISODE_CAP:
            raise ValueError(f"{env_id}: an evaluation episode ran {EVAL_EPISODE_CAP:,} steps without ending (the env "
                             "has no time limit); pass --env-kwargs '{\"max_episode_steps\": 1000}' (or another cap)")
        for i in np.nonzero(terminated | truncated)[0]:
            if done_count[i] < quota[i]:
                returns.append(ep_ret[i])
                lengths.append(ep_len[i])
                done_count[i] += 1
            ep_ret[i], ep_len[i] = 0.0, 0
    returns = np.asarray(returns, dtype=np.float64)
    return {"eval_return": float(returns.mean()), "eval_return_std": float(returns.std()),
            "eval_length": float(np.mean(lengths)), "eval_episodes": int(len(returns))}


# ----------------------------------------------------------------------------------------------------------------------
# Run dir, checkpoints
# ----------------------------------------------------------------------------------------------------------------------
class RunDirError(ValueError):
    """The run dir holds something else (another run, or files fastattr did not write)."""


def semantic_args(args: Args) -> dict:
    return {k: v for k, v in asdict(args).items() if k not in NON_SEMANTIC}


def recorded_args(run_dir) -> dict:
    """A run's args.json, with the default filled in for every option added after that run started (absent from
    its args.json: it ran with the option's default)."""
    theirs = json.loads((Path(run_dir) / "args.json").read_text())
    defaults = {f.name: f.default_factory() if f.default is MISSING else f.default
                for f in fields(Args) if f.name not in NON_SEMANTIC}
    return {**{k: v for k, v in defaults.items() if k not in theirs}, **theirs}


def args_differences(recorded: dict, now: dict) -> str:
    """'' when two semantic-args dicts agree, else 'name: X there vs Y now, ...'."""
    keys = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
    return ", ".join(f"{k}: {recorded.get(k)!r} there vs {now.get(k)!r} now" for k in keys)


def checkpoint_path(run_dir) -> Path:
    return Path(run_dir) / "checkpoints" / "latest.pt"


def theta_path(run_dir, k: int) -> Path:
    """theta(k), the parameters that collected and scored B(k) (saved with --save-attribution)."""
    return Path(run_dir) / "checkpoints" / f"theta_{k:05d}.pt"


def prepare_run_dir(args: Args) -> tuple[Path, dict | None]:
    """Creates or checks the run dir and locks it for this process (see `lock_run_dir`). Returns (path, checkpoint or
    None). Never overwrites another run."""
    run_dir = Path(args.run_dir)
    args_file = run_dir / "args.json"
    mine = semantic_args(args)
    if not args_file.exists():
        if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
            raise RunDirError(f"run dir {run_dir} is not empty and holds no fastattr run (no args.json); choose "
                              "another --run-dir. Nothing was changed.")
        run_dir.mkdir(parents=True, exist_ok=True)
    lock_run_dir(run_dir)  # before reading or writing anything in it: a second process stops here
    if args_file.exists():
        diff = args_differences(recorded_args(run_dir), mine)
        if diff and not _holds_results(run_dir):  # stopped before its first round (e.g. a bad env setting)
            print(f"run dir {run_dir}: its run stopped before finishing a round ({diff}); starting over with the new "
                  "arguments", file=sys.stderr)
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            _atomic_write_text(args_file, json.dumps(mine, indent=2, sort_keys=True) + "\n")
            return run_dir, None
        if diff:
            raise RunDirError(f"run dir {run_dir} holds another run ({diff}); choose another --run-dir, or pass "
                              "the same arguments to --resume it. Nothing was changed.")
        if not args.resume:
            raise RunDirError(f"run dir {run_dir} already holds this run; pass --resume to continue it, or choose "
                              "another --run-dir. Nothing was changed.")
        ckpt_file = checkpoint_path(run_dir)
        ckpt = load_checkpoint(ckpt_file) if ckpt_file.exists() else None
        return run_dir, ckpt
    _atomic_write_text(args_file, json.dumps(mine, indent=2, sort_keys=True) + "\n")
    return run_dir, None


LOCK_FILE = ".lock"
_held_locks: dict[str, object] = {}  # resolved run dir -> the open lock file this process holds


def _holds_results(run_dir: Path) -> bool:
    """Anything beyond args.json and the round-0 evaluation (a checkpoint, saved attribution, ...)."""
    return any(p.is_file() and p.name not in (LOCK_FILE, "args.json", "metrics.jsonl") for p in run_dir.rglob("*"))


def lock_run_dir(run_dir: Path) -> None:
    """Takes an exclusive flock on <run-dir>/.lock for the rest of this run, so that a second process (a `--resume`
    or a `fastattr compare` started while the first still runs) stops with an error instead of writing into the same
    run dir. The kernel drops the lock when the process ends, killed or not: nothing stale is left to clean up."""
    key = str(run_dir.resolve())
    if key in _held_locks:
        return
    f = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise RunDirError(f"run dir {run_dir} is in use by another fastattr process (pid {holder}); wait for it to "
                          "finish, or stop it and pass --resume. Nothing was changed.") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held_locks[key] = f


def release_run_dir(run_dir) -> None:
    """Drops this process's lock on run_dir (`main` does it when the run ends or fails)."""
    f = _held_locks.pop(str(Path(run_dir).resolve()), None)
    if f is not None:
        f.close()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    """torch.load(weights_only=True): checkpoints hold only tensors and plain Python types."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RunDirError(f"{path} has checkpoint format {ckpt.get('format')}, this fastattr reads {CHECKPOINT_FORMAT}")
    return ckpt


def _np_state(rng: np.random.Generator) -> str:
    return json.dumps(rng.bit_generator.state)


def save_checkpoint(path: Path, *, round_: int, agent: Agent, optimizer, generator: torch.Generator,
                    filter_rng: np.random.Generator, envs: gym.vector.SyncVectorEnv, state: RolloutState,
                    totals: dict, finished: bool = False) -> None:
    """Everything a bit-identical resume needs: weights, optimiser, every RNG (torch global and ours, numpy global and
    ours, python), the rollout state and each training env's replay record (see envs.ReplayableEnv)."""
    np_global = np.random.get_state()
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "round": round_,
        "finished": finished,
        "agent": agent.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {
            "torch_global": torch.get_rng_state(),
            "train": generator.get_state(),
            "actions": _np_state(state.rng),
            "filter": _np_state(filter_rng),
            "numpy_global": [np_global[0], torch.from_numpy(np_global[1].astype(np.int64)), *map(float, np_global[2:])],
            "python": random.getstate(),
        },
        "rollout": {
            "next_obs": torch.as_tensor(np.asarray(state.next_obs)),
            "ep_return": torch.as_tensor(state.ep_return),
            "ep_length": torch.as_tensor(state.ep_length),
            "global_step": state.global_step,
            "episode_start": [list(e.episode_start) for e in envs.envs],
            "episode_actions": [torch.as_tensor(np.array(e.episode_actions)) for e in envs.envs],
        },
        "totals": dict(totals),
    }
    atomic_torch_save(ckpt, path)


def restore_checkpoint(ckpt: dict, agent: Agent, optimizer, generator: torch.Generator,
                       envs: gym.vector.SyncVectorEnv, env_id: str) -> tuple[np.random.Generator, RolloutState]:
    agent.load_state_dict(ckpt["agent"])
    optimizer.load_state_dict(ckpt["optimizer"])
    rng = ckpt["rng"]
    torch.set_rng_state(rng["torch_global"])
    generator.set_state(rng["train"])
    filter_rng = np.random.default_rng()
    filter_rng.bit_generator.state = json.loads(rng["filter"])
    ro = ckpt["rollout"]
    saved_obs = ro["next_obs"].numpy()
    for i, env in enumerate(envs.envs):
        start = tuple(ro["episode_start"][i])
        acts = ro["episode_actions"][i]
        obs = env.replay(start, [a.numpy() for a in acts] if acts.numel() else [])
        if not np.array_equal(np.asarray(obs), saved_obs[i]):
            warnings.warn(f"{env_id}: training env {i} could not be rebuilt exactly from its replay record (its "
                          "randomness is not all in np_random); the resumed run continues from the saved observation "
                          "but will not be bit-identical to an uninterrupted one", RuntimeWarning, stacklevel=2)
    # the global RNGs last: an env drawing from them during the replay must not move them
    ng = rng["numpy_global"]
    np.random.set_state((ng[0], ng[1].numpy().astype(np.uint32), int(ng[2]), int(ng[3]), float(ng[4])))
    random.setstate(_as_tuple(rng["python"]))
    action_rng = np.random.default_rng()
    action_rng.bit_generator.state = json.loads(rng["actions"])
    state = RolloutState(saved_obs, ro["ep_return"].numpy().copy(), ro["ep_length"].numpy().copy(), action_rng,
                         int(ro["global_step"]))
    return filter_rng, state


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _truncate_metrics(path: Path, last_round: int) -> None:
    """Drops metrics lines past the checkpoint (a run killed between the log line and the checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a half-written last line
        if rec.get("round", -1) <= last_round:
            keep.append(line)
    _atomic_write_text(path, "".join(line + "\n" for line in keep))


def _append_jsonl(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    """Trains one run; returns the last metrics line plus `run_dir`. See the module docstring for a round."""
    args = validate_args(args)
    try:
        with torch_threads(1):
            return _main(args)
    finally:
        release_run_dir(args.run_dir)


def _main(args: Args) -> dict:

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(_derived_seed(args.seed, 0x7A1))   # minibatch order
    filter_rng = np.random.default_rng(_derived_seed(args.seed, 0xF11))          # the random-drop control only

    # envs and agent before the run dir: an unsupported env never leaves a half-made run dir behind
    envs = envs_lib.make_vector_env(args.env_id, args.num_envs, args.env_kwargs)
    agent = Agent(envs.single_observation_space, envs.single_action_space, args.network, args.hidden,
                  args.features_dim)
    optimizer = make_optimizer(agent, args)
    run_dir, ckpt = prepare_run_dir(args)
    if ckpt is not None and ckpt.get("finished"):
        envs.close()
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        return {**(rows[-1] if rows else {}), "run_dir": str(run_dir), "already_finished": True}
    n_eval_envs = min(args.eval_episodes, args.eval_envs or 100)
    eval_envs = (gym.vector.SyncVectorEnv([envs_lib.make_env(args.env_id, args.env_kwargs)] * n_eval_envs,
                                          autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
                 if args.eval_episodes > 0 else None)
    per_round = args.n_steps * args.num_envs
    num_rounds = args.total_timesteps // per_round
    metrics_file = run_dir / "metrics.jsonl"

    obs0, _ = envs.reset(seed=train_env_seeds(args))
    totals = {"wall_seconds": 0.0}
    if ckpt is None:
        state = RolloutState(obs0, np.zeros(args.num_envs), np.zeros(args.num_envs, dtype=np.int64),
                             np.random.default_rng(_derived_seed(args.seed, 0xAC7)))  # the rollout's actions
        start_round = 0
        if metrics_file.exists():
            metrics_file.unlink()  # killed before its first checkpoint: start over
        rec = {"round": 0, "global_step": 0, "kept_fraction": None, "eval_return": None}
        t0 = time.perf_counter()
        if eval_envs is not None:
            rec.update(evaluate(agent, eval_envs, args.eval_episodes, args.seed, 0))
        rec["eval_seconds"] = time.perf_counter() - t0
        rec.update(rollout_seconds=0.0, attr_seconds=0.0, update_seconds=0.0, train_seconds=0.0,
                   wall_seconds=rec["eval_seconds"], time=time.time())
        totals["wall_seconds"] = rec["wall_seconds"]
        _append_jsonl(metrics_file, rec)
        save_checkpoint(checkpoint_path(run_dir), round_=0, agent=agent, optimizer=optimizer, generator=generator,
                        filter_rng=filter_rng, envs=envs, state=state, totals=totals)
    else:
        filter_rng, state = restore_checkpoint(ckpt, agent, optimizer, generator, envs, args.env_id)
        start_round = int(ckpt["round"])
        totals.update(ckpt["totals"])
        _truncate_metrics(metrics_file, start_round)

    from tqdm.auto import tqdm

    bar = tqdm(total=num_rounds, initial=start_round, desc=f"{args.env_id} {args.method} s{args.seed}",
               unit="round", disable=not args.progress, dynamic_ncols=True)
    rec = {}
    need_scores = args.method != "ppo" or args.save_attribution
    for r in range(start_round + 1, num_rounds + 1):
        k = r - 1  # the paper's round index: theta(k) collects and scores B(k), the update yields theta(k+1)
        t_round = time.perf_counter()
        # ALGO LOGIC: rollout with theta(k)
        t0 = time.perf_counter()
        if args.env_stream == "reseed" and r > 1:  # the official code: a fresh, identically seeded env each round
            state.next_obs, _ = envs.reset(seed=train_env_seeds(args))
            state.ep_return[:], state.ep_length[:] = 0, 0
        buf, episodes = collect_rollout(envs, agent, state, args)
        compute_gae(buf, args.gamma, args.gae_lambda)
        rollout_seconds = time.perf_counter() - t0

        # FASTATTR: score every record at theta(k) against the return target, then choose the records to keep
        t0 = time.perf_counter()
        order1 = torch.randperm(buf.n, generator=generator)  # epoch-1 minibatch order, drawn before scoring
        scores = keep = adv_norm = None
        fallback = False
        if need_scores:
            with torch_threads(args.threads):
                sel = iif.select(agent, lambda m: m.log_prob(buf.obs, buf.actions), buf.advantages,
                                 method=args.method, p=args.p, batch_size=args.batch_size, order=order1,
                                 adv_norm=args.score_adv_norm, params=Agent.is_actor_param, rng=filter_rng)
            scores, keep, adv_norm, fallback = sel.scores, sel.keep, sel.adv_record, sel.fallback
        attr_seconds = time.perf_counter() - t0
        probe_saved = {}
        if args.save_attribution and args.probe:  # action targets at theta(k), before the update (issue 6)
            from .behaviour import probe_scores

            with torch_threads(args.threads):
                probe_saved = probe_scores(agent, buf, adv_norm, args.probe, args.probe_targets, args.env_id)

        # ALGO LOGIC: the normal PPO epochs on the kept records, from theta(k)
        if args.save_attribution:
            t_io = time.perf_counter()
            atomic_torch_save({"round": k, "agent": agent.state_dict(), "optimizer": optimizer.state_dict()},
                              theta_path(run_dir, k))
            io_seconds = time.perf_counter() - t_io
        else:
            io_seconds = 0.0
        t0 = time.perf_counter()
        upd = ppo_update(agent, optimizer, buf, keep, args, generator, epoch1_order=order1)
        update_seconds = time.perf_counter() - t0
        if not all(torch.isfinite(p).all() for p in agent.parameters()):
            raise FloatingPointError(
                f"training diverged in round {r}: non-finite parameters after the update. {run_dir} keeps the last "
                "good round; lower --learning-rate or pass --clip-grad."
            )
        train_seconds = time.perf_counter() - t_round - io_seconds

        if args.save_attribution:
            t_io = time.perf_counter()
            from . import store

            store.save_round(
                run_dir, k, obs=buf.obs, actions=buf.actions, rewards=buf.rewards, dones=buf.dones,
                terminated=buf.terminated, bootstrap=buf.bootstrap, values=buf.values, logp=buf.logp,
                adv_gae=buf.advantages, returns=buf.returns, returns_mc=discounted_returns(buf, args.gamma),
                adv_norm=adv_norm, score_return=scores, keep=keep, order_epoch1=order1,
                next_value=buf.next_value, num_envs=np.array(buf.num_envs), **probe_saved,
            )
            io_seconds += time.perf_counter() - t_io

        # evaluation of theta(k+1) = theta(r)
        rec = {"round": r, "attr_round": k, "global_step": state.global_step}
        t0 = time.perf_counter()
        if eval_envs is not None and (r % args.eval_every == 0 or r == num_rounds):
            rec.update(evaluate(agent, eval_envs, args.eval_episodes, args.seed, r))
        else:
            rec["eval_return"] = None
        eval_seconds = time.perf_counter() - t0

        n_kept = int(keep.sum()) if keep is not None else buf.n
        rec.update(
            kept_fraction=n_kept / buf.n, n_kept=n_kept, filter_fallback=fallback,
            train_return=float(np.mean([e[0] for e in episodes])) if episodes else None,
            train_episodes=len(episodes),
            neg_fraction=float((scores < 0).float().mean()) if scores is not None else None,
            score_mean=float(scores.mean()) if scores is not None else None,
            score_std=float(scores.std()) if scores is not None else None,
            **upd,
            rollout_seconds=rollout_seconds, attr_seconds=attr_seconds, update_seconds=update_seconds,
            train_seconds=train_seconds, eval_seconds=eval_seconds, io_seconds=io_seconds,
            sps=per_round / max(train_seconds, 1e-9),
        )
        totals["wall_seconds"] += time.perf_counter() - t_round
        rec.update(wall_seconds=totals["wall_seconds"], time=time.time())
        # metrics line first, then the checkpoint: a kill in between re-runs round r identically on --resume
        _append_jsonl(metrics_file, rec)
        save_checkpoint(checkpoint_path(run_dir), round_=r, agent=agent, optimizer=optimizer, generator=generator,
                        filter_rng=filter_rng, envs=envs, state=state, totals=totals, finished=(r == num_rounds))
        bar.update(1)
        bar.set_postfix(sps=f"{rec['sps']:.0f}", ret=(f"{rec['eval_return']:.3g}" if rec["eval_return"] is not None
                                                    else "-"), kept=f"{rec['kept_fraction']:.2f}")
    bar.close()
    envs.close()
    if eval_envs is not None:
        eval_envs.close()
    return {**rec, "run_dir": str(run_dir)}
