"""Collecting a round's buffer with the current policy, GAE, Monte Carlo returns, and evaluation."""
from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from .. import analysis
from .. import envs as envs_lib
from .agent import Agent
from .config import Args, derived_seed


@dataclass
class RolloutState:
    """What carries over between rounds in the training envs (episodes continue across rounds, as in SB3)."""

    next_obs: np.ndarray
    ep_return: np.ndarray
    ep_length: np.ndarray
    rng: np.random.Generator
    """draws the rollout's actions"""
    global_step: int = 0
    episodes: np.ndarray | None = None
    """[num_envs] episodes started so far per env (which episodes --reward-noise corrupts derives from it)"""


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


def check_finite(x: np.ndarray, what: str, env_id: str, step: int) -> None:
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
    if state.episodes is None:
        state.episodes = np.zeros(E, dtype=np.int64)
    flip = corrupted_sign(args, state.episodes) if args.reward_noise > 0 else None  # -1: this episode is corrupted
    for t in range(T):
        obs_buf[t] = next_obs
        a_np = agent.sample_actions(next_obs, state.rng, policy)
        act_buf[t] = a_np
        # Gaussian actions are clipped for the env only; the buffer keeps the sample (SB3)
        next_obs, reward, terminated, truncated, info = envs.step(np.clip(a_np, low, high) if agent.continuous
                                                                  else a_np)
        state.global_step += E
        if not (np.isfinite(reward).all() and np.isfinite(next_obs).all()):
            check_finite(reward, "reward", args.env_id, state.global_step)
            check_finite(next_obs, "observation", args.env_id, state.global_step)
        done = terminated | truncated
        rew_buf[t] = reward if flip is None else reward * flip
        done_buf[t], term_buf[t] = done, terminated
        state.ep_return += reward
        state.ep_length += 1
        if done.any():
            # A time-limit cut is not a real end: bootstrap with V(final obs) like SB3 (CleanRL does not)
            trunc_idx = np.nonzero(truncated & ~terminated)[0]
            if len(trunc_idx):
                final = np.stack([info["final_obs"][i] for i in trunc_idx]).astype(np.float32)
                check_finite(final, "final observation", args.env_id, state.global_step)
                boot_buf[t, trunc_idx] = args.gamma * agent.value(torch.from_numpy(final)).numpy()
            if flip is not None:
                state.episodes[done] += 1
                flip = corrupted_sign(args, state.episodes)
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


def corrupted_sign(args: Args, episodes: np.ndarray) -> np.ndarray:
    """[num_envs] -1 where the env's current episode is one of the --reward-noise fraction whose rewards the agent
    sees sign-flipped, else +1; a fixed function of (seed, env, episode index), so resumes and reruns agree."""
    u = np.array([derived_seed(args.seed, 0xBAD, i, int(k)) / 2**32 for i, k in enumerate(episodes)])
    return np.where(u < args.reward_noise, -1.0, 1.0).astype(np.float32)


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
    """Monte Carlo discounted return-to-go within each episode [N] (analysis.discounted_returns on the buffer): cut at
    episode ends, bootstrapped with V(final obs) at time-limit truncations (in the rewards) and with V(next obs) at
    the end of the buffer."""
    E = buf.num_envs
    T = buf.n // E
    r = (buf.rewards + buf.bootstrap).reshape(T, E).numpy().astype(np.float64)
    ends = buf.dones.reshape(T, E).numpy().astype(bool)
    g = analysis.discounted_returns(r, ends, gamma, bootstrap=buf.next_value.numpy().astype(np.float64))
    return torch.from_numpy(g.reshape(-1).astype(np.float32))



def make_eval_envs(args: Args) -> gym.vector.SyncVectorEnv | None:
    """The evaluation envs (min(eval_episodes, eval_envs or 100) of them), or None without evaluation."""
    if args.eval_episodes <= 0:
        return None
    n = min(args.eval_episodes, args.eval_envs or 100)
    return gym.vector.SyncVectorEnv([envs_lib.make_env(args.env_id, args.env_kwargs)] * n,
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


EVAL_EPISODE_CAP = 100_000  # steps; an env without a time limit could otherwise evaluate forever


@torch.no_grad()
def evaluate(agent: Agent, eval_envs: gym.vector.VectorEnv, episodes: int, seed: int, round_: int) -> dict:
    """Mean undiscounted return of `episodes` episodes of the *stochastic* policy (as the paper).

    Env i of the vector env plays a fixed quota of episodes (no bias towards short episodes). The env seeds and the
    action-sampling generator derive from (seed, round_) only, so evaluation never perturbs training and a resumed
    run evaluates identically."""
    E = eval_envs.num_envs
    quota = np.array([episodes // E + (i < episodes % E) for i in range(E)])
    rng = np.random.default_rng(derived_seed(seed, round_, 0xE7A1))
    policy = agent.numpy_policy()
    base = derived_seed(seed, round_, 0x5EED) % (2**31 - E)
    obs, _ = eval_envs.reset(seed=[base + i for i in range(E)])
    first = getattr(eval_envs, "envs", [None])[0]  # SyncVectorEnv's own spec is None
    env_id = (first.spec.id if first is not None and first.spec is not None else "env") + " (evaluation)"
    step = 0
    check_finite(obs, "observation", env_id, step)
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
        check_finite(reward, "reward", env_id, step)
        check_finite(obs, "observation", env_id, step)
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

