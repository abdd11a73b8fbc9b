"""Compare labelled sets of finished runs (e.g. the repro's PPO and IIF against an ablation's PPO at another
learning rate) with `fastattr compare`'s metrics, paired by seed (the `_s<seed>` suffix of each run dir).

    python benchmarks/ablation_table.py ppo=runs/repro/MiniGrid-Empty-8x8-v0/runs/ppo_s* \\
        iif=runs/repro/MiniGrid-Empty-8x8-v0/runs/iif_s* "ppo lr 5e-2=runs/ablation/minigrid_ppo_lr5e-2/runs/ppo_s*"

The first label is the baseline. Prints the summary markdown (SE_ave, SE_peak, RT_peak, final gain, update size
per third of training); `--json FILE` also writes the summary. `--rounds N` reads every run as if its budget had
been N rounds (its rounds 0..N: a shorter budget is the start of a longer run), e.g. the official code's 100-round
LunarLander IIF schedule from the 150-round runs.
"""
from __future__ import annotations

import argparse
import glob
import json
import re
import sys
from pathlib import Path

from fastattr import metrics
from fastattr.experiments import run_finished


def load_sets(specs: list[str], rounds: int | None = None) -> dict[str, dict[int, metrics.Curve]]:
    curves = {}
    for spec in specs:
        label, sep, pattern = spec.partition("=")
        if not sep or not label or not pattern:
            raise SystemExit(f"ablation_table: expected LABEL=GLOB, got {spec!r}")
        runs = {}
        for d in sorted(glob.glob(pattern)):
            m = re.search(r"_s(\d+)$", d.rstrip("/"))
            if m is None:
                raise SystemExit(f"ablation_table: {d} does not end in _s<seed>; name run dirs <method>_s<seed>")
            if run_finished(Path(d)):
                try:
                    runs[int(m.group(1))] = metrics.load_curve(d, rounds)
                except ValueError as e:
                    raise SystemExit(f"ablation_table: --rounds: {e}") from None
            else:
                print(f"<!-- {label}: {d} is not finished, left out -->", file=sys.stderr)
        if not runs:
            raise SystemExit(f"ablation_table: {label}: no finished run matches {pattern!r}")
        curves[label] = runs
    return curves


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sets", nargs="+", help="LABEL=GLOB of run dirs; the first is the baseline")
    p.add_argument("--title", default="", help="markdown title")
    p.add_argument("--json", type=Path, help="also write the summary here")
    p.add_argument("--rounds", type=int, help="read each run's first N rounds only (a budget of N rounds)")
    opts = p.parse_args(argv)
    if opts.rounds is not None and opts.rounds < 1:
        p.error(f"--rounds must be >= 1, got {opts.rounds}")
    curves = load_sets(opts.sets, opts.rounds)
    summary = metrics.summarize(curves, baseline=next(iter(curves)))
    print(metrics.to_markdown(summary, title=opts.title))
    if opts.json:
        opts.json.write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
