"""`fastattr demo` (what `make demo` runs): IIF against standard PPO on one of the paper's environments.

Default: FrozenLake-v1 (4x4, not slippery) with the paper's settings (SGD 5e-3, n_steps 2048, 50 rounds, IIF p = 50%,
1000 stochastic evaluation episodes per round), seeds 0-2, both cores: about five minutes on a 2-core machine. It
is `fastattr compare` underneath, so an interrupted demo resumes where it stopped. Then one short IIF run (10 rounds)
saves its attribution (every round's buffer, scores and parameters, and a probe's action-target scores), so that the
analysis commands it prints can be tried on it right away. Prints where the plot and the summary are, and the summary.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import experiments


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastattr demo", allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--env-id", default="FrozenLake-v1", help="a paper environment (see fastattr/envs.py presets)")
    p.add_argument("--seeds", default="0-2", help="seeds, e.g. 0-2")
    p.add_argument("--methods", default="ppo,iif", help="methods to compare")
    p.add_argument("--out", default="demo_out", help="output dir")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs in parallel")
    opts, rest = p.parse_known_args(argv)
    out = Path(opts.out) / opts.env_id
    print(f"fastattr demo: {opts.methods.replace(',', ' vs ')} on {opts.env_id} (paper settings), seeds {opts.seeds}, "
          f"{opts.jobs} parallel runs -> {out}", flush=True)
    t0 = time.time()
    rc = experiments.main_compare(["--env-id", opts.env_id, "--seeds", opts.seeds, "--methods", opts.methods,
                                   "--out", str(out), "--jobs", str(opts.jobs), "--preset", "paper", *rest])
    if rc == 2:
        return rc
    md = out / "summary.md"
    if not md.exists():
        print("fastattr demo: no finished runs to summarise; see the logs under " + str(out / "logs"), file=sys.stderr)
        return rc
    print("\n" + md.read_text())
    print(f"plot:    {out / 'curves.png'}\nsummary: {md}\n         {out / 'summary.json'}\n"
          f"runs:    {out / 'runs'} (metrics.jsonl per run)   [{time.time() - t0:.0f} s]")
    attributed = out / "attributed"
    probe = DEMO_PROBES.get(opts.env_id)
    print(f"\nfastattr demo: one short IIF run that saves its attribution -> {attributed}", flush=True)
    rc_attr = experiments.main_train(["--env-id", opts.env_id, "--preset", "paper", "--method", "iif", "--seed", "0",
                                      "--total-timesteps", str(10 * 2048), "--save-attribution",
                                      *(["--probe", probe] if probe else []), "--run-dir", str(attributed),
                                      "--resume", *rest])
    if rc_attr == 0:
        print(NEXT.format(run=attributed, out=out, probe=probe or "action=0"))
    return rc or rc_attr


# A probe per demo env for `fastattr behaviour` (see fastattr/probes.py)
DEMO_PROBES = {"FrozenLake-v1": "frozenlake-down", "MiniGrid-Empty-8x8-v0": "minigrid-forward",
               "Acrobot-v1": "acrobot-torque-pos"}

NEXT = """
Next, on the run that saved its attribution:
  fastattr diagnose {run} --round 5                 # the most helpful / harmful records of round 5, and what they share
  fastattr behaviour {run} --probe {probe}   # how the probe's behaviour formed across rounds
  fastattr validate {run} --round 5                 # do the first-order scores predict leave-subset-out retraining?
  fastattr intervene {run} --round 5                # retrain round 5 without its negative / random records
  fastattr report {run}                            # everything above in one report.html
  fastattr report {out}                 # the comparison's report
(from the repository's .venv: .venv/bin/fastattr ...)"""
