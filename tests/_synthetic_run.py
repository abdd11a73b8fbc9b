"""A synthetic FrozenLake run dir built with fastattr.store.save_round (no training), for the application tests.

Records are real FrozenLake 4x4 (non-slippery) transitions of a biased random walk; Monte Carlo returns are exact.
The GAE advantage is the Monte Carlo advantage with its sign flipped on a known subset ("bad estimates"), and the score
is built so that flipped records are harmful: score = Ā·Â·(1 + noise). So Spearman(score, Ā·Â) is strongly positive
by construction and the bottom records are the flipped ones.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fastattr import analysis, store

MAP = ["SFFF", "FHFH", "FFFH", "HFFG"]
MOVES = {0: (0, -1), 1: (1, 0), 2: (0, 1), 3: (-1, 0)}


def frozenlake_rollout(n: int, rng: np.random.Generator):
    s, states, actions, rewards, ends = 0, [], [], [], []
    for t in range(n):
        a = int(rng.choice(4, p=[0.1, 0.4, 0.4, 0.1]))
        r, c = divmod(s, 4)
        dr, dc = MOVES[a]
        r, c = min(max(r + dr, 0), 3), min(max(c + dc, 0), 3)
        s2 = r * 4 + c
        cell = MAP[r][c]
        done = cell in "HG" or t == n - 1 and False
        states.append(s), actions.append(a), rewards.append(1.0 if cell == "G" else 0.0), ends.append(done)
        s = 0 if done else s2
    return np.array(states), np.array(actions), np.array(rewards), np.array(ends)


def make_run(path, rounds=(0, 1, 2), n: int = 512, seed: int = 0, with_metrics: bool = True,
             action_scores: bool = False) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "args.json").write_text(json.dumps({"env_id": "FrozenLake-v1", "seed": seed, "num_steps": n,
                                                "env_kwargs": {"map_name": "4x4", "is_slippery": False}}))
    rng = np.random.default_rng(seed)
    lines = []
    for k in rounds:
        s, a, r, ends = frozenlake_rollout(n, rng)
        g = analysis.discounted_returns(r, ends, 0.99)
        a_mc = analysis.mc_advantage_buffer(s, a, g)
        flip = rng.random(n) < 0.2
        a_gae = np.where(flip, -a_mc, a_mc) + 0.05 * rng.normal(size=n)
        score = (a_mc * a_gae) * (1 + 0.1 * rng.normal(size=n)) + 1e-3 * rng.normal(size=n)
        arrays = dict(obs=np.eye(16, dtype=np.float32)[s], actions=a, rewards=r, dones=ends,
                      values=g.mean() + 0.1 * rng.normal(size=n), logp=np.log(np.full(n, 0.25)),
                      adv_gae=a_gae, returns_mc=g, score_return=score)
        if action_scores:
            arrays["score_action"] = rng.normal(size=(n, 3)) * (0.5 ** k)
        store.save_round(path, k, **arrays)
        lines.append({"round": k, "global_step": (k + 1) * n, "eval/return_mean": 0.1 * k,
                      "charts/episodic_return": 0.05 * k, "attr/score_ms": 1.5 + 0.1 * k, "time/update_s": 0.2,
                      "time/rollout_s": 0.3})
    if with_metrics:
        (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def add_application_outputs(path) -> None:
    """Behaviour / intervention / validation result files in the formats those commands write (for report tests)."""
    path = Path(path)
    rounds = [{"round": k, "n_match": 40 - k, "influence_mean": 1.0 / (k + 1), "top_share": 0.5 - 0.05 * k,
               "roughness": 0.3 / (k + 1)} for k in range(6)]
    (path / "behaviour_test-probe.json").write_text(json.dumps({
        "run": str(path), "probe": "test-probe", "rounds": rounds,
        "phases": [{"name": "association", "start": 0, "end": 1, "why": "high roughness"},
                   {"name": "clustering", "start": 2, "end": 5, "why": "roughness drops"}]}))
    summary = [{"round": k, "arm": arm, "n_dropped": 100, "delta": {"mean": d, "lo": d - 0.1, "hi": d + 0.1, "n": 3,
                                                                     "level": 0.95}}
               for k in (2, 5) for arm, d in (("drop negative", 0.2), ("drop random", -0.05))]
    (path / "intervene_test.json").write_text(json.dumps({"env_id": "FrozenLake-v1", "seeds": [0, 1, 2],
                                                          "summary": summary}))
    (path / "validate_test.json").write_text(json.dumps({"env_id": "FrozenLake-v1", "summary": [
        {"learning_rate": 5e-3, "selection": "random", "n_subsets": 20, "spearman": 0.8, "pearson": 0.9,
         "slope": 1.1}]}))


def train_tiny(path, env_id: str = "FrozenLake-v1", rounds: int = 3, n_steps: int = 128, **overrides) -> Path:
    """A real (tiny) fastattr.ppo run with --save-attribution: `rounds` rounds of n_steps records, 2 epochs."""
    from fastattr.rl.config import Args
    from fastattr import ppo
    kwargs = dict(env_id=env_id, total_timesteps=rounds * n_steps, n_steps=n_steps, batch_size=32, n_epochs=2,
                  optimizer="sgd", learning_rate=5e-2, eval_episodes=8, save_attribution=True, run_dir=str(path),
                  progress=False)
    if env_id.startswith("FrozenLake"):
        kwargs["env_kwargs"] = {"map_name": "4x4", "is_slippery": False}
    kwargs.update(overrides)
    ppo.main(Args(**kwargs))
    return Path(path)
