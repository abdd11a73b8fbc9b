"""Compare labelled sets of finished runs (e.g. the repro's PPO and IIF against an ablation's PPO at another
learning rate) with `fastattr compare`'s metrics, paired by seed (the `_s<seed>` suffix of each run dir).

    python benchmarks/ablation_table.py ppo=runs/repro/MiniGrid-Empty-8x8-v0/runs/ppo_s* \\
        iif=runs/repro/MiniGrid-Empty-8x8-v0/runs/iif_s* "ppo lr 5e-2=runs/ablation/minigrid_ppo_lr5e-2/runs/ppo_s*"

The first label is the baseline. Prints the summary markdown (SE_ave, SE_peak, RT_peak, final gain, update size
per third of training); `--json FILE` also writes the summary.
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


def load_sets(specs: list[str]) -> dict[str, dict[int, metrics.Curve]]:
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
                runs[int(m.group(1))] = metrics.load_curve(d)
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
    opts = p.parse_args(argv)
    curves = load_sets(opts.sets)
    summary = metrics.summarize(curves, baseline=next(iter(curves)))
    print(metrics.to_markdown(summary, title=opts.title))
    if opts.json:
        opts.json.write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
