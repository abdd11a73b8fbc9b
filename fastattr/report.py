"""`fastattr report RUN_OR_COMPARE_DIR`: one self-contained report.html (plots embedded as base64 PNG, no external
files or scripts) bringing together, for a run dir or a compare dir of runs:

  1. Overview        env, methods, seeds, rounds, key hyperparameters
  2. Learning curves return vs env steps, mean and 95% t-interval over seeds per method
  3. Scores          the distribution of per-record return-target scores in every saved round
  4. Cost            attribution time per round next to the PPO update and rollout time
  5. Diagnosis       top/bottom records of a round (runs `fastattr diagnose` on one round if none was written)
  6. Behaviour       `fastattr behaviour` outputs (action-target influence of a probe, roughness, phases)
  7. Intervention    `fastattr intervene` outputs (Δreturn without negative / random records, with CIs)
  8. Validation      `fastattr validate` outputs (first-order predicted vs actual change of the target)

For an RLHF run dir (`fastattr rlhf`) or compare dir (`fastattr compare --rlhf`), recognised by the trainer, reward
and toxicity in its metrics.jsonl:

  1. Overview        trainers, methods, seeds, rounds, the configuration every run shares
  2. Curves          reward and toxicity vs rounds and vs wall-clock, mean and 95% t-interval over seeds per method
  3. Summary         final reward and toxicity, rounds and optimisation time to PPO's final reward (summary.md)
  4. Cost            attribution time per round next to the update and rollout time
  5. Records         the highest- and lowest-scoring records of a few rounds as text (records.jsonl)

A section whose inputs are missing says which command produces them, so the report is always complete.
"""
from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import io
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from . import analysis, runinfo, store
from .info import git_commit

SECTIONS = [("overview", "Overview"), ("curves", "Learning curves"), ("scores", "Score distributions per round"),
            ("cost", "Attribution cost per round"), ("diagnosis", "Diagnosis of learning"),
            ("behaviour", "Behaviour formation"), ("intervention", "Targeted intervention"),
            ("validation", "Counterfactual validation")]
RLHF_SECTIONS = [("overview", "Overview"), ("curves", "Reward and toxicity"), ("summary", "Summary"),
                 ("cost", "Attribution cost per round"), ("records", "Top and bottom records")]
RLHF_KEYS = ("trainer", "reward", "toxicity")  # in every metrics.jsonl row of `fastattr rlhf`

RETURN_KEYS = ("eval_return", "eval/return_mean", "eval/mean_return", "eval/return", "charts/eval_return", "charts/episodic_return",
               "charts/episode_return", "rollout/ep_rew_mean")
METHOD_KEYS = ("method", "filter", "algo")

# ---------------------------------------------------------------------------------------------------------------------
# Finding runs


def find_runs(root: Path, max_depth: int = 3) -> list[runinfo.Run]:
    """The run dir itself, or every run dir below a compare dir (a dir with metrics.jsonl, args.json or rounds)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist")

    def is_run(p: Path) -> bool:
        return any((p / f).exists() for f in ("metrics.jsonl",) + runinfo.ARGS_FILES) or bool(store.saved_rounds(p))

    if is_run(root):
        return [runinfo.load_run(root)]
    found, frontier = [], [root]
    for _ in range(max_depth):
        nxt = []
        for d in frontier:
            for c in sorted(p for p in d.iterdir() if p.is_dir()):
                (found if is_run(c) else nxt).append(c)
        frontier = nxt
    if not found:
        raise FileNotFoundError(
            f"{root} holds no fastattr run (no metrics.jsonl, args.json or attribution/ below it, {max_depth} levels "
            "deep); point `fastattr report` at a dir written by `fastattr train` or `fastattr compare`"
        )
    return [runinfo.load_run(p) for p in found]


def method_of(run: runinfo.Run) -> str:
    """The run's method from its args ('ppo', 'iif (p=0.5)', ...), else the name of the dir holding its seeds."""
    for key in METHOD_KEYS:
        if isinstance(run.args.get(key), str):
            m = run.args[key]
            if m in ("iif", "random") and _num(run.args.get("p")):  # random drops as many records as iif at p
                return f"{m} (p={run.args['p']:g})"
            return m
    return run.path.parent.name if run.name.startswith("seed") else run.name


def seed_of(run: runinfo.Run):
    return run.args.get("seed", run.name)


def pick_key(metrics: list[dict], candidates, contains: str | None = None) -> str | None:
    keys = set().union(*(m.keys() for m in metrics)) if metrics else set()
    for k in candidates:
        if k in keys:
            return k
    if contains:
        for k in sorted(keys):
            if contains in k and "std" not in k and all(_num(m.get(k)) for m in metrics if k in m):
                return k
    return None


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def series(metrics: list[dict], y: str, x: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(m[x], m[y]) for m in metrics if _num(m.get(x)) and _num(m.get(y)) and np.isfinite(m[y])]
    if not pts:
        return np.zeros(0), np.zeros(0)
    a = np.array(pts, dtype=np.float64)
    return a[:, 0], a[:, 1]


# ---------------------------------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 10, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.grid": True, "grid.alpha": 0.25})
    return plt


def fig_to_png(fig, **savefig_kwargs) -> bytes:
    """PNG bytes of a matplotlib figure at the reports' resolution; closes the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, **savefig_kwargs)
    _plt().close(fig)
    return buf.getvalue()


def fig_to_b64(fig) -> str:
    return base64.b64encode(fig_to_png(fig, bbox_inches="tight")).decode("ascii")


def file_b64(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def _return_range(runs: list[runinfo.Run]) -> tuple[float, float] | None:
    """The return range of the runs' env (probes.RETURN_RANGES)."""
    from .probes import return_range

    env_ids = {r.args.get("env_id") for r in runs if r.args}
    return return_range(env_ids.pop()) if len(env_ids) == 1 else None


def curves_figure(runs: list[runinfo.Run]) -> tuple[str | None, list[dict]]:
    """Return vs env steps per method: mean over seeds with a 95% t-interval band (at the x values every seed of the
    method has: a seed missing an evaluation does not shift the others). Returns (png base64 or None, a table of
    final returns per method)."""
    metrics_all = [m for r in runs for m in r.metrics]
    y = pick_key(metrics_all, RETURN_KEYS, contains="return")
    if y is None:
        return None, []
    x = "global_step" if pick_key(metrics_all, ("global_step",)) else "round"
    by_method: dict[str, list] = defaultdict(list)
    for r in runs:
        xs, ys = series(r.metrics, y, x)
        if len(xs):
            by_method[method_of(r)].append((xs, ys))
    if not by_method:
        return None, []
    bounds = _return_range(runs)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    table = []
    for c, (method, curves) in zip(COLOURS * 4, sorted(by_method.items())):
        xs = curves[0][0]  # the x values every seed has (a seed may lack an evaluation), each seed indexed by x
        for cx, _ in curves[1:]:
            xs = np.intersect1d(xs, cx)
        if not len(xs):
            continue
        n = len(xs)
        ys = np.stack([cy[np.searchsorted(cx, xs)] for cx, cy in curves])
        mean = ys.mean(0)
        ax.plot(xs, mean, color=c, lw=2, label=f"{method} ({len(curves)} seed{'s' * (len(curves) > 1)})")
        if len(curves) > 1:
            cis = [analysis.t_ci(ys[:, j]) for j in range(n)]
            lo, hi = np.array([ci.lo for ci in cis]), np.array([ci.hi for ci in cis])
            if bounds is not None:  # the range the return can take
                lo, hi = np.clip(lo, *bounds), np.clip(hi, *bounds)
            ax.fill_between(xs, lo, hi, color=c, alpha=0.18, lw=0)
        final = analysis.t_ci(ys[:, -1])
        table.append({"method": method, "seeds": len(curves), "final": final.as_dict(),
                      "peak_mean": float(mean.max()), "x_final": float(xs[-1])})
    ax.set_xlabel("environment steps" if x == "global_step" else "round")
    ax.set_ylabel(f"return ({y}, per episode)")
    ax.set_title("Learning curves (mean, shaded: 95% t-interval over seeds)")
    ax.legend(fontsize=9)
    return fig_to_b64(fig), table


def load_scores(run: runinfo.Run, key: str = "score_return", max_rounds: int = 200) -> dict[int, np.ndarray]:
    """Per saved round, the score array only (rounds thinned evenly to at most max_rounds)."""
    rounds = run.rounds
    if len(rounds) > max_rounds:
        rounds = [rounds[int(i)] for i in np.linspace(0, len(rounds) - 1, max_rounds)]
    out = {}
    for k in rounds:
        try:
            data = store.load_round(run.path, k, keys=(key,))
        except ValueError as e:  # a damaged round file: the report goes on without it
            print(f"fastattr report: leaving out round {k}: {e}", file=sys.stderr)
            continue
        if key in data:
            s = np.asarray(data[key], dtype=np.float64)
            out[k] = s.reshape(len(s), -1).mean(1) if s.ndim > 1 else s
    return out


def scores_figure(run: runinfo.Run) -> tuple[str | None, list[dict]]:
    scores = load_scores(run)
    if not scores:
        return None, []
    ks = np.array(sorted(scores))
    q = np.array([np.quantile(scores[k], [0.05, 0.25, 0.5, 0.75, 0.95]) for k in ks])
    neg = np.array([(scores[k] < 0).mean() for k in ks])
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    ax.fill_between(ks, q[:, 0], q[:, 4], color="#1f77b4", alpha=0.15, lw=0, label="5–95%")
    ax.fill_between(ks, q[:, 1], q[:, 3], color="#1f77b4", alpha=0.35, lw=0, label="25–75%")
    ax.plot(ks, q[:, 2], color="#1f77b4", lw=2, label="median")
    ax.axhline(0, color="k", lw=0.6)
    lin = float(np.quantile(np.abs(q[:, 1:4]), 0.5)) or 1e-12
    ax.set_yscale("symlog", linthresh=lin)
    ax.set_xlabel("round")
    ax.set_ylabel("influence on the return target (a.u., symlog)")
    ax.set_title(f"{run.name}: per-record scores by round")
    ax.legend(fontsize=8, loc="upper right")
    ax2.plot(ks, 100 * neg, color="#d62728", marker="o", ms=3)
    ax2.set_ylim(0, 100)
    ax2.set_xlabel("round")
    ax2.set_ylabel("records with negative influence (%)")
    ax2.set_title("share of harmful records")
    fig.tight_layout()
    rows = [{"round": int(k), "n": int(len(scores[k])), "negative_frac": float(n_), "median": float(qq[2]),
             "q5": float(qq[0]), "q95": float(qq[4])} for k, n_, qq in zip(ks, neg, q)]
    return fig_to_b64(fig), rows


# fastattr.ppo's per-round timings, attribution first; other per-round timings found in metrics.jsonl follow.
COST_KEYS = ("attr_seconds", "update_seconds", "rollout_seconds", "eval_seconds", "io_seconds")
CUMULATIVE_KEYS = ("wall_seconds", "time", "train_seconds")


def cost_keys(metrics: list[dict]) -> dict[str, str]:
    """{label: key} of per-round timings in metrics.jsonl, in seconds or milliseconds (by the key's suffix).
    Cumulative clocks and timestamps are left out."""
    keys = set().union(*(m.keys() for m in metrics)) if metrics else set()
    out = {k: k for k in COST_KEYS if k in keys}
    for k in sorted(keys - set(COST_KEYS) - set(CUMULATIVE_KEYS)):
        low = k.lower()
        timing = low.endswith(("_ms", "_s", "/ms", "/s", "_sec", "_seconds")) or "time/" in low
        if timing and all(_num(m.get(k)) for m in metrics if k in m) and "sps" not in low:
            out[k] = k
    return out


def cost_figure(runs: list[runinfo.Run]) -> tuple[str | None, list[dict]]:
    run = next((r for r in runs if cost_keys(r.metrics)), None)
    if run is None:
        return None, []
    ck = cost_keys(run.metrics)
    x = "round" if pick_key(run.metrics, ("round",)) else "global_step"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    rows = []
    for c, (label, key) in zip(COLOURS * 4, ck.items()):
        xs, ys = series(run.metrics, key, x)
        xs, ys = xs[ys > 0], ys[ys > 0]            # round 0 (the initial evaluation) has no update or scoring
        ms = ys if key.lower().endswith("ms") else ys * 1000.0
        is_attr = "attr" in key.lower() or "score" in key.lower()
        ax.plot(xs, ms, color=c, lw=2.5 if is_attr else 1.3, ls="-" if is_attr else "--", label=key)
        rows.append({"key": key, "median_ms": float(np.median(ms)) if len(ms) else float("nan"),
                     "total_s": float(ms.sum() / 1000.0)})
    ax.set_yscale("log")
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel("wall-clock per round (ms, log scale)")
    ax.set_title(f"{run.name}: attribution cost vs the rest of the round")
    ax.legend(fontsize=8)
    return fig_to_b64(fig), rows


def intervention_figure(res: dict) -> str | None:
    """Bars of Δreturn (filtered − unfiltered) per round and arm with 95% CIs over seeds."""
    rows = [r for r in res.get("summary") or [] if r["arm"] != "unfiltered"]   # the reference: Δ = 0 by definition
    if not rows:
        return None
    arms = sorted({r["arm"] for r in rows})
    rounds = sorted({r["round"] for r in rows})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rounds) + 3), 4.2))
    width = 0.8 / max(len(arms), 1)
    for j, (arm, c) in enumerate(zip(arms, ["#2ca02c", "#7f7f7f", "#1f77b4", "#ff7f0e"])):
        pts = [next((r for r in rows if r["arm"] == arm and r["round"] == k), None) for k in rounds]
        xs = np.arange(len(rounds)) + (j - (len(arms) - 1) / 2) * width
        means = np.array([p["delta"]["mean"] if p else np.nan for p in pts])
        lo = np.array([p["delta"]["lo"] if p else np.nan for p in pts])
        hi = np.array([p["delta"]["hi"] if p else np.nan for p in pts])
        err = np.vstack([means - lo, hi - means])
        ax.bar(xs, means, width, color=c, label=arm, yerr=np.nan_to_num(err), capsize=3)
    ax.axhline(0, color="k", lw=0.7)
    ax.set_xticks(np.arange(len(rounds)), [f"round {k}" for k in rounds])
    ax.set_ylabel("Δ return vs unfiltered retrain (per episode)")
    ax.set_title(f"{res.get('env_id') or ''}: retrain from θ(k) without the selected records "
                 f"(95% t-interval over {len(res.get('seeds') or [])} seeds)", fontsize=10)
    ax.legend(fontsize=9)
    return fig_to_b64(fig)


# ---------------------------------------------------------------------------------------------------------------------
# HTML

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2b3a;color:#fff;padding:22px 40px}header h1{margin:0;font-size:26px}
header p{margin:6px 0 0;color:#c9d3df;font-size:14px}
nav{background:#fff;border-bottom:1px solid #dde2e8;padding:8px 40px;position:sticky;top:0;z-index:2}
nav a{margin-right:18px;color:#2b5d8a;text-decoration:none;font-size:14px}
main{max-width:1280px;margin:0 auto;padding:10px 40px 60px}
section{background:#fff;border:1px solid #dde2e8;border-radius:8px;margin:22px 0;padding:18px 26px}
section h2{margin:0 0 10px;font-size:20px;color:#1d2b3a}
img{max-width:100%;height:auto;display:block;margin:10px 0}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border-bottom:1px solid #e6e9ee;padding:4px 10px;text-align:right}th{background:#f0f3f6}
td:first-child,th:first-child{text-align:left}
.note{color:#6b7480;font-size:13px}.missing{color:#8a6d3b;background:#fcf8e3;padding:8px 12px;border-radius:4px}
.kpi{display:inline-block;margin:6px 24px 6px 0}.kpi b{display:block;font-size:22px;color:#1d2b3a}
.kpi span{font-size:12px;color:#6b7480}ul.findings li{margin:3px 0}
code{background:#f0f3f6;padding:1px 4px;border-radius:3px}
"""


def _img(b64: str | None, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">' if b64 else ""


def _missing(text: str) -> str:
    return f'<p class="missing">{text}</p>'


def _table(rows: list[dict], cols: list[tuple[str, str]] | None = None, fmt="{:.4g}") -> str:
    if not rows:
        return ""
    cols = cols or [(k, k) for k in rows[0]]
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in cols)
    body = []
    for r in rows:
        cells = []
        for key, _ in cols:
            v = r
            for part in key.split("."):
                v = v.get(part) if isinstance(v, dict) else None
            if _num(v) and not isinstance(v, int):
                text = fmt.format(v) if np.isfinite(v) else "–"
            else:
                text = "–" if v is None else str(v)
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _kpi(value: str, label: str) -> str:
    return f'<div class="kpi"><b>{html.escape(value)}</b><span>{html.escape(label)}</span></div>'


def _outputs(runs: list[runinfo.Run], root: Path, pattern: str) -> list[Path]:
    seen, out = set(), []
    for d in [root] + [r.path for r in runs]:
        for p in sorted(d.glob(pattern)):
            if p.resolve() not in seen:
                seen.add(p.resolve())
                out.append(p)
    return out


def _rel(p: Path, root: Path) -> str:
    rel = str(p.relative_to(root)) if p != root else ""
    return rel if rel not in ("", ".") else p.name


def section_overview(runs, root) -> str:
    envs = sorted({r.env_id or "?" for r in runs})
    methods = sorted({method_of(r) for r in runs})
    seeds = sorted({str(seed_of(r)) for r in runs})
    rounds = max((int(m["round"]) for r in runs for m in r.metrics if _num(m.get("round"))), default=0)
    saved = sum(len(r.rounds) for r in runs)
    parts = [_kpi(", ".join(envs), "environment"), _kpi(str(len(runs)), "runs"),
             _kpi(", ".join(methods), "methods"), _kpi(str(len(seeds)), "seeds"), _kpi(str(rounds), "rounds (max)"),
             _kpi(str(saved), "rounds with saved attribution")]
    a = runs[0].args   # only the arguments every run shares (methods and seeds are shown above)
    keys = [k for k in ("method", "p", "total_timesteps", "n_steps", "num_envs", "batch_size", "n_epochs",
                        "optimizer", "learning_rate", "gamma", "gae_lambda", "clip_coef", "network", "eval_episodes",
                        "env_kwargs") if k in a and all(r.args.get(k) == a[k] for r in runs)]
    rows = [{"argument": k, "value": a[k]} for k in keys]
    return "".join(parts) + (_table(rows) if rows else "") + \
        f'<p class="note">Runs: {", ".join(html.escape(_rel(r.path, root)) for r in runs[:12])}' \
        f'{" …" if len(runs) > 12 else ""}</p>'


def markdown_to_html(md: str) -> str:
    """The subset of markdown `fastattr compare` writes: '#' headings, paragraphs and pipe tables."""
    out, rows = [], []

    def flush():
        if rows:
            head, *body = rows
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>" + "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body) + "</table>")
            rows.clear()

    for line in md.splitlines():
        line = line.strip()
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
            continue
        flush()
        if line.startswith("#"):
            out.append(f"<h3>{html.escape(line.lstrip('#').strip())}</h3>")
        elif line:
            out.append(f'<p class="note">{html.escape(line)}</p>')
    flush()
    return "".join(out)


def section_curves(runs, root: Path | None = None) -> str:
    b64, table = curves_figure(runs)
    if not b64:
        return _missing("No return metric in metrics.jsonl (expected one of " + ", ".join(RETURN_KEYS[:3]) +
                        "): train with <code>fastattr train</code>.")
    summary = root / "summary.md" if root is not None else None
    extra = markdown_to_html(summary.read_text()) if summary is not None and summary.exists() else ""
    return _img(b64, "learning curves") + extra + _table(
        table, [("method", "method"), ("seeds", "seeds"), ("final.mean", "final return (mean)"),
                ("final.lo", "95% CI low"), ("final.hi", "95% CI high"), ("peak_mean", "peak of mean curve"),
                ("x_final", "at step / round")])


def section_scores(runs) -> tuple[str, list]:
    run = next((r for r in runs if r.rounds), None)
    if run is None:
        return _missing("No saved attribution rounds: train with <code>fastattr train ... --save-attribution</code>."), []
    b64, rows = scores_figure(run)
    if not b64:
        return _missing(f"{run.name}: saved rounds have no <code>score_return</code> field."), []
    shown = rows if len(rows) <= 12 else rows[:: max(1, len(rows) // 12)]
    return _img(b64, "score distributions") + \
        '<p class="note">Positive = the record helps the return target, negative = it harms it (paper §3.1). ' \
        f"Shown for run {html.escape(run.name)}.</p>" + _table(
            shown, [("round", "round"), ("n", "records"), ("negative_frac", "negative share"),
                    ("median", "median"), ("q5", "5%"), ("q95", "95%")]), rows


def section_cost(runs) -> str:
    b64, rows = cost_figure(runs)
    if not b64:
        return _missing("No per-round timings in metrics.jsonl (keys with time / _ms / _s).")
    med = {r["key"]: r["median_ms"] for r in rows}
    kpis = ""
    if "attr_seconds" in med and "update_seconds" in med and med["update_seconds"] > 0:
        kpis = _kpi(f"{med['attr_seconds']:.3g} ms", "attribution per round (median)") + \
            _kpi(f"{100 * med['attr_seconds'] / med['update_seconds']:.1f}%", "of the PPO update time") + \
            _kpi(f"{med['update_seconds']:.3g} ms", "PPO update per round (median)")
    return kpis + _img(b64, "attribution cost") + _table(
        rows, [("key", "metric"), ("median_ms", "median per round (ms)"), ("total_s", "total over run (s)")])


def section_diagnosis(runs, root, auto_round: int | None, auto: bool) -> str:
    files = _outputs(runs, root, "diagnose_round_*.json")
    if not files and auto:
        run = next((r for r in runs if r.rounds), None)
        if run is not None:
            from . import diagnose
            k = auto_round if auto_round is not None else run.rounds[min(len(run.rounds) - 1, 5)]
            try:
                diagnose.write_diagnosis(run.path, k, top=16)
                files = _outputs(runs, root, "diagnose_round_*.json")
            except (KeyError, ValueError, FileNotFoundError) as e:
                return _missing(f"Diagnosis of round {k} failed: {html.escape(str(e))}")
    if not files:
        return _missing("No diagnosis: run <code>fastattr diagnose RUN --round k</code> "
                        "(needs rounds saved with --save-attribution).")
    out = []
    for f in files[:4]:
        res = json.loads(f.read_text())
        rho = res["spearman_influence_vs_amc_agae"]["rho"]
        out.append(f"<h3>{html.escape(Path(res['run']).name)}, round {res['round']}</h3>")
        out.append(_kpi(f"{rho:+.2f}", "Spearman(influence, Ā·Â)") +
                   _kpi(f"{res['groups']['bottom']['sign_mismatch_frac']:.0%}",
                        f"bottom {res['top_k']}: sign(Ā) ≠ sign(Â)") +
                   _kpi(f"{res['groups']['buffer']['sign_mismatch_frac']:.0%}", "whole buffer: sign mismatch") +
                   _kpi(f"{res['negative_frac']:.0%}", "records with negative influence"))
        out.append('<ul class="findings">' + "".join(f"<li>{html.escape(x)}</li>" for x in res["findings"]) + "</ul>")
        for key in ("png", "states_png"):
            p = res.get("files", {}).get(key)
            p = f.parent / Path(p).name if p else None
            if p and p.exists():
                out.append(_img(file_b64(p), f"diagnosis {key}"))
    out.append('<p class="note">Ā: Monte Carlo advantage (buffer averages for discrete states, else G−V); Â: GAE '
               "advantage PPO trained on. The paper's Fig. 3(d) prints −0.67 for FrozenLake with influence ranks "
               "counted from the top; here a positive ρ means the same thing: harmful records have Ā·Â &lt; 0.</p>")
    return "".join(out)


def section_json_outputs(runs, root, pattern: str, what: str, how: str, render) -> str:
    files = _outputs(runs, root, pattern)
    if not files:
        return _missing(f"No {what} results: run <code>{how}</code>.")
    return "".join(render(json.loads(f.read_text()), f) for f in files[:6])


def _render_behaviour(res: dict, f: Path) -> str:
    out = [f"<h3>probe <code>{html.escape(str(res.get('probe')))}</code> "
           f"({html.escape(Path(str(res.get('run', f.parent))).name)})</h3>"]
    if res.get("phases"):
        out.append('<ul class="findings">' + "".join(
            f"<li>{html.escape(p['name'])}: rounds {p['start']}–{p['end']} — {html.escape(p.get('why', ''))}</li>"
            for p in res["phases"]) + "</ul>")
    png = f.with_suffix(".png")
    if png.exists():
        out.append(_img(file_b64(png), "behaviour"))
    rows = res.get("rounds") or []
    out.append(_table(rows[:: max(1, len(rows) // 15)] if rows else [],
                      [("round", "round"), ("n_match", "matching records"), ("influence_absmax", "max |I|"),
                       ("top_share", "top records matching the probe"), ("top_same_action", "top with a probe action"),
                       ("assoc_spearman", "Spearman(I, ±Ã)"), ("roughness", "roughness")]))
    return "".join(out)


def _render_intervention(res: dict, f: Path) -> str:
    out = [f"<h3>{html.escape(str(res.get('env_id') or ''))} — seeds {res.get('seeds')}</h3>"]
    b64 = intervention_figure(res)
    out.append(_img(b64, "intervention"))
    out.append(_table(res.get("summary") or [],
                      [("round", "round"), ("arm", "arm"), ("n_dropped", "records dropped"),
                       ("delta.mean", "Δreturn (mean)"), ("delta.lo", "95% CI low"), ("delta.hi", "95% CI high"),
                       ("delta.n", "seeds"), ("target_delta.mean", "ΔJ, return target (mean)")]))
    return "".join(out)


def _render_validation(res: dict, f: Path) -> str:
    out = [f"<h3>{html.escape(str(res.get('env_id') or ''))}</h3>"]
    png = f.with_suffix(".png")
    if png.exists():
        out.append(_img(file_b64(png), "validation"))
    out.append(_table(res.get("summary") or [],
                      [("round", "round"), ("mode", "update"), ("learning_rate", "learning rate"),
                       ("selection", "subsets"), ("n_subsets", "subsets (n)"), ("spearman", "Spearman(pred, actual)"),
                       ("pearson", "Pearson"), ("slope", "actual/pred slope")]))
    out.append('<p class="note">ΔJ: change of the return target J = mean Â·log π over B(k) when a subset is left out '
               "of the update from θ(k); predicted from the scores to first order. sgd-step: one SGD step on the "
               "scored losses (the prediction is exact as lr → 0, slope ≈ 1); ppo: the run's full PPO update.</p>")
    return "".join(out)


def build_report(root, out: str | None = None, diagnose_round: int | None = None, auto_diagnose: bool = True) -> Path:
    """Writes report.html (default: <root>/report.html) and returns its path."""
    root = Path(root)
    runs = find_runs(root)
    if is_rlhf(runs):
        subject, sections, body = "RLHF detoxification", RLHF_SECTIONS, rlhf_sections(runs, root)
    else:
        subject, sections = ", ".join(sorted({r.env_id or "?" for r in runs})), SECTIONS
        body = rl_sections(runs, root, diagnose_round, auto_diagnose)
    path = Path(out) if out else root / "report.html"
    path.write_text(_page(root, subject, sections, body), encoding="utf-8")
    return path


def rl_sections(runs, root: Path, diagnose_round: int | None, auto_diagnose: bool) -> dict[str, str]:
    """The SECTIONS' HTML for runs of `fastattr train`."""
    body: dict[str, str] = {}
    body["overview"] = section_overview(runs, root)
    body["curves"] = section_curves(runs, root)
    body["scores"], _ = section_scores(runs)
    body["cost"] = section_cost(runs)
    body["diagnosis"] = section_diagnosis(runs, root, diagnose_round, auto_diagnose)
    body["behaviour"] = section_json_outputs(runs, root, "behaviour_*.json", "behaviour-formation",
                                             "fastattr behaviour RUN --probe NAME", _render_behaviour)
    body["intervention"] = section_json_outputs(runs, root, "intervene*.json", "intervention",
                                                "fastattr intervene RUN --round k --seeds 0-2", _render_intervention)
    body["validation"] = section_json_outputs(runs, root, "validate*.json", "validation",
                                              "fastattr validate RUN --round k", _render_validation)
    return body


def _page(root: Path, subject: str, sections: list[tuple[str, str]], body: dict[str, str]) -> str:
    """The whole HTML page: header, navigation and the numbered sections."""
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    from . import __version__
    page = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>fastattr report: "
            f"{html.escape(root.name)}</title><style>{CSS}</style></head><body>",
            f"<header><h1>Local data attribution report — {html.escape(subject)}</h1>"
            f"<p>{html.escape(str(root))} · {now} · fastattr {__version__} (commit {git_commit()})</p></header>",
            "<nav>" + "".join(f'<a href="#{sid}">{title}</a>' for sid, title in sections) + "</nav><main>"]
    for i, (sid, title) in enumerate(sections, 1):
        page.append(f'<section id="{sid}"><h2>{i}. {title}</h2>{body[sid]}</section>')
    page.append("</main></body></html>")
    return "\n".join(page)


# ---------------------------------------------------------------------------------------------------------------------
# RLHF runs (`fastattr rlhf`, `fastattr compare --rlhf`)

RLHF_COMPARE = "fastattr compare --rlhf --trainer both --seeds 0-2 --methods ppo,iif,random --rounds 20 --out DIR"
RECORD_RUNS = 4  # runs whose records are shown: the first seed of each trainer and method, at most this many


def is_rlhf(runs: list[runinfo.Run]) -> bool:
    """True when every run was written by `fastattr rlhf` (its metrics rows carry RLHF_KEYS)."""
    return bool(runs) and all(r.metrics and all(k in r.metrics[0] for k in RLHF_KEYS) for r in runs)


def rlhf_sections(runs, root: Path) -> dict[str, str]:
    """The RLHF_SECTIONS' HTML."""
    return {"overview": section_rlhf_overview(runs, root), "curves": section_rlhf_curves(runs),
            "summary": section_rlhf_summary(runs, root), "cost": section_cost(runs),
            "records": section_records(runs, root)}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def section_rlhf_overview(runs, root: Path) -> str:
    first = [r.metrics[0] for r in runs]
    rounds = max(int(m["round"]) for r in runs for m in r.metrics)
    parts = [_kpi(", ".join(sorted({f["trainer"] for f in first})), "trainers"), _kpi(str(len(runs)), "runs"),
             _kpi(", ".join(sorted({f["method"] for f in first})), "methods"),
             _kpi(str(len({f["seed"] for f in first})), "seeds"), _kpi(str(rounds), "rounds (max)")]
    configs = [_flat(json.loads((r.path / "run.json").read_text())["config"]) for r in runs
               if (r.path / "run.json").exists()]
    shared = [{"setting": k, "value": v} for k, v in (configs[0] if configs else {}).items()
              if all(c.get(k) == v for c in configs)]
    return "".join(parts) + _table(shared) + \
        f'<p class="note">Runs: {", ".join(html.escape(_rel(r.path, root)) for r in runs[:12])}' \
        f'{" …" if len(runs) > 12 else ""}</p>'


def section_rlhf_curves(runs) -> str:
    from .rlhf.compare import curves_figure, group

    fig = curves_figure(group([r.metrics for r in runs]))
    return _img(fig_to_b64(fig), "reward and toxicity") + \
        '<p class="note">Evaluated on the test prompts after every round (round 0: the pretrained policy). Reward: ' \
        "the reward model's neutral logit; toxicity: the rate of completions the lexicon rule calls toxic.</p>"


def section_rlhf_summary(runs, root: Path) -> str:
    """summary.md of `fastattr compare --rlhf` when root holds one, else the same summary of the runs found."""
    if (root / "summary.md").exists():
        return markdown_to_html((root / "summary.md").read_text())
    from .rlhf.compare import group, summarize, to_markdown

    budget = min(int(r.metrics[-1]["round"]) for r in runs)
    runs_ = group([[m for m in r.metrics if m["round"] <= budget] for r in runs])
    text = markdown_to_html(to_markdown(summarize(runs_, budget), f"The runs in {root.name}, {budget} rounds"))
    if any("ppo" not in by_method for by_method in runs_.values()):
        text += _missing(f"No ppo run to compare with: <code>{RLHF_COMPARE}</code> runs every method over seeds "
                         "and writes this summary with the paired comparisons.")
    return text


def section_records(runs, root: Path) -> str:
    """The highest- and lowest-scoring records of the first, middle and last round of a few runs."""
    shown, seen = [], set()
    for r in runs:
        key = (r.metrics[0]["trainer"], r.metrics[0]["method"])
        if (r.path / "records.jsonl").exists() and key not in seen:
            seen.add(key)
            shown.append(r)
    if not shown:
        return _missing("No records.jsonl: the methods that score write it every round, e.g. <code>fastattr rlhf "
                        "--method iif --trainer grpo --run-dir DIR</code> (ppo runs score nothing).")
    out = []
    for r in shown[:RECORD_RUNS]:
        lines = store.read_jsonl(r.path / "records.jsonl")
        rows = [{"round": line["round"], "rank": f"{end} {i}", **rec}
                for line in (lines[i] for i in sorted({0, len(lines) // 2, len(lines) - 1}))
                for end in ("top", "bottom") for i, rec in enumerate(line[end], 1)]
        out.append(f"<h3>{html.escape(_rel(r.path, root))}</h3>" + _table(
            rows, [("round", "round"), ("rank", "rank"), ("score", "score"), ("reward", "reward"), ("kept", "kept"),
                   ("prompt", "prompt"), ("completion", "completion")]))
    return "".join(out) + '<p class="note">Score: the record\'s influence on the D_val sequence target (positive: ' \
        "training on it helps the target). Kept: whether the round's filter trained on it. Three rounds per run: " \
        "the first, the middle and the last.</p>"


def main(argv: list[str] | None = None) -> int:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="fastattr report", description=doc[0],
                                epilog="sections:\n" + "\n\n".join(doc[1:4]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="a run dir (fastattr train, fastattr rlhf) or a compare dir (fastattr compare)")
    p.add_argument("--out", default=None, help="output file (default: DIR/report.html)")
    p.add_argument("--diagnose-round", type=int, default=None,
                   help="round to diagnose when no diagnose_round_*.json exists (default: the 6th saved round)")
    p.add_argument("--no-auto-diagnose", action="store_true", help="do not run a diagnosis when none exists")
    a = p.parse_args(argv)
    try:
        path = build_report(a.dir, a.out, a.diagnose_round, not a.no_auto_diagnose)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"fastattr report: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
