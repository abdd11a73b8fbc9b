"""PPO / IIF speed on the paper's LunarLander configuration (SGD 5e-3, n_steps 2048, 1 env, minibatch 64, 10 epochs).

1. Attribution share: seconds of scoring + filtering in an IIF round over the round's training wall-clock (rollout,
   GAE, attribution, update; evaluation excluded). Goal <= 10%; the paper reports 0.13 s of influence computation
   per LunarLander round (Table 5).
2. Loop speed, measured side by side in one process (implementations interleaved, repeated): fastattr.ppo (method
   ppo and iif) vs a minimal CleanRL-style loop (torch.distributions, nn.Module calls, the same config) vs
   Stable-Baselines3 PPO (if installed: .venv/bin/pip install stable-baselines3), and fastattr ppo with the torch
   autograd step instead of the numpy SGD step (update_backend torch vs auto). Each ratio is paired within a
   repetition (median round of each implementation over fastattr ppo's), reported as median [min, max] over reps.
   Goal: >= the CleanRL-style loop, >= 3x SB3. SB3 clips gradients at 0.5 (its default; the paper's patched copy
   does not), a negligible cost here. FASTATTR_STRICT=1: a missing kernel stops the run instead of timing the
   fallback.

    python benchmarks/bench_ppo.py [--rounds 3] [--reps 3]
One torch thread everywhere (as fastattr.ppo runs its passes). Appends a JSON line to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

os.environ["FASTATTR_STRICT"] = "1"  # a missing kernel fails instead of timing the pure-torch fallback

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn

from fastattr import envs as envs_lib  # noqa: E402
from fastattr import filtering, ops  # noqa: E402
from fastattr.info import provenance  # noqa: E402
from fastattr.rl.agent import Agent, make_optimizer
from fastattr.rl.config import Args, paper_overrides, validate_args
from fastattr.rl.rollout import RolloutState, collect_rollout, compute_gae
from fastattr.targets import normalize_advantages
from fastattr.rl.update import ppo_update

ENV_ID = "LunarLander-v3"


def paper_args(method: str, update_backend: str = "auto") -> Args:
    return validate_args(Args(**{**paper_overrides(ENV_ID), "env_id": ENV_ID, "method": method,
                                 "update_backend": update_backend, "eval_episodes": 0, "run_dir": "/tmp/unused",
                                 "progress": False}))


# ----------------------------------------------------------------------------------------------------------------------
# fastattr.ppo, composed from its round pieces exactly as ppo.main does (minus evaluation and checkpoints)
# ----------------------------------------------------------------------------------------------------------------------
class Ours:
    def __init__(self, method: str, seed: int = 0, update_backend: str = "auto"):
        self.args = args = paper_args(method, update_backend)
        torch.manual_seed(seed)
        self.envs = envs_lib.make_vector_env(ENV_ID, 1)
        self.agent = Agent(self.envs.single_observation_space, self.envs.single_action_space)
        self.opt = make_optimizer(self.agent, args)
        self.gen = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        obs, _ = self.envs.reset(seed=seed)
        self.state = RolloutState(obs, np.zeros(1), np.zeros(1, dtype=np.int64), np.random.default_rng(seed))

    def round(self) -> dict:
        a, t = self.args, {}
        t0 = time.perf_counter()
        buf, _ = collect_rollout(self.envs, self.agent, self.state, a)
        compute_gae(buf, a.gamma, a.gae_lambda)
        t["rollout"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        order = torch.randperm(buf.n, generator=self.gen)
        keep = None
        if a.method != "ppo":
            adv = normalize_advantages(buf.advantages, order, a.batch_size, a.score_adv_norm)
            t1 = time.perf_counter()
            scores = self.agent.return_scores(buf.obs, buf.actions, adv, buf.advantages)
            t["score"] = time.perf_counter() - t1
            keep = filtering.keep_mask(a.method, scores, a.p, self.rng)
            t["kept"] = float(keep.float().mean())
        t["attr"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ppo_update(self.agent, self.opt, buf, keep, a, self.gen, epoch1_order=order)
        t["update"] = time.perf_counter() - t0
        t["total"] = t["rollout"] + t["attr"] + t["update"]
        return t


# ----------------------------------------------------------------------------------------------------------------------
# A minimal CleanRL-style loop (cleanrl/ppo.py's structure) at the same configuration
# ----------------------------------------------------------------------------------------------------------------------
def layer_init(layer, std=math.sqrt(2), bias_const=0.0):
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class CleanAgent(nn.Module):
    def __init__(self, n_obs, n_act):
        super().__init__()
        self.critic = nn.Sequential(layer_init(nn.Linear(n_obs, 64)), nn.Tanh(), layer_init(nn.Linear(64, 64)),
                                    nn.Tanh(), layer_init(nn.Linear(64, 1), std=1.0))
        self.actor = nn.Sequential(layer_init(nn.Linear(n_obs, 64)), nn.Tanh(), layer_init(nn.Linear(64, 64)),
                                   nn.Tanh(), layer_init(nn.Linear(64, n_act), std=0.01))

    def get_value(self, x):
        return self.critic(x)

    def get_action_and_value(self, x, action=None):
        probs = torch.distributions.Categorical(logits=self.actor(x))
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.critic(x)


class CleanRL:
    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        np.random.seed(seed)
        self.envs = gym.vector.SyncVectorEnv([lambda: gym.make(ENV_ID)],
                                             autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
        self.agent = CleanAgent(8, 4)
        self.opt = torch.optim.SGD(self.agent.parameters(), lr=5e-3)
        obs, _ = self.envs.reset(seed=seed)
        self.next_obs, self.next_done = torch.Tensor(obs), torch.zeros(1)

    def round(self) -> dict:
        T, gamma, lam, bs, clip = 2048, 0.99, 0.95, 64, 0.2
        obs = torch.zeros((T, 1, 8))
        actions, logprobs, rewards, dones, values = (torch.zeros((T, 1)) for _ in range(5))
        t0 = time.perf_counter()
        for step in range(T):
            obs[step], dones[step] = self.next_obs, self.next_done
            with torch.no_grad():
                action, logprob, _, value = self.agent.get_action_and_value(self.next_obs)
                values[step] = value.flatten()
            actions[step], logprobs[step] = action, logprob
            next_obs, reward, term, trunc, _ = self.envs.step(action.cpu().numpy())
            rewards[step] = torch.tensor(reward).view(-1)
            self.next_obs, self.next_done = torch.Tensor(next_obs), torch.Tensor(np.logical_or(term, trunc))
        with torch.no_grad():
            next_value = self.agent.get_value(self.next_obs).reshape(1, -1)
            advantages = torch.zeros_like(rewards)
            lastgaelam = 0
            for t in reversed(range(T)):
                if t == T - 1:
                    nextnonterminal, nextvalues = 1.0 - self.next_done, next_value
                else:
                    nextnonterminal, nextvalues = 1.0 - dones[t + 1], values[t + 1]
                delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
                advantages[t] = lastgaelam = delta + gamma * lam * nextnonterminal * lastgaelam
            returns = advantages + values
        rollout = time.perf_counter() - t0
        t0 = time.perf_counter()
        b_obs, b_logprobs, b_actions = obs.reshape(-1, 8), logprobs.reshape(-1), actions.reshape(-1)
        b_adv, b_ret = advantages.reshape(-1), returns.reshape(-1)
        b_inds = np.arange(T)
        for _ in range(10):
            np.random.shuffle(b_inds)
            for start in range(0, T, bs):
                mb = b_inds[start:start + bs]
                _, newlogprob, entropy, newvalue = self.agent.get_action_and_value(b_obs[mb], b_actions.long()[mb])
                ratio = (newlogprob - b_logprobs[mb]).exp()
                mb_adv = (b_adv[mb] - b_adv[mb].mean()) / (b_adv[mb].std() + 1e-8)
                pg_loss = torch.max(-mb_adv * ratio, -mb_adv * torch.clamp(ratio, 1 - clip, 1 + clip)).mean()
                v_loss = ((newvalue.view(-1) - b_ret[mb]) ** 2).mean()
                loss = pg_loss + 0.5 * v_loss
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
        update = time.perf_counter() - t0
        return {"rollout": rollout, "attr": 0.0, "update": update, "total": rollout + update}


# ----------------------------------------------------------------------------------------------------------------------
# Stable-Baselines3
# ----------------------------------------------------------------------------------------------------------------------
class SB3:
    def __init__(self, seed: int = 0):
        from stable_baselines3 import PPO
        from stable_baselines3.common.callbacks import BaseCallback

        times = self.times = {}

        class Split(BaseCallback):
            def _on_rollout_start(self):
                times["t0"] = time.perf_counter()

            def _on_rollout_end(self):
                times["rollout"] = time.perf_counter() - times["t0"]
                times["t1"] = time.perf_counter()

            def _on_step(self):
                return True

        self.cb = Split()
        self.model = PPO("MlpPolicy", ENV_ID, n_steps=2048, batch_size=64, n_epochs=10, learning_rate=5e-3,
                         gamma=0.99, gae_lambda=0.95, clip_range=0.2, ent_coef=0.0, vf_coef=0.5, device="cpu",
                         seed=seed, verbose=0, policy_kwargs=dict(optimizer_class=torch.optim.SGD))

    def round(self) -> dict:
        t0 = time.perf_counter()
        self.model.learn(2048, callback=self.cb, reset_num_timesteps=False)
        total = time.perf_counter() - t0
        return {"rollout": self.times["rollout"], "attr": 0.0, "update": total - self.times["rollout"], "total": total}


# ----------------------------------------------------------------------------------------------------------------------
def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per implementation and repetition")
    p.add_argument("--reps", type=int, default=3, help="repetitions (implementations interleaved)")
    p.add_argument("--no-sb3", action="store_true")
    opts = p.parse_args()
    torch.set_num_threads(1)
    if not ops.has_kernel("grad_dot", "cpu"):  # the op the PPO loop's scoring calls
        raise SystemExit("fastattr CPU kernel grad_dot is not built (make build): not timing the fallback")

    impls = {"fastattr ppo": lambda: Ours("ppo"), "fastattr iif": lambda: Ours("iif"),
             "ppo torch-step": lambda: Ours("ppo", update_backend="torch"), "cleanrl-style": CleanRL}
    if not opts.no_sb3:
        try:
            import stable_baselines3  # noqa: F401

            impls["sb3"] = SB3
        except ImportError:
            print("stable-baselines3 not installed (.venv/bin/pip install stable-baselines3): skipping the SB3 row")
    runners = {name: make() for name, make in impls.items()}
    for r in runners.values():  # warm-up round (first-call overheads, env construction)
        r.round()
    per_round: dict[str, list[dict]] = {name: [] for name in runners}
    rep_ratios: dict[str, list[float]] = {name: [] for name in runners}  # paired: the same rep's fastattr ppo
    for rep in range(opts.reps):
        rep_total = {}
        for name, r in runners.items():
            rounds = [r.round() for _ in range(opts.rounds)]
            per_round[name] += rounds
            rep_total[name] = statistics.median(t["total"] for t in rounds)
        for name in runners:
            rep_ratios[name].append(rep_total[name] / rep_total["fastattr ppo"])
        print(f"rep {rep + 1}/{opts.reps} done", flush=True)

    med = {name: {k: statistics.median(t[k] for t in ts) for k in ts[0]} for name, ts in per_round.items()}
    print(f"\n{ENV_ID}, paper config, 1 thread, median of {opts.rounds * opts.reps} rounds per implementation")
    print(f"{'impl':<16}{'round s':>9}{'rollout s':>11}{'attr s':>9}{'update s':>10}{'SPS':>8}{'vs ours':>9}")
    base = med["fastattr ppo"]["total"]
    for name, m in med.items():
        print(f"{name:<16}{m['total']:>9.3f}{m['rollout']:>11.3f}{m['attr']:>9.4f}{m['update']:>10.3f}"
              f"{2048 / m['total']:>8.0f}{m['total'] / base:>8.2f}x")
    iif = med["fastattr iif"]
    share = spread([t["attr"] / t["total"] for t in per_round["fastattr iif"]])  # per round, then the median
    print(f"\nattribution share of an IIF round: median {100 * share['median']:.2f}% (min {100 * share['min']:.2f}%, "
          f"max {100 * share['max']:.2f}%, {share['n']} rounds; {iif['attr']:.4f} s of {iif['total']:.3f} s) "
          f"(goal <= 10%; scoring alone {iif['score']:.4f} s; the paper: 0.13 s per round, Table 5; "
          f"kept {100 * iif['kept']:.1f}% of the records)")
    step = spread([t / n for t, n in zip(rep_ratios["ppo torch-step"], rep_ratios["fastattr ppo"])])
    print(f"numpy SGD step: a round with the torch step takes {step['median']:.2f}x [{step['min']:.2f}, "
          f"{step['max']:.2f}] a round with the numpy step (update alone: "
          f"{med['ppo torch-step']['update'] / med['fastattr ppo']['update']:.2f}x; the numpy step is kept at >= 1.5x)")
    ratios = {f"{name}/ours": spread(r) for name, r in rep_ratios.items()}
    print("ratios, seconds per round over fastattr ppo's in the same rep (median [min, max] over reps): "
          + ", ".join(f"{k} {v['median']:.2f} [{v['min']:.2f}, {v['max']:.2f}]" for k, v in ratios.items()))
    rec = {"bench": "bench_ppo", "env": ENV_ID, **provenance(), "cpus": os.cpu_count(), "rounds": opts.rounds,
           "reps": opts.reps, "median": med, "attr_share": share, "ratios": ratios}
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    with open(out / "bench_ppo.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"appended to {out / 'bench_ppo.jsonl'}")


if __name__ == "__main__":
    main()
