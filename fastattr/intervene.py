"""`fastattr intervene RUN --round k[,k2..] --seeds 0-2`: targeted intervention (paper §4.3, Fig. 5 and Fig. 11).

For each chosen round k, retrain from θ(k) on the saved buffer B(k) three ways, with the run's own PPO settings:
    unfiltered      every record (the reference)
    drop negative   without the records whose return-target score is negative (all of them, as in §4.3; --p q
                    drops only the bottom q of them, IIF's rule)
    drop random     without a uniformly random set of the same size (the paper's control)
then evaluate each retrained policy (stochastic, the same evaluation episodes for every arm of a seed) and report
Δreturn = return(arm) − return(unfiltered) per seed, with a 95% t-interval over seeds.

A seed fixes the retrain's minibatch order, the random drop and the evaluation episodes. Needs a run trained with
--save-attribution (θ(k) checkpoints and attribution/round_k.npz). Writes <run>/intervene_<rounds>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path

import numpy as np
import torch

from . import analysis, runinfo
from .rl.config import derived_seed

ARMS = ("unfiltered", "drop negative", "drop random")


def keep_masks(scores: np.ndarray, seed: int, k: int, p: float | None = None) -> dict[str, torch.Tensor]:
    """{arm: keep-mask [N] bool}. 'drop negative' drops every score < 0 (p None) or IIF's bottom p of them;
    'drop random' drops as many records, chosen with a generator seeded by (seed, k)."""
    from . import filtering
    s = torch.as_tensor(np.asarray(scores, dtype=np.float32))
    n = len(s)
    neg = (s >= 0) if p is None else filtering.iif_keep_mask(s, p)
    n_drop = int((~neg).sum())
    rand = filtering.random_keep_mask(n, n_drop, np.random.default_rng(derived_seed(seed, k, 0xD20B)))
    return {"unfiltered": torch.ones(n, dtype=torch.bool), "drop negative": neg, "drop random": rand}


def make_eval_envs(args, episodes: int):
    import gymnasium as gym

    from . import envs as envs_lib
    n = max(1, min(episodes, args.eval_envs or 100))
    return gym.vector.SyncVectorEnv([envs_lib.make_env(args.env_id, args.env_kwargs)] * n,
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def retrain_and_evaluate(run, args, k: int, buf, keep: torch.Tensor, seed: int, eval_envs, episodes: int) -> dict:
    """Loads θ(k), runs the run's PPO update on the kept records of B(k) (minibatch order from `seed`), evaluates."""
    from .rl.rollout import evaluate
    from .rl.update import ppo_update
    agent, optimizer = runinfo.load_theta(run, k, args)
    generator = torch.Generator().manual_seed(derived_seed(seed, k, 0x7E7A))
    t0 = time.perf_counter()
    losses = ppo_update(agent, optimizer, buf, keep, args, generator)
    update_s = time.perf_counter() - t0
    ev = evaluate(agent, eval_envs, episodes, seed, 100_000 + k)  # same episodes for every arm of this seed
    from .validate import return_objective
    return {"return": ev["eval_return"], "return_std": ev["eval_return_std"], "update_seconds": update_s,
            "target": return_objective(agent, buf), "approx_kl": losses["approx_kl"],
            "optimizer_steps": losses["optimizer_steps"]}


def intervene(run_dir, rounds: list[int], seeds: list[int], episodes: int | None = None, p: float | None = None,
              progress: bool = True) -> dict:
    """Runs every (round, seed, arm) retrain; returns the JSON-able result with per-seed rows and the summary."""
    from tqdm.auto import tqdm
    run = runinfo.load_run(run_dir)
    args = runinfo.ppo_args(run)
    torch.set_num_threads(args.threads)
    episodes = episodes or args.eval_episodes or 100
    if not seeds:
        raise ValueError("--seeds selects no seed; give e.g. 0-2")
    missing = [k for k in rounds if k not in run.rounds]
    if missing:
        raise FileNotFoundError(f"round(s) {missing} were not saved in {run.path} (saved rounds: {run.rounds[:10]}"
                                f"{'...' if len(run.rounds) > 10 else ''}); train with --save-attribution")
    eval_envs = make_eval_envs(args, episodes)
    rows = []
    bar = tqdm(total=len(rounds) * len(seeds) * len(ARMS), desc="intervene", unit="retrain", disable=not progress)
    try:
        for k in rounds:
            agent0 = runinfo.make_agent(args)
            buf, data = runinfo.load_buffer(run, k, continuous=agent0.continuous)
            for seed in seeds:
                masks = keep_masks(data["score_return"], seed, k, p)
                for arm in ARMS:
                    res = retrain_and_evaluate(run, args, k, buf, masks[arm], seed, eval_envs, episodes)
                    rows.append({"round": k, "seed": seed, "arm": arm, "n_dropped": int((~masks[arm]).sum()),
                                 "n_records": int(buf.n), **res})
                    bar.update(1)
    finally:
        bar.close()
        eval_envs.close()
    return {"run": str(run.path), "env_id": args.env_id, "rounds": rounds, "seeds": seeds, "eval_episodes": episodes,
            "p": p, "optimizer": args.optimizer, "learning_rate": args.learning_rate, "results": rows,
            "summary": summarize(rows)}


def summarize(rows: list[dict]) -> list[dict]:
    """Per (round, arm): the return over seeds and Δreturn vs the unfiltered retrain of the same seed (t-intervals)."""
    out = []
    for k in sorted({r["round"] for r in rows}):
        ref = {r["seed"]: r["return"] for r in rows if r["round"] == k and r["arm"] == "unfiltered"}
        for arm in ARMS:
            mine = [r for r in rows if r["round"] == k and r["arm"] == arm and r["seed"] in ref]
            if not mine:
                continue
            ret = np.array([r["return"] for r in mine])
            base = np.array([ref[r["seed"]] for r in mine])
            row = {"round": k, "arm": arm, "n_dropped": int(np.mean([r["n_dropped"] for r in mine])),
                   "return": analysis.t_ci(ret).as_dict(), "delta": analysis.paired_diff_ci(ret, base).as_dict()}
            if all("target" in r for r in rows if r["round"] == k):
                ref_t = {r["seed"]: r["target"] for r in rows if r["round"] == k and r["arm"] == "unfiltered"}
                row["target_delta"] = analysis.paired_diff_ci([r["target"] for r in mine],
                                                              [ref_t[r["seed"]] for r in mine]).as_dict()
            out.append(row)
    return out


def to_markdown(res: dict) -> str:
    lines = [f"# Targeted intervention: {res['env_id']}", "",
             f"Retrain from θ(k) on B(k) with the run's PPO settings ({res['optimizer']}, lr {res['learning_rate']:g});"
             f" seeds {res['seeds']}; {res['eval_episodes']} evaluation episodes per policy (stochastic).", "",
             "| round | arm | records dropped | return (mean) | Δreturn vs unfiltered | 95% CI | ΔJ (return target) |",
             "|---|---|---|---|---|---|---|"]
    for s in res["summary"]:
        d = s["delta"]
        dj = f"{s['target_delta']['mean']:+.3g}" if "target_delta" in s else ""
        lines.append(f"| {s['round']} | {s['arm']} | {s['n_dropped']} | {s['return']['mean']:.4g} | "
                     f"{d['mean']:+.4g} | [{d['lo']:+.4g}, {d['hi']:+.4g}] | {dj} |")
    lines += ["", "ΔJ: change of the return target J = mean Â·log π on B(k) (what the scores predict) against the "
              "unfiltered retrain; Δreturn: what the evaluation measures."]
    return "\n".join(lines) + "\n"


def write(res: dict, out_dir) -> dict:
    from . import report
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = "-".join(str(k) for k in res["rounds"][:8]) + ("-etc" if len(res["rounds"]) > 8 else "")
    stem = out / f"intervene_r{tag}"
    Path(f"{stem}.json").write_text(json.dumps(res, indent=1))
    Path(f"{stem}.md").write_text(to_markdown(res))
    b64 = report.intervention_figure(res)
    files = {"json": f"{stem}.json", "md": f"{stem}.md"}
    if b64:
        Path(f"{stem}.png").write_bytes(base64.b64decode(b64))
        files["png"] = f"{stem}.png"
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastattr intervene", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run dir trained with --save-attribution")
    p.add_argument("--round", dest="rounds", required=True, help="round(s): 5, or 1,5,9, or 2-4, or all")
    p.add_argument("--seeds", default="0-2", help="retrain seeds, e.g. 0-2 (default) or 0,3")
    p.add_argument("--eval-episodes", type=int, default=None, help="episodes per evaluation (default: the run's)")
    p.add_argument("--p", type=float, default=None,
                   help="drop only the bottom p of the negative records (IIF's rule); default: all of them (§4.3)")
    p.add_argument("--out", default=None, help="output dir (default: the run dir)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    def compute():
        if a.p is not None and not 0 < a.p <= 1:
            raise ValueError(f"--p must be in (0, 1], got {a.p}")
        if a.eval_episodes is not None and a.eval_episodes < 1:
            raise ValueError(f"--eval-episodes must be >= 1, got {a.eval_episodes}")
        run = runinfo.load_run(a.run)
        rounds = runinfo.parse_rounds(a.rounds, run.rounds)
        return intervene(a.run, rounds, runinfo.parse_seeds(a.seeds), a.eval_episodes, a.p, not a.no_progress)

    return runinfo.run_tool("intervene", compute, write, to_markdown, a.out or a.run)


if __name__ == "__main__":
    raise SystemExit(main())
