"""`fastattr diagnose RUN --round k [--top K]`: the most helpful and most harmful records of one saved round for the
return target, and what they have in common (paper §4.1, Fig. 3).

For the top-K (most positive score) and bottom-K (most negative) records it compares, against the whole buffer:
  - sign mismatch between the GAE advantage Â (what PPO trained on) and a Monte Carlo advantage Ā;
  - |Ā - Â|; the actions, states, rewards and episode ends they share;
and over the whole buffer the Spearman correlation between influence and Ā·Â (the paper reports about -0.67 on
FrozenLake: records whose advantage sign is wrong, Ā·Â < 0, are the harmful ones).

Ā is the paper's buffer average (mean MC return of (s, a) minus that of s) when states are discrete (FrozenLake),
else G_t - V(s_t). Writes <run>/diagnose_round_<k>.{md,json,png} and, for FrozenLake and MiniGrid,
diagnose_round_<k>_states.png (an image grid of the records' states with the action taken).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from . import analysis, runinfo

REQUIRED = ("obs", "actions", "adv_gae", "returns_mc")
ARROWS = {0: (-1, 0), 1: (0, 1), 2: (1, 0), 3: (0, -1)}  # FrozenLake action -> (dx, dy) in image coordinates


# ---------------------------------------------------------------------------------------------------------------------
# Statistics


def _group_stats(idx: np.ndarray, d: dict, env_id: str | None, n_states: int | None = 5) -> dict:
    acts = d["actions"][idx]
    counts = Counter(_key(a) for a in acts)
    states = d.get("state_id")
    out = {
        "n": int(len(idx)),
        "score_mean": float(d["score"][idx].mean()) if len(idx) else float("nan"),
        "sign_mismatch_frac": float(d["mismatch"][idx].mean()) if len(idx) else float("nan"),
        "abs_gap_mean": float(d["gap"][idx].mean()) if len(idx) else float("nan"),
        "adv_gae_mean": float(d["adv_gae"][idx].mean()) if len(idx) else float("nan"),
        "adv_mc_mean": float(d["adv_mc"][idx].mean()) if len(idx) else float("nan"),
        "adv_gae_positive_frac": float((d["adv_gae"][idx] > 0).mean()) if len(idx) else float("nan"),
        "actions": {runinfo.action_name(env_id, a): c / max(len(idx), 1) for a, c in counts.most_common()},
    }
    if "rewards" in d:
        out["reward_mean"] = float(d["rewards"][idx].mean()) if len(idx) else float("nan")
    if "ends" in d:
        out["episode_end_frac"] = float(d["ends"][idx].mean()) if len(idx) else float("nan")
    if states is not None:
        sc = Counter(int(s) for s in states[idx])
        out["states"] = {str(s): c / max(len(idx), 1) for s, c in sc.most_common(n_states)}
    return out


def _key(a):
    a = np.asarray(a)
    return int(a) if a.ndim == 0 and float(a) == int(a) else tuple(np.round(a.reshape(-1), 2).tolist())


def _findings(name: str, g: dict, buf: dict, width: int | None = None) -> list[str]:
    """Plain-language statements of what a group has in common, relative to the whole buffer."""
    out = []
    out.append(
        f"{name}: {g['sign_mismatch_frac']:.0%} have sign(Ā) ≠ sign(Â) (buffer: {buf['sign_mismatch_frac']:.0%}); "
        f"mean |Ā−Â| = {g['abs_gap_mean']:.3g} (buffer: {buf['abs_gap_mean']:.3g})."
    )
    out.append(
        f"{name}: mean Â = {g['adv_gae_mean']:+.3g} but mean Ā = {g['adv_mc_mean']:+.3g}; "
        f"{g['adv_gae_positive_frac']:.0%} have Â > 0 (buffer: {buf['adv_gae_positive_frac']:.0%})."
    )
    if g["actions"]:
        act, frac = next(iter(g["actions"].items()))
        base = buf["actions"].get(act, 0.0)
        out.append(f"{name}: most common action {act} ({frac:.0%}, buffer: {base:.0%}).")
    if "states" in g and g["states"]:
        s, frac = next(iter(g["states"].items()))
        where = f" (row {int(s) // width}, col {int(s) % width})" if width else ""
        out.append(f"{name}: most common state {s}{where} ({frac:.0%}, buffer: {buf['states'].get(s, 0.0):.0%}).")
    if "episode_end_frac" in g and g["episode_end_frac"] > 2 * buf["episode_end_frac"] + 0.05:
        out.append(f"{name}: {g['episode_end_frac']:.0%} end an episode (buffer: {buf['episode_end_frac']:.0%}).")
    return out


def diagnose_round(run_dir, k: int, top: int = 20, score_key: str = "score_return", mc_method: str = "auto",
                   env_id: str | None = None) -> tuple[dict, dict]:
    """Returns (result, data): `result` is JSON-able (per-group stats, correlations, findings, the top/bottom records),
    `data` holds the per-record arrays used (score, adv_gae, adv_mc, mismatch, gap, obs, actions, ...)."""
    raw = runinfo.load_round(run_dir, k, required=REQUIRED + (score_key,))
    if env_id is None:
        try:
            env_id = runinfo.load_run(run_dir).env_id
        except FileNotFoundError:
            env_id = None
    n = len(raw[score_key])
    score = np.asarray(raw[score_key], dtype=np.float64)
    if score.ndim != 1:
        raise ValueError(f"{score_key} in round {k} has shape {score.shape}; diagnose needs one score per record "
                         "(use --score score_return, or reduce multi-target scores first)")
    obs = raw["obs"].reshape(n, *raw["obs"].shape[1:]) if raw["obs"].ndim > 1 else raw["obs"]
    actions = raw["actions"].reshape(n, -1).squeeze(-1) if raw["actions"].ndim <= 2 and (
        raw["actions"].ndim == 1 or raw["actions"].shape[1] == 1) else raw["actions"]
    adv_gae = np.asarray(raw["adv_gae"], dtype=np.float64).reshape(-1)
    returns = np.asarray(raw["returns_mc"], dtype=np.float64).reshape(-1)
    values = np.asarray(raw["values"], dtype=np.float64).reshape(-1) if "values" in raw else None
    adv_mc = analysis.mc_advantage(returns, values, obs, actions, method=mc_method)
    method = "buffer" if mc_method == "buffer" or (mc_method == "auto" and analysis.is_discrete_states(obs)) \
        else "baseline"
    d = {
        "score": score, "obs": obs, "actions": actions, "adv_gae": adv_gae, "adv_mc": adv_mc, "returns_mc": returns,
        "mismatch": analysis.sign_mismatch(adv_mc, adv_gae), "gap": analysis.advantage_gap(adv_mc, adv_gae),
    }
    if "rewards" in raw:
        d["rewards"] = np.asarray(raw["rewards"], dtype=np.float64).reshape(-1)
    if "dones" in raw:
        d["ends"] = np.asarray(raw["dones"]).reshape(-1).astype(bool)
    if analysis.is_discrete_states(obs):
        d["state_id"] = _discrete_state(obs)
    top_idx, bottom_idx = analysis.top_bottom(score, top)
    everything = np.arange(n)
    groups = {"top": _group_stats(top_idx, d, env_id), "bottom": _group_stats(bottom_idx, d, env_id),
              "buffer": _group_stats(everything, d, env_id, n_states=None)}
    rho, p = analysis.spearman(score, adv_mc * adv_gae)
    rho_gae, _ = analysis.spearman(score, adv_gae)
    rho_gap, _ = analysis.spearman(score, d["gap"])
    width = None
    if runinfo.env_family(env_id) == "FrozenLake" and "state_id" in d:
        n_states = obs.shape[1] if obs.ndim == 2 and obs.shape[1] > 1 else None
        width = frozenlake_desc(env_id, _run_args(run_dir), n_states).shape[1]
    findings = _findings(f"bottom {len(bottom_idx)}", groups["bottom"], groups["buffer"], width) + \
        _findings(f"top {len(top_idx)}", groups["top"], groups["buffer"], width)
    findings.insert(0, f"Spearman(influence, Ā·Â) = {rho:+.2f} over {n} records: {_rho_text(rho)}")
    result = {
        "run": str(run_dir), "round": k, "env_id": env_id, "score_key": score_key, "n_records": n,
        "mc_advantage": method, "top_k": len(top_idx),
        "spearman_influence_vs_amc_agae": {"rho": rho, "p": p},
        "spearman_influence_vs_agae": rho_gae, "spearman_influence_vs_abs_gap": rho_gap,
        "negative_frac": float((score < 0).mean()),
        "groups": groups, "findings": findings,
        "records": {name: [_record(int(i), d, env_id) for i in idx] for name, idx in
                    (("top", top_idx), ("bottom", bottom_idx))},
    }
    return result, d


def _run_args(run_dir) -> dict:
    try:
        return runinfo.load_run(run_dir).args
    except FileNotFoundError:
        return {}


def _rho_text(rho: float) -> str:
    # The paper's Fig. 3(d) prints "rank correlation = -0.67" for FrozenLake; with influence ranks counted from the top
    # (rank 1 = most positive) that is +0.67 in this convention, where harmful (negative) records are the ones with
    # Ā·Â < 0 [derived: the score is Ã_i <∇log π_i, ∇f>, so a wrong-sign Â pushes log π the wrong way].
    if rho != rho:
        return "undefined (constant scores or advantages)."
    if rho > 0.3:
        return "records whose GAE advantage has the wrong sign (Ā·Â < 0) are the harmful ones."
    if rho < -0.3:
        return "unusual: records with Ā·Â < 0 tend to help (check the advantage estimates)."
    return "weak association between influence and advantage agreement."


def _discrete_state(obs) -> np.ndarray:
    o = np.asarray(obs)
    if o.ndim == 2 and o.shape[1] > 1:
        return o.argmax(1).astype(np.int64)
    return o.reshape(-1).astype(np.int64)


def _record(i: int, d: dict, env_id) -> dict:
    r = {"index": i, "score": float(d["score"][i]), "action": runinfo.action_name(env_id, d["actions"][i]),
         "adv_gae": float(d["adv_gae"][i]), "adv_mc": float(d["adv_mc"][i]), "sign_mismatch": bool(d["mismatch"][i])}
    if "state_id" in d:
        r["state"] = int(d["state_id"][i])
    if "rewards" in d:
        r["reward"] = float(d["rewards"][i])
    return r


# ---------------------------------------------------------------------------------------------------------------------
# Rendering states


def frozenlake_desc(env_id: str | None, args: dict | None = None, n_states: int | None = None) -> np.ndarray:
    """The FrozenLake map as a [rows, cols] array of 'S','F','H','G': re-created from the run's env id and kwargs,
    else the standard map of the size implied by the number of states."""
    kwargs = dict((args or {}).get("env_kwargs") or {})
    try:
        import gymnasium as gym
        env = gym.make(env_id or "FrozenLake-v1", **kwargs)
        desc = np.asarray(env.unwrapped.desc).astype(str)
        env.close()
        if n_states is None or desc.size == n_states:
            return desc
    except Exception:  # noqa: BLE001 - fall back to the standard maps below
        pass
    from gymnasium.envs.toy_text.frozen_lake import MAPS
    side = int(round(np.sqrt(n_states or 16)))
    return np.array([list(row) for row in MAPS[f"{side}x{side}"]])


def draw_frozenlake(ax, desc: np.ndarray, state: int, action: int | None) -> None:
    """One FrozenLake cell map with the agent at `state` and an arrow for `action`."""
    colours = {"S": "#d9ecff", "F": "#eef6fb", "H": "#1f3b57", "G": "#6cc46c"}
    rows, cols = desc.shape
    for r in range(rows):
        for c in range(cols):
            ax.add_patch(_rect(c, r, colours.get(desc[r, c], "white")))
            if desc[r, c] in "SG":
                ax.text(c + 0.5, r + 0.5, desc[r, c], ha="center", va="center", fontsize=7, color="#555")
    r, c = divmod(int(state), cols)
    ax.add_patch(_circle(c + 0.5, r + 0.5))
    if action is not None and int(action) in ARROWS:
        dx, dy = ARROWS[int(action)]
        ax.annotate("", xy=(c + 0.5 + 0.5 * dx, r + 0.5 + 0.5 * dy), xytext=(c + 0.5 + 0.1 * dx, r + 0.5 + 0.1 * dy),
                    arrowprops=dict(arrowstyle="-|>", color="#d62728", lw=2, mutation_scale=12), zorder=4)
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def _rect(x, y, colour):
    from matplotlib.patches import Rectangle
    return Rectangle((x, y), 1, 1, facecolor=colour, edgecolor="#999", lw=0.5)


def _circle(x, y):
    from matplotlib.patches import Circle
    return Circle((x, y), 0.17, color="#ff7f0e", zorder=3)


def minigrid_image(obs, tile: int = 12) -> np.ndarray:
    """RGB picture of a MiniGrid egocentric observation (7x7x3 object/colour/state codes; channel-first or flattened
    also accepted), drawn as the agent sees it (agent at the bottom centre, facing up)."""
    from minigrid.core.grid import Grid
    o = np.asarray(obs)
    if o.size % 3:
        raise ValueError(f"MiniGrid observation of shape {o.shape} is not an [H, W, 3] code image")
    if o.ndim == 3 and o.shape[0] == 3 and o.shape[-1] != 3:
        o = np.transpose(o, (1, 2, 0))
    elif o.ndim == 1:
        side = int(round(np.sqrt(o.size // 3)))
        o = o.reshape(side, side, 3)
    o = np.round(o).astype(np.uint8)
    grid, vis = Grid.decode(o)
    return grid.render(tile, agent_pos=(o.shape[0] // 2, o.shape[1] - 1), agent_dir=3, highlight_mask=vis)


def can_render(env_id: str | None, obs) -> bool:
    fam = runinfo.env_family(env_id)
    if fam == "FrozenLake":
        return analysis.is_discrete_states(obs)
    if fam == "MiniGrid":
        o = np.asarray(obs)
        return o.ndim >= 2 and o[0].size % 3 == 0 and o.max() < 256 and np.all(o == np.round(o))
    return False


def states_grid(path, env_id: str | None, obs, actions, titles: list[str], groups: list[tuple[str, list[int]]],
                args: dict | None = None, cols: int = 8) -> Path | None:
    """An image grid: one row block per group (e.g. top / bottom), one panel per record with its action.
    Returns the path, or None when the env cannot be drawn from its observations."""
    if not can_render(env_id, obs):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fam = runinfo.env_family(env_id)
    rows_per = [max(1, -(-len(ix) // cols)) for _, ix in groups]
    row_h = 1.9 if fam == "FrozenLake" else 2.2
    fig, axes = plt.subplots(sum(rows_per), cols, figsize=(1.6 * cols, row_h * sum(rows_per)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    desc = frozenlake_desc(env_id, args, np.asarray(obs).shape[1] if np.asarray(obs).ndim == 2 else None) \
        if fam == "FrozenLake" else None
    states = _discrete_state(obs) if fam == "FrozenLake" else None
    row0 = 0
    for (label, ix), nrows in zip(groups, rows_per):
        for j, i in enumerate(ix):
            ax = axes[row0 + j // cols, j % cols]
            ax.axis("on")
            if fam == "FrozenLake":
                draw_frozenlake(ax, desc, states[i], int(np.asarray(actions[i]).reshape(-1)[0]))
            else:
                ax.imshow(minigrid_image(obs[i]))
                ax.set_xticks([])
                ax.set_yticks([])
            title = titles[i] if fam == "FrozenLake" else f"{titles[i]}\naction: {runinfo.action_name(env_id, actions[i])}"
            ax.set_title(title, fontsize=7)
        axes[row0, 0].text(-0.15, 0.5, label, transform=axes[row0, 0].transAxes, rotation=90, ha="right",
                           va="center", fontsize=10, fontweight="bold")
        row0 += nrows
    fig.suptitle(f"{env_id}: states of the selected records (arrow / label = action taken)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------------
# Outputs


def summary_figure(path, result: dict, d: dict) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    score = d["score"]
    top_idx = np.array([r["index"] for r in result["records"]["top"]], dtype=int)
    bot_idx = np.array([r["index"] for r in result["records"]["bottom"]], dtype=int)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.hist(score, bins=60, color="#7f7f7f")
    if len(top_idx):
        ax.axvline(score[top_idx].min(), color="#2ca02c", ls="--", label=f"top {len(top_idx)}")
    if len(bot_idx):
        ax.axvline(score[bot_idx].max(), color="#d62728", ls="--", label=f"bottom {len(bot_idx)}")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(plt.MaxNLocator(5))
    ax.set_xlabel("influence on the return target (gradient dot product, a.u.)")
    ax.set_ylabel("records (count, log scale)")
    ax.set_title(f"(a) score distribution, round {result['round']}")
    ax.legend(fontsize=8)
    ax = axes[1]
    prod = d["adv_mc"] * d["adv_gae"]
    mm = d["mismatch"]
    ax.scatter(prod[~mm], score[~mm], s=6, alpha=0.5, color="#1f77b4", label="sign(Ā) = sign(Â)")
    ax.scatter(prod[mm], score[mm], s=6, alpha=0.6, color="#d62728", label="sign(Ā) ≠ sign(Â)")
    ax.axhline(0, color="k", lw=0.5)
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xscale("symlog", linthresh=max(1e-3, float(np.quantile(np.abs(prod), 0.1)) if len(prod) else 1e-3))
    ax.set_xlabel("Ā·Â (Monte Carlo × GAE advantage, return units²)")
    ax.set_ylabel("influence (a.u.)")
    rho = result["spearman_influence_vs_amc_agae"]["rho"]
    ax.set_title(f"(b) influence vs Ā·Â, Spearman ρ = {rho:+.2f}")
    ax.legend(fontsize=8, markerscale=2)
    ax = axes[2]
    names = ["bottom", "buffer", "top"]
    g = result["groups"]
    x = np.arange(3)
    ax.bar(x - 0.2, [g[n]["sign_mismatch_frac"] * 100 for n in names], 0.4, color="#d62728",
           label="sign mismatch (%)")
    ax.set_ylabel("records with sign(Ā) ≠ sign(Â) (%)")
    ax2 = ax.twinx()
    ax2.bar(x + 0.2, [g[n]["abs_gap_mean"] for n in names], 0.4, color="#9467bd", label="mean |Ā−Â|")
    ax2.set_ylabel("mean |Ā − Â| (return units)")
    ax.set_xticks(x, [f"bottom {g['bottom']['n']}", f"all {g['buffer']['n']}", f"top {g['top']['n']}"])
    ax.set_title("(c) advantage errors by group")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    fig.suptitle(f"{result.get('env_id') or 'run'}: diagnosis of round {result['round']} "
                 f"({result['n_records']} records, Ā = {result['mc_advantage']} Monte Carlo)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def to_markdown(result: dict) -> str:
    g = result["groups"]
    lines = [f"# Diagnosis of round {result['round']} ({result.get('env_id') or 'unknown env'})", "",
             f"{result['n_records']} records, score `{result['score_key']}`, "
             f"{result['negative_frac']:.0%} negative; Monte Carlo advantage Ā: {result['mc_advantage']}.", "",
             "## Findings", ""]
    lines += [f"- {f}" for f in result["findings"]]
    lines += ["", "## Groups", "", "| group | n | mean score | sign mismatch | mean abs(Ā−Â) | mean Â | mean Ā |",
              "|---|---|---|---|---|---|---|"]
    for name in ("top", "buffer", "bottom"):
        s = g[name]
        lines.append(f"| {name} | {s['n']} | {s['score_mean']:+.3g} | {s['sign_mismatch_frac']:.0%} | "
                     f"{s['abs_gap_mean']:.3g} | {s['adv_gae_mean']:+.3g} | {s['adv_mc_mean']:+.3g} |")
    for name in ("bottom", "top"):
        lines += ["", f"## {name.capitalize()} records", "",
                  "| index | score | state | action | Â | Ā | mismatch |", "|---|---|---|---|---|---|---|"]
        for r in result["records"][name]:
            lines.append(f"| {r['index']} | {r['score']:+.3g} | {r.get('state', '')} | {r['action']} | "
                         f"{r['adv_gae']:+.3g} | {r['adv_mc']:+.3g} | {'yes' if r['sign_mismatch'] else ''} |")
    return "\n".join(lines) + "\n"


def write_diagnosis(run_dir, k: int, top: int = 20, score_key: str = "score_return", out_dir=None,
                    mc_method: str = "auto", env_id: str | None = None, grid: int = 16) -> dict:
    """diagnose_round, then writes diagnose_round_<k>.{json,md,png} (+ _states.png) into out_dir (default: run dir).
    Returns the result dict with the written paths under "files"."""
    result, d = diagnose_round(run_dir, k, top, score_key, mc_method, env_id)
    out = Path(out_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"diagnose_round_{k}"
    files = {"png": str(summary_figure(f"{stem}.png", result, d))}
    args = _run_args(run_dir)
    n_show = min(grid, top)
    titles = [f"#{i} I={d['score'][i]:+.2g}\nÂ={d['adv_gae'][i]:+.2f} Ā={d['adv_mc'][i]:+.2f}"
              for i in range(len(d["score"]))]
    tops = [r["index"] for r in result["records"]["top"]][:n_show]
    bots = [r["index"] for r in result["records"]["bottom"]][:n_show]
    states_png = states_grid(f"{stem}_states.png", result["env_id"], d["obs"], d["actions"], titles,
                             [(f"bottom {len(bots)}", bots), (f"top {len(tops)}", tops)], args)
    if states_png:
        files["states_png"] = str(states_png)
    result["files"] = files
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1, default=_json_default))
    Path(f"{stem}.md").write_text(to_markdown(result))
    files["json"], files["md"] = f"{stem}.json", f"{stem}.md"
    return result


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastattr diagnose", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run dir written by `fastattr train --save-attribution`")
    p.add_argument("--round", dest="rounds", required=True, help="round(s): 5, or 1,5,9, or 2-4, or all")
    p.add_argument("--top", type=int, default=20, help="records per group (top and bottom), default 20")
    p.add_argument("--score", default="score_return", help="score field to rank by (default score_return)")
    p.add_argument("--mc", default="auto", choices=["auto", "buffer", "baseline"],
                   help="Monte Carlo advantage: buffer averages (discrete states), G - V, or auto")
    p.add_argument("--env", default=None, help="env id, if the run dir has no args.json")
    p.add_argument("--out", default=None, help="output dir (default: the run dir)")
    a = p.parse_args(argv)
    if a.top < 1:
        p.error("--top must be >= 1")
    try:
        run = runinfo.load_run(a.run)
        for k in runinfo.parse_rounds(a.rounds, run.rounds):
            res = write_diagnosis(a.run, k, a.top, a.score, a.out, a.mc, a.env)
            print(f"== round {k} ==")
            for f in res["findings"]:
                print(f"  {f}")
            print("  wrote " + ", ".join(res["files"].values()))
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"fastattr diagnose: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
