"""How much does our smaller evaluation budget move the reproduction's metrics? The paper evaluates 1,000 stochastic
episodes per checkpoint; our runs evaluate 100 (MiniGrid, Acrobot, LunarLander) to fit two cores. This reruns PPO
and IIF on MiniGrid-Empty-8x8 at the paper's settings with 1,000 evaluation episodes every 5th round, on 2 seeds,
and compares them with the same seeds' 100-episode runs of the empty8 contest (benchmarks/beyond_iif.py --plan
empty8: `ppo-lr1x`, `iif`). Evaluation never perturbs training (its envs and action draws are seeded from (seed,
round) only), so both runs of a seed train identically, which the table checks round by round; only the
evaluations differ. It prints, per method, the standard error of one evaluation at each budget and how far the
100-episode returns sit from the 1,000-episode ones at the same checkpoints, then IIF's metrics against PPO
recomputed from both budgets on the same every-5th-round checkpoints.

    python benchmarks/eval_noise.py run      # resumable; needs nothing else
    python benchmarks/eval_noise.py table    # needs the empty8 contest's ppo-lr1x and iif runs of the same seeds
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.beyond_iif import finished  # noqa: E402  (a run dir whose metrics reach its last round)
from fastattr import metrics  # noqa: E402
from fastattr.info import provenance  # noqa: E402
from fastattr.store import read_jsonl  # noqa: E402

ENV_ID = "MiniGrid-Empty-8x8-v0"
EVERY, EPISODES = 5, 1000
METHODS = {"ppo": "ppo-lr1x", "iif": "iif"}  # method -> its label in the empty8 contest


def big_dir(method: str, seed: int) -> Path:
    return ROOT / "runs" / "beyond" / "evalnoise" / f"{method}_s{seed}"


def small_dir(method: str, seed: int) -> Path:
    return ROOT / "runs" / "beyond" / "empty8" / "clean" / f"{METHODS[method]}_s{seed}"


def run(seeds: list[int]) -> int:
    failed = 0
    for seed in seeds:
        for method in METHODS:
            d = big_dir(method, seed)
            if finished(d):
                continue
            d.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "fastattr", "train", "--env-id", ENV_ID, "--preset", "paper", "--seed",
                   str(seed), "--method", method, "--learning-rate", "0.005", "--eval-episodes", str(EPISODES),
                   "--eval-every", str(EVERY), "--run-dir", str(d), "--resume", "--no-progress"]
            with open(d.parent / f"{method}_s{seed}.log", "a") as log:
                log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
                log.flush()
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, check=False).returncode
            print(f"{method} s{seed}: {'done' if rc == 0 else f'failed (exit {rc})'}", flush=True)
            failed += rc != 0
    return 1 if failed else 0


def every_kth(rows: list[dict]) -> list[dict]:
    """The rows with their evaluation kept only at rounds 0, EVERY, 2 EVERY, ... (the big runs' checkpoints)."""
    return [r if r["round"] % EVERY == 0 else {**r, "eval_return": None} for r in rows]


def table(seeds: list[int]) -> str:
    lines, curves, training_same = [], {"100": {}, "1000": {}, "100 every round": {}}, []
    noise = {m: {"se100": [], "se1000": [], "diff": []} for m in METHODS}
    for method in METHODS:
        for seed in seeds:
            small, big = small_dir(method, seed), big_dir(method, seed)
            if not (finished(small) and finished(big)):
                lines.append(f"- {method} seed {seed}: not finished ({small if not finished(small) else big})")
                continue
            rs, rb = read_jsonl(small / "metrics.jsonl"), read_jsonl(big / "metrics.jsonl")
            same = [(a["round"], a.get("train_return"), a.get("approx_kl")) for a in rs] == \
                   [(b["round"], b.get("train_return"), b.get("approx_kl")) for b in rb]
            training_same.append(f"{method} s{seed}: {'identical' if same else 'DIFFERENT'}")
            by_round = {r["round"]: r for r in rs}
            for b in rb:
                if b.get("eval_return") is None:
                    continue
                a = by_round[b["round"]]
                noise[method]["se100"].append(a["eval_return_std"] / np.sqrt(a.get("eval_episodes", 100)))
                noise[method]["se1000"].append(b["eval_return_std"] / np.sqrt(EPISODES))
                noise[method]["diff"].append(a["eval_return"] - b["eval_return"])
            curves["100"].setdefault(method, {})[seed] = metrics.curve_from_rows(every_kth(rs))
            curves["1000"].setdefault(method, {})[seed] = metrics.curve_from_rows(rb)
            curves["100 every round"].setdefault(method, {})[seed] = metrics.curve_from_rows(rs)
    out = [f"## {ENV_ID}: evaluation with 100 episodes every round vs {EPISODES} every {EVERY}th round, seeds "
           f"{','.join(map(str, seeds))}", "", "Training, round by round (train return, approx-KL): "
           + ("; ".join(training_same) or "no pair finished"), *lines, "",
           "| method | checkpoints | s.e. of one evaluation, 100 episodes | s.e., 1,000 episodes | "
           "100-episode return minus 1,000-episode return: mean | RMS | max abs |", "|---|---|---|---|---|---|---|"]
    for method, d in noise.items():
        if d["diff"]:
            diff = np.array(d["diff"])
            out.append(f"| {method} | {len(diff)} | {np.mean(d['se100']):.3g} | {np.mean(d['se1000']):.3g} | "
                       f"{diff.mean():+.3g} | {np.sqrt((diff ** 2).mean()):.3g} | {np.abs(diff).max():.3g} |")
    out += ["", "IIF against PPO (mean ± s.e. over seeds; final gain with its 95% CI), from each evaluation:", "",
            "| evaluation | seeds | SE_ave | SE_ave (grid) | SE_peak | final return PPO / IIF | final gain [95% CI] |",
            "|---|---|---|---|---|---|---|"]
    for name, c in curves.items():
        if "ppo" not in c or "iif" not in c:
            continue
        e = metrics.summarize(c, baseline="ppo")["methods"]["iif"]
        fg, fr = e["final_gain"], e["final_return_paired"]
        label = {"100": f"100 episodes, every {EVERY}th round", "1000": f"{EPISODES} episodes, every {EVERY}th round",
                 "100 every round": "100 episodes, every round (the runs as published)"}[name]
        out.append(f"| {label} | {e['se_ave']['n']} | {metrics._pct(e['se_ave'])} | {metrics._pct(e['se_ave_grid'])} | "
                   f"{metrics._pct(e['se_peak'])} | {fr['ppo']['mean']:.3g} / {fr['iif']['mean']:.3g} | "
                   f"{fg['mean']:+.3g} [{fg['ci_low']:+.3g}, {fg['ci_high']:+.3g}] |")
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["run", "table"])
    p.add_argument("--seeds", default="0-1")
    a = p.parse_args()
    from fastattr.runinfo import parse_seeds

    seeds = parse_seeds(a.seeds)
    if a.command == "run":
        return run(seeds)
    meta = provenance()
    print(f"# eval_noise  torch {meta['torch']}  commit {meta['commit']}  {meta['machine']}  {time.strftime('%Y-%m-%d')}\n")
    print(table(seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
