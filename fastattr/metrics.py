"""The paper's efficiency metrics (docs/reproduction.md defines them) and the statistics `fastattr compare` reports.

For a standard-PPO curve (baseline) and a method's curve from the same seed, both evaluated after every round:
    m(v)       first round r >= 1 whose evaluation return is >= v
    levels     the values standard PPO reached: each new record high of its curve (rounds >= 1), i.e. every v
               with m_std(v) defined; the peak v* is the last one
    reduction  1 - m_method(v) / m_std(v)   (a fraction; x100 for the paper's %)
    SE_ave     mean reduction over the levels
    SE_ave (grid)  the same over 20 evenly spaced returns between standard's first evaluation (exclusive) and its
               peak (inclusive): the paper does not say which levels it averages over; record highs crowd the
               plateau, where both methods sit, so the two readings can differ by a factor of ~2 (FrozenLake)
    SE_peak    reduction at v*
    RT_peak    1 - T_method(m_method(v*)) / T_std(m_std(v*)), T(r) the cumulative time through round r:
               `opt` = optimisation + influence time only (the paper's Table 5), or
               `train` = full training wall-clock (rollouts + influence + optimisation; evaluation excluded);
               also `updates` = optimiser steps instead of seconds: a load-independent proxy of the optimisation
               work, since wall-clock on a shared machine moves with the other processes' load
A level the method never reaches within its budget counts as reached one round after the longer of the two runs'
budgets (time: its total plus one mean round per round up to there), so it lowers the reduction, and an unreached
level never counts as fewer rounds than standard PPO's, even for a method run on a shorter budget; `censored` counts
such levels. Seeds are paired (seed s of the method against seed s of standard PPO, which share theta(0) and the
first buffer); the mean +- s.e. is over seeds. Final-return gain: paired differences of the last evaluation, mean
with a t-based confidence interval (df = seeds - 1; 2.776 for 5 seeds at 95%, as the paper's Table 4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import analysis, store


@dataclass
class Curve:
    """One run's evaluated rounds. rounds/steps/returns: evaluated rounds only (round 0 = initial policy, kept for
    plots, ignored by the metrics); opt/train: cumulative seconds through each of those rounds."""

    rounds: np.ndarray
    steps: np.ndarray
    returns: np.ndarray
    opt: np.ndarray
    train: np.ndarray
    last_round: int
    mean_round_opt: float
    mean_round_train: float
    updates: np.ndarray | None = None  # cumulative optimiser steps (a load-independent measure of optimisation work)
    mean_round_updates: float = 0.0
    # UPDATE_STATS -> its mean over the trained rounds of each third of training (first, middle, last)
    phases: dict | None = None

    def trained(self) -> "Curve":
        keep = self.rounds >= 1
        upd = self.updates[keep] if self.updates is not None else None
        return Curve(self.rounds[keep], self.steps[keep], self.returns[keep], self.opt[keep], self.train[keep],
                     self.last_round, self.mean_round_opt, self.mean_round_train, upd, self.mean_round_updates,
                     self.phases)


# Per-round update diagnostics of metrics.jsonl that `summarize` reports per third of training: how far each
# update moves the policy (approx. KL, clip fraction) and how much of the buffer it used.
UPDATE_STATS = ("approx_kl", "clipfrac", "kept_fraction")


def phase_means(rows: list[dict]) -> dict[str, list[float]]:
    """Mean of each UPDATE_STATS key over the trained rounds (round >= 1) in each third of training."""
    trained = [r for r in rows if r["round"] >= 1]
    thirds = np.array_split(np.arange(len(trained)), 3)
    out = {}
    for key in UPDATE_STATS:
        vals = [[trained[i][key] for i in part if trained[i].get(key) is not None] for part in thirds]
        out[key] = [float(np.mean(v)) if v else math.nan for v in vals]
    return out


def curve_from_rows(rows: list[dict]) -> Curve:
    rows = sorted(rows, key=lambda r: r["round"])
    opt = np.cumsum([(r.get("attr_seconds") or 0.0) + (r.get("update_seconds") or 0.0) for r in rows])
    train = np.cumsum([r.get("train_seconds") or 0.0 for r in rows])
    upd = np.cumsum([r.get("optimizer_steps") or 0 for r in rows]).astype(np.float64)
    ev = [i for i, r in enumerate(rows) if r.get("eval_return") is not None]
    n_trained = max(sum(1 for r in rows if r["round"] >= 1), 1)
    return Curve(
        rounds=np.array([rows[i]["round"] for i in ev], dtype=np.int64),
        steps=np.array([rows[i]["global_step"] for i in ev], dtype=np.int64),
        returns=np.array([rows[i]["eval_return"] for i in ev], dtype=np.float64),
        opt=opt[ev] if ev else np.zeros(0), train=train[ev] if ev else np.zeros(0),
        last_round=int(rows[-1]["round"]) if rows else 0,
        mean_round_opt=float(opt[-1]) / n_trained if rows else 0.0,
        mean_round_train=float(train[-1]) / n_trained if rows else 0.0,
        updates=upd[ev] if ev else np.zeros(0), mean_round_updates=float(upd[-1]) / n_trained if rows else 0.0,
        phases=phase_means(rows),
    )


def load_curve(run_dir, rounds: int | None = None) -> Curve:
    """The run's curve; with `rounds`, only its rounds 0..rounds, i.e. the run a budget of `rounds` rounds would
    have given (the budget sets nothing but the number of rounds: tests/test_ppo.py checks it)."""
    rows = store.read_jsonl(Path(run_dir) / "metrics.jsonl")
    if rounds is not None:
        have = max((r["round"] for r in rows), default=0)
        if have < rounds:
            raise ValueError(f"{run_dir} has {have} rounds, fewer than the {rounds} asked for; lower the rounds "
                             f"or finish the run")
        rows = [r for r in rows if r["round"] <= rounds]
    return curve_from_rows(rows)


GRID_LEVELS = 20


def first_reach(rounds, returns, v: float) -> int | None:
    """The first round whose return is >= v, or None."""
    hit = np.nonzero(np.asarray(returns) >= v)[0]
    return int(np.asarray(rounds)[hit[0]]) if len(hit) else None


def levels_reached(rounds, returns) -> list[tuple[float, int]]:
    """(v, m_std(v)) for every record high of the curve, in order; the last is the peak."""
    out, best = [], -math.inf
    for r, v in zip(rounds, returns):
        if v > best:
            best = v
            out.append((float(v), int(r)))
    return out


def sample_efficiency(std: Curve, other: Curve) -> dict:
    """SE_ave, SE_peak (fractions) and RT_peak (opt and train time) of `other` against `std` for one seed pair."""
    s, o = std.trained(), other.trained()
    levels = levels_reached(s.rounds, s.returns)
    if not levels:
        raise ValueError("the standard-PPO curve has no evaluated round >= 1; cannot compute SE metrics")
    censor_round = max(o.last_round, s.last_round) + 1  # never reached: after both budgets (no round saved)
    reds, censored = [], 0
    for v, m_std in levels:
        m = first_reach(o.rounds, o.returns, v)
        if m is None:
            censored += 1
            m = censor_round
        reds.append(1.0 - m / m_std)
    v_peak, m_std_peak = levels[-1]
    m_peak = first_reach(o.rounds, o.returns, v_peak)
    grid_reds = []
    for v in np.linspace(float(s.returns[0]), v_peak, GRID_LEVELS + 1)[1:]:
        m_std = first_reach(s.rounds, s.returns, v)
        m = first_reach(o.rounds, o.returns, v)
        grid_reds.append(1.0 - (censor_round if m is None else m) / m_std)

    def time_at(c: Curve, m: int | None, key: str) -> float:
        t = getattr(c, key)
        if m is None:
            extra = {"opt": c.mean_round_opt, "train": c.mean_round_train, "updates": c.mean_round_updates}[key]
            return float(t[-1] if len(t) else 0.0) + extra * (censor_round - c.last_round)
        return float(t[np.nonzero(c.rounds == m)[0][0]])

    rt = {}
    for key in ("opt", "train", "updates"):
        if key == "updates" and (s.updates is None or o.updates is None):
            rt[key] = float("nan")
            continue
        t_std = time_at(s, m_std_peak, key)
        rt[key] = 1.0 - time_at(o, m_peak, key) / t_std if t_std > 0 else float("nan")
    return {
        "se_ave": float(np.mean(reds)), "se_ave_grid": float(np.mean(grid_reds)), "se_peak": float(reds[-1]), "rt_peak_opt": rt["opt"],
        "rt_peak_train": rt["train"], "rt_peak_updates": rt["updates"], "n_levels": len(levels),
        "censored_levels": censored,
        "peak_censored": m_peak is None, "std_peak": v_peak, "m_std_peak": m_std_peak, "m_peak": m_peak,
    }


def mean_se(xs) -> tuple[float, float, int]:
    """Mean and standard error (sample std / sqrt(n)) of the finite values; se is nan for n < 2."""
    a = np.asarray([x for x in xs if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(a) == 0:
        return float("nan"), float("nan"), 0
    se = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("nan")
    return float(a.mean()), se, int(len(a))


def t_interval(xs, conf: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, lo, hi, n) of the finite values of xs (None skipped): analysis.t_ci; lo = hi = nan for n < 2."""
    a = np.asarray([x for x in xs if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(a) == 0:
        return float("nan"), float("nan"), float("nan"), 0
    ci = analysis.t_ci(a, conf)
    return ci.mean, ci.lo, ci.hi, ci.n


def final_gain(std_finals: dict[int, float], other_finals: dict[int, float], conf: float = 0.95) -> dict:
    """Paired final-return gain (other - std) over the seeds both have, with a t-based CI."""
    seeds = sorted(set(std_finals) & set(other_finals))
    diffs = [other_finals[s] - std_finals[s] for s in seeds]
    mean, lo, hi, n = t_interval(diffs, conf)
    return {"mean": mean, "ci_low": lo, "ci_high": hi, "n": n, "conf": conf, "seeds": seeds}


def band(curves: list[np.ndarray], conf: float = 0.95, bounds: tuple[float, float] | None = None) \
        -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and t-based CI across seeds at each index, over the common length of the curves; the CI clipped to
    `bounds` (the range the return can take: a band below 0 for a return in [0, 1] says nothing)."""
    from scipy import stats

    n = min(len(c) for c in curves)
    a = np.stack([np.asarray(c[:n], dtype=np.float64) for c in curves])
    mean = a.mean(0)
    if len(a) < 2:
        return mean, mean, mean
    half = stats.t.ppf((1 + conf) / 2, len(a) - 1) * a.std(0, ddof=1) / math.sqrt(len(a))
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = np.clip(lo, *bounds), np.clip(hi, *bounds)
    return mean, lo, hi


def summarize(curves: dict[str, dict[int, Curve]], baseline: str = "ppo", conf: float = 0.95) -> dict:
    """Per method: final return (mean +- s.e.), and against the baseline SE_ave, SE_peak, RT_peak (opt, train) as
    mean +- s.e. over paired seeds, and the final-return gain with a t-based CI. Seeds whose runs have not finished
    are left out (listed under `seeds`)."""
    out = {"baseline": baseline, "conf": conf, "methods": {}}
    finals = {m: {s: float(c.returns[-1]) for s, c in runs.items() if len(c.trained().returns)}
              for m, runs in curves.items()}
    for method, runs in curves.items():
        mean, se, n = mean_se(finals[method].values())
        entry = {"seeds": sorted(runs), "final_return": {"mean": mean, "se": se, "n": n},
                 "rounds": max((c.last_round for c in runs.values()), default=0)}
        phased = [c.phases for c in runs.values() if c.phases]
        if phased:  # mean +- s.e. over seeds of each run's phase mean
            entry["update_phases"] = {key: [dict(zip(("mean", "se", "n"), mean_se(
                [p[key][i] for p in phased if np.isfinite(p[key][i])]))) for i in range(3)] for key in UPDATE_STATS}
        if method != baseline and baseline in curves:
            per_seed = {}
            for s in sorted(set(runs) & set(curves[baseline])):
                if len(curves[baseline][s].trained().returns) and len(runs[s].trained().returns):
                    per_seed[s] = sample_efficiency(curves[baseline][s], runs[s])
            for key in ("se_ave", "se_ave_grid", "se_peak", "rt_peak_opt", "rt_peak_train", "rt_peak_updates"):
                m, e, k = mean_se([d[key] for d in per_seed.values()])
                entry[key] = {"mean": m, "se": e, "n": k}
            entry["censored_levels"] = sum(d["censored_levels"] for d in per_seed.values())
            entry["peak_censored_seeds"] = [s for s, d in per_seed.items() if d["peak_censored"]]
            entry["per_seed"] = {str(s): d for s, d in per_seed.items()}
            entry["final_gain"] = final_gain(finals[baseline], finals[method], conf)
            paired = entry["final_gain"]["seeds"]  # both final returns over the same seeds (final_return: own seeds)
            entry["final_return_paired"] = {
                name: dict(zip(("mean", "se", "n"), mean_se([finals[name][s] for s in paired])))
                for name in (baseline, method)}
        out["methods"][method] = entry
    return out


def _pct(d: dict) -> str:
    if d is None or not np.isfinite(d["mean"]):
        return "n/a"
    se = f" ± {100 * d['se']:.1f}%" if np.isfinite(d["se"]) else ""
    return f"{100 * d['mean']:.1f}%{se}"


def to_markdown(summary: dict, title: str = "") -> str:
    base = summary["baseline"]
    lines = [f"# {title}" if title else "# Comparison", ""]
    lines.append(f"Against `{base}`, paired by seed; mean ± s.e. over seeds (the definitions of §5 of Hu et al., "
                 "NeurIPS 2025; see fastattr/metrics.py). RT_peak (opt) counts optimisation + influence time only, as "
                 "the paper's Table 5; RT_peak (train) counts the full training wall-clock (rollouts too, evaluation "
                 "excluded); RT_peak (opt. steps) counts optimiser steps, which no other process's load can move. "
                 "SE_ave averages over standard PPO's record highs, SE_ave (grid) over 20 evenly spaced returns up to "
                 "its peak.")
    lines.append("")
    lines.append("| method | seeds | final return | SE_ave | SE_ave (grid) | SE_peak | RT_peak (opt) | RT_peak (train) | "
                 f"RT_peak (opt. steps) | final gain vs {base} ({int(100 * summary['conf'])}% CI) |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for method, e in summary["methods"].items():
        fr = e["final_return"]
        final = f"{fr['mean']:.4g} ± {fr['se']:.2g}" if np.isfinite(fr["se"]) else f"{fr['mean']:.4g}"
        if method == base:
            lines.append(f"| {method} | {fr['n']} | {final} | – | – | – | – | – | – | – |")
            continue
        g = e.get("final_gain")
        gain = (f"{g['mean']:+.4g} [{g['ci_low']:+.4g}, {g['ci_high']:+.4g}]" if g and np.isfinite(g["ci_low"])
                else (f"{g['mean']:+.4g}" if g and np.isfinite(g["mean"]) else "n/a"))
        lines.append(f"| {method} | {fr['n']} | {final} | {_pct(e.get('se_ave'))} | {_pct(e.get('se_ave_grid'))} | "
                     f"{_pct(e.get('se_peak'))} | "
                     f"{_pct(e.get('rt_peak_opt'))} | {_pct(e.get('rt_peak_train'))} | "
                     f"{_pct(e.get('rt_peak_updates'))} | {gain} |")
    notes = [f"{m}: {e['censored_levels']} level(s) never reached (counted one round after the longer budget); "
             f"peak not reached for seeds {e['peak_censored_seeds']}" for m, e in summary["methods"].items()
             if e.get("censored_levels")]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    lines += update_phases_markdown(summary)
    return "\n".join(lines) + "\n"


def update_phases_markdown(summary: dict) -> list[str]:
    """How far each method's updates move the policy, per third of training (the mean over seeds; s.e. in the JSON)."""
    methods = {m: e["update_phases"] for m, e in summary["methods"].items() if e.get("update_phases")}
    if not methods:
        return []

    def cell(d, fmt):
        return fmt.format(d["mean"]) if np.isfinite(d["mean"]) else "n/a"

    lines = ["", "Per-round update size: mean over the rounds of each third of training, then over seeds (s.e. in "
             "summary.json, `update_phases`):",
             "", "| method | approx. KL (first / middle / last third) | clip fraction | kept fraction |",
             "|---|---|---|---|"]
    for m, ph in methods.items():
        cols = [" / ".join(cell(d, fmt) for d in ph[key])
                for key, fmt in (("approx_kl", "{:.2g}"), ("clipfrac", "{:.2g}"), ("kept_fraction", "{:.3f}"))]
        lines.append(f"| {m} | " + " | ".join(cols) + " |")
    return lines
