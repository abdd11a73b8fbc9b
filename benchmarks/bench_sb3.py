"""The cost of IIF in Stable-Baselines3: one IIFPPO round vs one plain PPO round, same env and settings.

Three models with the same seed (LunarLander-v3, SB3's PPO defaults: n_steps 2048, one env, minibatch 64, 10 epochs,
Adam 3e-4) each run one round (rollout + update, `learn(2048)`) per repetition, in rotating order, on one torch
thread. Ratios are paired within a repetition and reported as median [min, max] over repetitions:
  iifppo-none / ppo   the scoring cost alone (every record kept, the update is PPO's)
  iifppo-iif / ppo    the whole IIF round (scoring, plus an update on fewer records)
and the attribution seconds (`attribution/seconds`, SB3's logger) as a fraction of the IIF round. Goal: an IIFPPO
round <= 1.05x a PPO round. FASTATTR_STRICT=1: a missing kernel stops the run instead of timing the fallback.

    python benchmarks/bench_sb3.py [--reps 10]
Appends a JSON line to benchmarks/results/bench_sb3.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ["FASTATTR_STRICT"] = "1"  # a missing kernel fails instead of timing the pure-torch fallback

import torch  # noqa: E402
from stable_baselines3 import PPO  # noqa: E402
from stable_baselines3.common.callbacks import BaseCallback  # noqa: E402

from fastattr import ops  # noqa: E402
from fastattr.info import provenance  # noqa: E402
from fastattr.integrations.sb3 import IIFPPO  # noqa: E402

ENV_ID = "LunarLander-v3"
N_STEPS = 2048


class RolloutTimer(BaseCallback):
    """Measures the rollout part of a round (the rest of `learn` is the update, scoring included)."""

    def _on_rollout_start(self) -> None:
        self.t0 = time.perf_counter()

    def _on_rollout_end(self) -> None:
        self.seconds = time.perf_counter() - self.t0

    def _on_step(self) -> bool:
        return True


def one_round(model) -> dict:
    timer = RolloutTimer()
    t0 = time.perf_counter()
    model.learn(N_STEPS, callback=timer, reset_num_timesteps=False)
    total = time.perf_counter() - t0
    attr = model.logger.name_to_value.get("attribution/seconds", 0.0)
    kept = model.logger.name_to_value.get("attribution/kept_fraction", 1.0)
    return {"total": total, "rollout": timer.seconds, "update": total - timer.seconds, "attr": attr, "kept": kept}


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=10, help="repetitions (one round of each model, interleaved)")
    p.add_argument("--seed", type=int, default=0)
    opts = p.parse_args()
    torch.set_num_threads(1)
    if not ops.has_kernel("grad_dot", "cpu"):  # the op scoring an MLP actor calls
        raise SystemExit("fastattr CPU kernel grad_dot is not built (make build): not timing the fallback")
    settings = dict(n_steps=N_STEPS, batch_size=64, n_epochs=10, seed=opts.seed, device="cpu")
    models = {"ppo": PPO("MlpPolicy", ENV_ID, **settings),
              "iifppo-none": IIFPPO("MlpPolicy", ENV_ID, filter="none", **settings),
              "iifppo-iif": IIFPPO("MlpPolicy", ENV_ID, filter="iif", **settings)}
    for model in models.values():  # warm-up round (first-call overheads)
        one_round(model)
    rounds: dict[str, list[dict]] = {name: [] for name in models}
    names = list(models)
    for rep in range(opts.reps):
        for name in names[rep % 3:] + names[:rep % 3]:
            rounds[name].append(one_round(models[name]))
        print(f"rep {rep + 1}/{opts.reps} done", flush=True)

    meta = provenance()
    print(f"\n# bench_sb3  {ENV_ID}  torch {meta['torch']}  sb3 {meta.get('stable-baselines3')}  commit "
          f"{meta['commit']}  1 thread  {meta['machine']}")
    print(f"n_steps {N_STEPS}, 1 env, minibatch 64, 10 epochs; median over {opts.reps} rounds per model")
    print(f"{'model':<14}{'round s':>9}{'rollout s':>11}{'update s':>10}{'attr s':>9}{'kept':>7}"
          f"{'round / ppo':>22}{'update / ppo':>22}")
    ratios = {}
    for name, rs in rounds.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        ratio = spread([r["total"] / b["total"] for r, b in zip(rs, rounds["ppo"])])
        upd = spread([r["update"] / b["update"] for r, b in zip(rs, rounds["ppo"])])
        ratios[name] = {"round": ratio, "update": upd, "median": med}
        print(f"{name:<14}{med['total']:>9.3f}{med['rollout']:>11.3f}{med['update']:>10.3f}{med['attr']:>9.4f}"
              f"{100 * med['kept']:>6.1f}%{ratio['median']:>8.3f} [{ratio['min']:.3f}, {ratio['max']:.3f}]"
              f"{upd['median']:>8.3f} [{upd['min']:.3f}, {upd['max']:.3f}]")
    share = spread([r["attr"] / r["total"] for r in rounds["iifppo-iif"]])
    print(f"attribution share of an IIFPPO(iif) round: median {100 * share['median']:.2f}% "
          f"(min {100 * share['min']:.2f}%, max {100 * share['max']:.2f}%); goal: round <= 1.05x PPO's")
    rec = {"bench": "bench_sb3", "env": ENV_ID, **meta, "reps": opts.reps, "seed": opts.seed, "ratios": ratios,
           "attr_share": share}
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    with open(out / "bench_sb3.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"appended to {out / 'bench_sb3.jsonl'}")


if __name__ == "__main__":
    main()
