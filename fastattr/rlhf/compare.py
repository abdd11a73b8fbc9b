"""`fastattr compare --rlhf`: the RLHF detoxification experiment over trainers x methods x seeds.

    fastattr compare --rlhf --trainer grpo --seeds 0-2 --methods ppo,iif,random --rounds 20 --out OUT [--jobs J]

runs one `fastattr rlhf` process per run into OUT/runs/<trainer>_<method>_s<seed>/ (--jobs at a time; resumable:
finished runs are skipped, others resumed; `--trainer both` runs grpo and ppo) and writes, from the finished runs:

    OUT/summary.json, OUT/summary.md   per trainer and method, mean and 95% t-interval over seeds (analysis.t_ci) of
        final reward, final toxicity   the test evaluation after the last round
        change vs the baseline         paired by seed: the method's final reward / toxicity minus the baseline's (ppo)
        rounds to the baseline's final the first round whose reward reaches the final reward of the baseline run of
                                       the same seed; a level never reached within the budget R counts as round R + 1
                                       and is flagged (per seed in summary.json)
        opt. time to it                attribution + update seconds summed through that round (never reached: the
                                       total plus one mean round per round past the budget)
        opt. time, training time       totals over the R rounds: attribution + update; rollouts + attribution + update
    OUT/curves.png                     reward and toxicity against rounds and against wall-clock, mean and 95% band
                                       over seeds per method (toxicity's band clipped to [0, 1])

`fastattr report OUT` puts them in one page with the records each round scored highest and lowest.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .. import analysis, metrics
from ..runinfo import parse_int_list
from ..store import read_jsonl
from .cli import load_config
from .experiment import METHODS, TRAINERS, ExperimentConfig, check_run_dir, completed_rounds, run_meta


def run_dir_of(out: Path, trainer: str, method: str, seed: int) -> Path:
    return Path(out) / "runs" / f"{trainer}_{method}_s{seed}"


# ----------------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------------
def _plan(opts: argparse.Namespace, rest: list[str]) -> tuple[list[str], list[str], list[int], ExperimentConfig]:
    """(trainers, methods, seeds, config) of the command line; a ValueError for anything wrong with it."""
    if rest:
        raise ValueError(f"unknown arguments with --rlhf: {' '.join(rest)} (see `fastattr compare --help`)")
    trainers = list(TRAINERS) if opts.trainer == "both" else [opts.trainer]
    methods = [m.strip() for m in opts.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"--methods: unknown {bad}; with --rlhf choose from {', '.join(METHODS)}")
    if opts.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {opts.jobs}")
    if opts.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {opts.rounds}")
    return trainers, methods, parse_int_list(opts.seeds), load_config(opts.config)


def _runs_with_other_settings(runs: dict[tuple[str, str, int], Path], config: ExperimentConfig) -> list[str]:
    """Existing runs that hold another method, trainer, seed or configuration than compare would pass them."""
    other = []
    for (t, m, s), d in runs.items():
        try:
            check_run_dir(d, run_meta(m, t, s, config), resume=True)
        except ValueError as e:
            other.append(str(e))
    return other


def _build_task_once(config: ExperimentConfig, cache_dir: str) -> None:
    """Builds the task before the runs start when it is not cached, so that parallel runs do not all build it."""
    from .task import build_task

    if not (Path(cache_dir) / config.task.digest()).exists():
        print("compare: building the RLHF task once (a few minutes; cached for every run)", flush=True)
        build_task(config.task, cache_dir)


def main_compare_rlhf(opts: argparse.Namespace, rest: list[str]) -> int:
    """`fastattr compare --rlhf` (options parsed by fastattr.experiments.compare_parser)."""
    from ..launch import run_all

    try:
        trainers, methods, seeds, config = _plan(opts, rest)
        out = Path(opts.out)
        runs = {(t, m, s): run_dir_of(out, t, m, s) for t in trainers for s in seeds for m in methods}
        other = [] if opts.aggregate_only else _runs_with_other_settings(runs, config)
        if other:
            raise ValueError(f"--out {out} holds runs with other settings: {'; '.join(other)}. Pass the --config "
                             "they were run with, or choose another --out. Nothing was run.")
    except ValueError as e:
        print(f"fastattr compare: error: {e}", file=sys.stderr)
        return 2
    failed = []
    if not opts.aggregate_only:
        todo = [key for key, d in runs.items() if completed_rounds(d) < opts.rounds]
        extra = ["--cache-dir", opts.cache_dir] + (["--config", json.dumps(asdict(config))] if opts.config else [])
        jobs = {f"{t}/{m} seed {s}": ([sys.executable, "-m", "fastattr", "rlhf", "--method", m, "--trainer", t,
                                       "--seed", str(s), "--rounds", str(opts.rounds), "--run-dir", str(runs[t, m, s]),
                                       "--resume", *extra], f"{t}_{m}_s{s}") for t, m, s in todo}
        if jobs:
            _build_task_once(config, opts.cache_dir)
        failed = run_all(jobs, opts.jobs, out, len(runs))
        if failed is None:
            return 130
    paths = aggregate(out, trainers, methods, seeds, opts.rounds, opts.baseline)
    if paths:
        print("\n".join(f"wrote {p}" for p in paths))
    return 1 if failed or not paths else 0


# ----------------------------------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------------------------------
Runs = dict[str, dict[str, dict[int, list[dict]]]]  # trainer -> method -> seed -> metrics rows (rounds 0..R)


def group(row_lists: list[list[dict]]) -> Runs:
    """Runs' metrics rows grouped by trainer, method and seed (each run's rows sorted by round; trainers and methods
    in the order of TRAINERS and METHODS)."""
    runs: Runs = {}
    for rows in row_lists:
        if rows:
            first = rows[0]
            runs.setdefault(first["trainer"], {}).setdefault(first["method"], {})[first["seed"]] = \
                sorted(rows, key=lambda r: r["round"])
    order = {name: i for i, name in enumerate(TRAINERS + METHODS)}
    return {t: dict(sorted(ms.items(), key=lambda kv: order.get(kv[0], 99)))
            for t, ms in sorted(runs.items(), key=lambda kv: order.get(kv[0], 99))}


def _opt_seconds(row: dict) -> float:
    return (row.get("attr_seconds") or 0.0) + (row.get("update_seconds") or 0.0)


def reach(rows: list[dict], level: float, budget: int) -> dict:
    """The first trained round whose reward is >= `level` (metrics.first_reach) and the optimisation seconds
    (attribution + update) through it. A level never reached counts as round budget + 1 (`reached` false), its time as
    the total plus one mean round per round past the last."""
    trained = [r for r in rows if r["round"] >= 1]
    rounds = [r["round"] for r in trained]
    opt = np.cumsum([_opt_seconds(r) for r in trained])
    m = metrics.first_reach(rounds, [r["reward"] for r in trained], level)
    if m is not None:
        return {"level": level, "round": m, "opt_seconds": float(opt[rounds.index(m)]), "reached": True}
    per_round = float(opt[-1]) / len(trained)
    return {"level": level, "round": budget + 1, "opt_seconds": float(opt[-1]) + per_round * (budget + 1 - rounds[-1]),
            "reached": False}


def _method_summary(by_seed: dict[int, list[dict]], base: dict[int, list[dict]], is_base: bool, budget: int,
                    conf: float) -> dict:
    """One method's entry of the summary: its runs `by_seed` against the baseline's runs `base` (paired by seed)."""

    def ci(values) -> dict:
        return analysis.t_ci(list(values), conf).as_dict()

    finals = {s: rows[-1] for s, rows in by_seed.items()}
    entry = {"seeds": sorted(by_seed),
             "final_reward": ci(f["reward"] for f in finals.values()),
             "final_toxicity": ci(f["toxicity"] for f in finals.values()),
             "opt_seconds": ci(sum(_opt_seconds(r) for r in rows) for rows in by_seed.values()),
             "attr_seconds": ci(sum(r.get("attr_seconds") or 0.0 for r in rows) for rows in by_seed.values()),
             "train_seconds": ci(sum(r.get("round_seconds") or 0.0 for r in rows) for rows in by_seed.values())}
    paired = sorted(set(by_seed) & set(base))
    if not paired:
        return entry
    if not is_base:
        for key in ("reward", "toxicity"):
            entry[f"{key}_change"] = analysis.paired_diff_ci([finals[s][key] for s in paired],
                                                             [base[s][-1][key] for s in paired], conf).as_dict()
    per_seed = {s: reach(by_seed[s], base[s][-1]["reward"], budget) for s in paired}
    entry["to_baseline_final"] = {"rounds": ci(d["round"] for d in per_seed.values()),
                                  "opt_seconds": ci(d["opt_seconds"] for d in per_seed.values()),
                                  "unreached_seeds": [s for s, d in per_seed.items() if not d["reached"]],
                                  "per_seed": {str(s): d for s, d in per_seed.items()}}
    return entry


def summarize(runs: Runs, rounds: int, baseline: str = "ppo", conf: float = 0.95) -> dict:
    """The summary (module docstring) of runs whose rows cover rounds 0..`rounds`, per trainer and method."""
    out = {"kind": "rlhf", "rounds": rounds, "baseline": baseline, "conf": conf, "trainers": {}}
    for trainer, by_method in runs.items():
        base = by_method.get(baseline, {})
        out["trainers"][trainer] = {m: _method_summary(by_seed, base, m == baseline, rounds, conf)
                                    for m, by_seed in by_method.items()}
    return out


def _cell(ci: dict | None, fmt: str, signed: bool = False, bounds: tuple[float, float] | None = None) -> str:
    """'mean [lo, hi]' (the interval clipped to `bounds`), 'mean' for one seed, '–' for none."""
    if ci is None:
        return "–"
    f = "{:+" + fmt[2:] if signed else fmt
    text = f.format(ci["mean"])
    if np.isfinite(ci["lo"]):
        lo, hi = np.clip([ci["lo"], ci["hi"]], *bounds) if bounds else (ci["lo"], ci["hi"])
        text += f" [{f.format(lo)}, {f.format(hi)}]"
    return text


def to_markdown(summary: dict, title: str = "") -> str:
    """summary.md: one table per trainer (the definitions in one paragraph above them)."""
    base, budget, level = summary["baseline"], summary["rounds"], int(100 * summary["conf"])
    definitions = (
        f"Mean [{level}% t-interval] over seeds. Final: the test evaluation after round {budget} (reward: the reward "
        f"model's neutral logit; toxicity: the lexicon rule's rate). Δ vs {base}: paired by seed. Rounds / opt. time "
        f"to {base}'s final reward: the first round whose reward reaches the final reward of the {base} run of the "
        f"same seed, and the attribution + update seconds through it; a level never reached counts as round "
        f"{budget + 1} (its time: the total plus one mean round) and is flagged. Opt. time: attribution + update over "
        "all rounds; training time: rollouts + attribution + update (evaluation excluded). The final toxicity's "
        "interval is clipped to [0, 1], the rate's range (summary.json keeps the t-interval).")
    lines = [f"# {title or 'RLHF detoxification'}", "", definitions]
    for trainer, methods in summary["trainers"].items():
        lines += ["", f"## {trainer} trainer, {budget} rounds", "",
                  (f"| method | seeds | final reward | final toxicity | Δ reward vs {base} | Δ toxicity vs {base} | "
                   f"rounds to {base}'s final reward | opt. time to it (s) | opt. time (s) | training time (s) |"),
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for method, e in methods.items():
            reached = e.get("to_baseline_final") or {}
            unreached = reached.get("unreached_seeds") or []
            flag = f" ({len(unreached)} of {reached['rounds']['n']} never)" if unreached else ""
            lines.append(
                f"| {method} | {len(e['seeds'])} | {_cell(e['final_reward'], '{:.3f}')} | "
                f"{_cell(e['final_toxicity'], '{:.3f}', bounds=PANELS[1][2])} | "
                f"{_cell(e.get('reward_change'), '{:.3f}', True)} | "
                f"{_cell(e.get('toxicity_change'), '{:.3f}', True)} | {_cell(reached.get('rounds'), '{:.1f}')}{flag} | "
                f"{_cell(reached.get('opt_seconds'), '{:.1f}')} | {_cell(e['opt_seconds'], '{:.1f}')} | "
                f"{_cell(e['train_seconds'], '{:.1f}')} |")
    return "\n".join(lines) + "\n"


def aggregate(out: Path, trainers: list[str], methods: list[str], seeds: list[int], rounds: int,
              baseline: str = "ppo") -> list[Path]:
    """Reads the finished runs under OUT/runs (their rounds 0..`rounds`); writes summary.json, summary.md and
    curves.png, and returns their paths ([] when no run has finished)."""
    row_lists, unfinished = [], []
    for t in trainers:
        for m in methods:
            for s in seeds:
                d = run_dir_of(out, t, m, s)
                if completed_rounds(d) >= rounds:
                    row_lists.append([r for r in read_jsonl(d / "metrics.jsonl") if r["round"] <= rounds])
                else:
                    unfinished.append(d.name)
    if not row_lists:
        print(f"compare: no finished runs under {out / 'runs'} yet", file=sys.stderr)
        return []
    runs = group(row_lists)
    summary = {**summarize(runs, rounds, baseline), "seeds_requested": seeds, "unfinished_runs": unfinished}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = to_markdown(summary, f"RLHF detoxification: trainers {', '.join(runs)}; methods {', '.join(methods)}; "
                              f"{len(seeds)} seeds requested")
    if unfinished:
        md += f"\nNot finished (left out): {', '.join(unfinished)}\n"
    (out / "summary.md").write_text(md)
    fig = curves_figure(runs)
    fig.savefig(out / "curves.png", dpi=110)
    _close(fig)
    return [out / "summary.json", out / "summary.md", out / "curves.png"]


# ----------------------------------------------------------------------------------------------------------------------
# Curves
# ----------------------------------------------------------------------------------------------------------------------
PANELS = (("reward", "test reward (neutral logit)", None), ("toxicity", "test toxicity rate", (0.0, 1.0)))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _close(fig) -> None:
    _pyplot().close(fig)


def curves_figure(runs: Runs):
    """Reward and toxicity (rows, per trainer) against rounds and wall-clock (columns): mean and 95% band over seeds
    per method (metrics.band; toxicity clipped to [0, 1]), over the rounds every seed has. Returns the figure."""
    plt = _pyplot()
    fig, axes = plt.subplots(2 * len(runs), 2, figsize=(14, 3.8 * 2 * len(runs)), squeeze=False)
    colour = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for t, (trainer, by_method) in enumerate(runs.items()):
        for method, by_seed in by_method.items():
            seqs = list(by_seed.values())
            n = min(len(rows) for rows in seqs)
            wall = np.mean([[r["wall_seconds"] for r in rows[:n]] for rows in seqs], 0)  # the mean over seeds
            xs = ([r["round"] for r in seqs[0][:n]], wall)
            for p, (key, _, bounds) in enumerate(PANELS):
                mean, lo, hi = metrics.band([[r[key] for r in rows[:n]] for rows in seqs], bounds=bounds)
                for c, x in enumerate(xs):
                    ax = axes[2 * t + p, c]
                    ax.plot(x, mean, color=colour.get(method), label=f"{method} (n={len(seqs)})")
                    ax.fill_between(x, lo, hi, color=colour.get(method), alpha=0.2)
        for p, (_, label, _) in enumerate(PANELS):
            for c, xlabel in enumerate(("round", "wall-clock (s): rollouts, attribution, update and evaluation")):
                ax = axes[2 * t + p, c]
                ax.set_xlabel(xlabel)
                ax.set_ylabel(f"{trainer}: {label}")
                ax.grid(alpha=0.3)
        axes[2 * t, 0].legend()
    fig.suptitle("RLHF detoxification: mean and 95% CI over seeds")
    fig.tight_layout()
    return fig
