"""The reproduction table of docs/reproduction.md, printed from `benchmarks/repro.sh`'s summaries.

For each paper environment with a `runs/repro/<env>/summary.json` (written by `fastattr compare`), one row with the
paper's numbers (Fig. 6(b), 5 seeds; RT_peak also Table 5, 3 runs; final-gain CI from Table 4) and one row per
method measured against `ppo`, paired by seed. Numbers are mean ± s.e. over seeds, in %; nothing is typed by hand.

    python benchmarks/repro_table.py [--root runs/repro]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# The paper's Fig. 6(b), Table 4 and Table 5: (SE_ave, SE_peak, RT_peak, Table 5 RT_peak, final-gain CI).
PAPER = {
    "FrozenLake-v1": ("34.0 ± 2.0", "19.2 ± 5.9", "29.5 ± 2.9", "31.3 ± 3.3", "–"),
    "Acrobot-v1": ("36.7 ± 6.5", "48.5 ± 0.8", "55.2 ± 1.0", "55.2 ± 1.0", "–"),
    "MiniGrid-Empty-8x8-v0": ("65.8 ± 3.3", "61.7 ± 4.1", "69.1 ± 1.7", "71.6 ± 1.1", "[0.04, 0.33]"),
    "LunarLander-v3": ("26.0 ± 1.8", "39.7 ± 3.7", "44.9 ± 2.5", "44.1 ± 2.3", "[+22.5, +130.5]"),
    "BipedalWalker-v3": ("31.0 ± 8.7", "26.2 ± 8.0", "29.2 ± 0.7", "29.2 ± 0.7", "[+24.4, +76.0]"),
    "highway-fast-v0": ("37.7 ± 6.1", "55.1 ± 2.9", "59.9 ± 0.7", "59.9 ± 0.7", "–"),
}
PAPER_NOTE = {"LunarLander-v3": "; LunarLander-v2", "highway-fast-v0": "; highway-v0"}
COLUMNS = ["se_ave", "se_ave_grid", "se_peak", "rt_peak_opt", "rt_peak_train", "rt_peak_updates"]
HEADER = ("| env | method | seeds | SE_ave | SE_ave (grid) | SE_peak | RT_peak (opt) | RT_peak (train) | "
          "RT_peak (opt. steps) | final return ppo / method | final gain [95% CI] | levels not reached |")


def pct(d: dict | None) -> str:
    if not d:
        return "–"
    return f"{100 * d['mean']:.1f} ± {100 * d['se']:.1f}"


def gain(d: dict | None) -> str:
    if not d:
        return "–"
    return f"{d['mean']:+.3g} [{d['ci_low']:+.3g}, {d['ci_high']:+.3g}]"


def rows(summary: dict) -> list[str]:
    env = summary["env_id"]
    methods = summary["methods"]
    base_name = summary.get("baseline", "ppo")
    base = methods[base_name]
    out = []
    if env in PAPER:
        se_ave, se_peak, rt, rt5, ci = PAPER[env]
        out.append(f"| {env} | paper (IIF, best p{PAPER_NOTE.get(env, '')}) | 5 | {se_ave} | | {se_peak} | "
                   f"{rt} (Table 5: {rt5}) | | | | {ci} | |")
    for name, m in methods.items():
        if name == base_name:
            continue
        cells = [pct(m.get(c)) for c in COLUMNS]
        paired = m.get("final_return_paired")  # the same seeds on both sides (older summaries: each method's own)
        b_final, m_final = (paired[base_name]["mean"], paired[name]["mean"]) if paired else (
            base["final_return"]["mean"], m["final_return"]["mean"])
        finals = f"{b_final:.3g} / {m_final:.3g}"
        n_seeds = len(m["final_gain"]["seeds"]) if "final_gain" in m else len(m["seeds"])  # paired with the baseline
        out.append(f"| {env} | {name} | {n_seeds} | " + " | ".join(cells)
                   + f" | {finals} | {gain(m.get('final_gain'))} | {m.get('censored_levels', 0)} |")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("runs/repro"), help="benchmarks/repro.sh's OUT (default runs/repro)")
    opts = p.parse_args(argv)
    found = [opts.root / env / "summary.json" for env in PAPER if (opts.root / env / "summary.json").exists()]
    if not found:
        p.error(f"--root: no <env>/summary.json under {opts.root}; run benchmarks/repro.sh first")
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    for path in found:
        summary = json.loads(path.read_text())
        print("\n".join(rows(summary)))
        if summary.get("unfinished_runs"):
            print(f"<!-- {summary['env_id']}: not finished, left out: {', '.join(summary['unfinished_runs'])} -->")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
