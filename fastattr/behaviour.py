"""`fastattr behaviour RUN --probe NAME`: temporal analysis of behaviour formation (paper §4.2, Fig. 4 and Fig. 10).

A probe (fastattr/probes.py) picks the (state, action) pairs of a behaviour, e.g. "SLOWER when tailing" on highway
or a MiniGrid turn. In every saved round k, the probe-matching records of B(k) (up to --targets of them) become M
action targets f_m(θ) = log π_θ(a_m|s_m), and every record of B(k) is scored at θ(k) against their mean:

    I_i = (1/M) Σ_m <∇_θ l_i, ∇_θ (−log π_θ(a_m|s_m))>,   l_i = −Ã_i log π_θ(a_i|s_i)  (the scored PPO loss)

(positive: the record's update raises the probability of the behaviour). Per round it reports the scale of I, what
the top records have in common (the probe's action? the probe's situation? a positive advantage?), the rank
correlation between I and the signed advantage Ã_i·(+1 if a_i is a probe action else −1) ("action–advantage
association"), and the paper's roughness of I over state embeddings from the run's final network (positive-
influence records, Gaussian kernel, u-NN graph, σ by the median heuristic). The phases are then labelled:
    1 association   influence follows action and advantage; roughness high
    2 clustering    roughness has dropped: similar states carry similar influence
    3 saturation    influence is small (max |I| below --saturation of its peak) and noisy
Writes <run>/behaviour_<probe>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch

from . import analysis, probes, runinfo, targets


def embed(agent, obs: torch.Tensor) -> np.ndarray:
    """State embeddings [N, hidden]: the actor's last hidden layer (after the shared features, if any)."""
    with torch.no_grad():
        z = agent.features(agent.preprocess(obs))
        return agent.actor[:-1](z).double().numpy()


def final_agent(run, args):
    """The run's final network (checkpoints/latest.pt), the "well-trained network" whose embeddings define the
    roughness graph; falls back to the last saved θ(k)."""
    from .rl.rundir import checkpoint_path, load_checkpoint
    path = checkpoint_path(run.path)
    agent = runinfo.make_agent(args)
    if path.exists():
        agent.load_state_dict(load_checkpoint(path)["agent"])
        return agent, "final checkpoint"
    k = max(run.rounds)
    agent, _ = runinfo.load_theta(run, k, args)
    return agent, f"θ({k})"


def analyse_round(run, args, k: int, probe: probes.Probe, emb_agent, n_targets: int, top: int,
                  n_neighbors: int) -> dict:
    agent, _ = runinfo.load_theta(run, k, args)
    buf, data = runinfo.load_buffer(run, k, continuous=agent.continuous)
    obs_np, act_np = np.asarray(data["obs"]), np.asarray(data["actions"])
    mask = probe(obs_np, act_np)
    row = {"round": k, "n_records": int(buf.n), "n_match": int(mask.sum())}
    if not mask.any():
        return row
    target_idx = targets.pick_targets(mask, n_targets)
    if "adv_norm" in data:
        adv_record = torch.as_tensor(np.asarray(data["adv_norm"], dtype=np.float32))
    else:
        adv_record = (buf.advantages - buf.advantages.mean()) / (buf.advantages.std() + 1e-8)
    infl = targets.action_scores(agent, lambda m, o, a: m.log_prob(o, a), buf.obs, buf.actions, adv_record, target_idx,
                                 params=agent.is_actor_param).double().numpy()
    top_idx, _ = analysis.top_bottom(infl, top)
    acts = np.round(act_np.reshape(len(act_np), -1)[:, 0]).astype(np.int64) if not agent.continuous else None
    same = np.isin(acts, probe.actions) if acts is not None and probe.actions else None
    rough = analysis.roughness(infl, embed(emb_agent, buf.obs), n_neighbors=n_neighbors)
    row.update({
        "n_targets": int(len(target_idx)),
        "influence_mean": float(infl.mean()),
        "influence_absmax": float(np.abs(infl).max()),
        "positive_frac": float((infl > 0).mean()),
        "top_share": float(mask[top_idx].mean()),
        "top_same_action": float(same[top_idx].mean()) if same is not None else None,
        "top_adv_mean": float(adv_record.numpy()[top_idx].mean()),
        "assoc_spearman": analysis.spearman(infl, adv_record.numpy() * (2.0 * same - 1.0))[0]
        if same is not None else None,
        "roughness": rough.value, "n_positive": rough.n_positive, "sigma": rough.sigma,
    })
    return row


def phases(rows: list[dict], saturation: float = 0.1) -> list[dict]:
    """Heuristic phase labels over rounds with scores (see the module docstring). Returns [{name, start, end, why}]."""
    r = [x for x in rows if "influence_absmax" in x]
    if len(r) < 2:
        return []
    ks = [x["round"] for x in r]
    scale = np.array([x["influence_absmax"] for x in r])
    rough = np.array([x["roughness"] if x["roughness"] == x["roughness"] else np.nan for x in r])
    peak = int(np.argmax(scale))
    low = scale < saturation * scale[peak]
    # saturation: from the first round after the peak from which the scale stays low
    sat = next((i for i in range(peak + 1, len(r)) if low[i:].all()), len(r))
    pre = rough[:sat]
    out = []
    if np.isfinite(pre).sum() >= 2:
        i_max = int(np.nanargmax(pre))
        mid = (np.nanmax(pre) + np.nanmin(pre[i_max:])) / 2
        drop = next((i for i in range(i_max, sat) if np.isfinite(rough[i]) and rough[i] < mid), sat)
        if drop > 0:
            out.append({"name": "1 action–advantage association", "start": ks[0], "end": ks[drop - 1],
                        "why": f"roughness high (max {np.nanmax(pre):.3g})"})
        if drop < sat:
            out.append({"name": "2 semantic clustering", "start": ks[drop], "end": ks[sat - 1],
                        "why": f"roughness dropped below {mid:.3g}"})
    elif sat > 0:
        out.append({"name": "1–2 (roughness undefined)", "start": ks[0], "end": ks[sat - 1], "why": "too few "
                    "positive-influence records for roughness"})
    if sat < len(r):
        out.append({"name": "3 influence saturation", "start": ks[sat], "end": ks[-1],
                    "why": f"max |I| below {saturation:.0%} of its peak ({scale[peak]:.3g} at round {ks[peak]})"})
    return out


def behaviour(run_dir, probe_spec: str, rounds: list[int] | None = None, n_targets: int = 32, top: int = 50,
              n_neighbors: int = 20, saturation: float = 0.1, progress: bool = True) -> dict:
    from tqdm.auto import tqdm
    run = runinfo.load_run(run_dir)
    args = runinfo.ppo_args(run)
    torch.set_num_threads(args.threads)
    probe = probes.get_probe(probe_spec)
    probe.check_env(args.env_id)
    rounds = rounds if rounds is not None else run.rounds
    if not rounds:
        raise FileNotFoundError(f"{run.path} has no saved rounds; train with --save-attribution")
    missing = [k for k in rounds if k not in run.rounds]
    if missing:
        raise FileNotFoundError(f"round(s) {missing} were not saved in {run.path} (saved: {run.rounds[:10]}"
                                f"{'...' if len(run.rounds) > 10 else ''})")
    for name, v in (("--targets", n_targets), ("--top", top), ("--neighbors", n_neighbors)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    emb_agent, emb_from = final_agent(run, args)
    rows = []
    for k in tqdm(rounds, desc=f"behaviour {probe.name}", unit="round", disable=not progress):
        rows.append(analyse_round(run, args, k, probe, emb_agent, n_targets, top, n_neighbors))
    if not any(r["n_match"] for r in rows):
        raise ValueError(f"probe {probe.name!r} ({probe.description}) matched no record in rounds "
                         f"{rounds[0]}..{rounds[-1]} of {run.path}: the agent never produced that (state, action); "
                         "check the probe (`--list-probes`) or pick other rounds")
    return {"run": str(run.path), "env_id": args.env_id, "probe": probe.name, "probe_description": probe.description,
            "probe_params": probe.params, "embedding": f"actor hidden layer of the {emb_from}",
            "targets_per_round": n_targets, "top": top, "n_neighbors": n_neighbors, "rounds": rows,
            "phases": phases(rows, saturation)}


def figure(res: dict) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in res["rounds"] if "influence_absmax" in r]
    ks = np.array([r["round"] for r in rows])
    fig, axes = plt.subplots(3, 1, figsize=(9, 8.5), sharex=True)
    shades = ["#fde0dd", "#e0ecf4", "#e5f5e0"]
    for ax in axes:
        for ph, c in zip(res["phases"], shades * 2):
            ax.axvspan(ph["start"] - 0.5, ph["end"] + 0.5, color=c, alpha=0.7, lw=0)
    ax = axes[0]
    ax.plot(ks, [r["influence_absmax"] for r in rows], "o-", color="#1f77b4", ms=3, label="max |I|")
    ax.plot(ks, [abs(r["influence_mean"]) for r in rows], "s--", color="#7f7f7f", ms=3, label="|mean I|")
    ax.set_yscale("log")
    ax.set_ylabel("influence on log π(probe) (a.u.)")
    ax.set_title(f"{res['env_id']}: formation of '{res['probe']}' ({res['probe_description']})", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(ks, [r["roughness"] for r in rows], "o-", color="#d62728", ms=3)
    ax.set_ylabel("roughness of Ĩ (0 = smooth)")
    ax = axes[2]
    ax.plot(ks, [100 * r["top_share"] for r in rows], "o-", color="#2ca02c", ms=3,
            label=f"top {res['top']} matching the probe")
    if rows and rows[0].get("top_same_action") is not None:
        ax.plot(ks, [100 * r["top_same_action"] for r in rows], "s--", color="#9467bd", ms=3,
                label=f"top {res['top']} with a probe action")
    ax.set_ylabel("share of top records (%)")
    ax.set_ylim(-2, 102)
    if rows and rows[0].get("assoc_spearman") is not None:
        ax2 = ax.twinx()
        ax2.plot(ks, [r["assoc_spearman"] for r in rows], "^:", color="#ff7f0e", ms=3,
                 label="Spearman(I, ±Ã) (association)")
        ax2.set_ylim(-1.05, 1.05)
        ax2.set_ylabel("rank correlation")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower left")
    else:
        ax.legend(fontsize=8)
    ax.set_xlabel("round k (θ(k), buffer B(k))")
    for ph in res["phases"]:
        axes[0].text((ph["start"] + ph["end"]) / 2, 0.97, f"phase {ph['name'].split(' ', 1)[0]}",
                     transform=axes[0].get_xaxis_transform(), ha="center", va="top", fontsize=8, color="#444")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    fig.tight_layout()
    from .report import fig_to_png

    return fig_to_png(fig)


def to_markdown(res: dict) -> str:
    lines = [f"# Behaviour formation: {res['probe']} on {res['env_id']}", "", res["probe_description"] + ".",
             f"Embedding for roughness: {res['embedding']}; u = {res['n_neighbors']}.", "", "## Phases", ""]
    lines += [f"- {p['name']}: rounds {p['start']}–{p['end']} ({p['why']})" for p in res["phases"]] or ["- none"]
    lines += ["", "| round | matching | targets | max abs(I) | top matching | top probe action | assoc ρ | roughness |",
              "|---|---|---|---|---|---|---|---|"]
    for r in res["rounds"]:
        if "influence_absmax" not in r:
            lines.append(f"| {r['round']} | 0 | | | | | | |")
            continue
        same = "" if r["top_same_action"] is None else f"{r['top_same_action']:.0%}"
        assoc = "" if r["assoc_spearman"] is None else f"{r['assoc_spearman']:+.2f}"
        lines.append(f"| {r['round']} | {r['n_match']} | {r['n_targets']} | {r['influence_absmax']:.3g} | "
                     f"{r['top_share']:.0%} | {same} | {assoc} | {r['roughness']:.3g} |")
    return "\n".join(lines) + "\n"


def write(res: dict, out_dir) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"behaviour_{re.sub(r'[^A-Za-z0-9_.-]+', '_', res['probe'])}"
    Path(f"{stem}.json").write_text(json.dumps(res, indent=1))
    Path(f"{stem}.md").write_text(to_markdown(res))
    Path(f"{stem}.png").write_bytes(figure(res))
    return {"json": f"{stem}.json", "md": f"{stem}.md", "png": f"{stem}.png"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastattr behaviour", description=__doc__.split("\n\n")[0],
                                epilog="probes:\n" + probes.describe(), formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", nargs="?", help="run dir trained with --save-attribution")
    p.add_argument("--probe", help="probe name or action=K / state=S (see --list-probes)")
    p.add_argument("--rounds", default="all", help="rounds: all (default), 2-9, 1,5,9")
    p.add_argument("--targets", type=int, default=32, help="probe records used as action targets per round")
    p.add_argument("--top", type=int, default=50, help="top records per round to characterise (default 50)")
    p.add_argument("--neighbors", type=int, default=20, help="u of the roughness kNN graph (default 20)")
    p.add_argument("--saturation", type=float, default=0.1, help="phase 3 when max |I| < this x its peak")
    p.add_argument("--out", default=None, help="output dir (default: the run dir)")
    p.add_argument("--list-probes", action="store_true", help="list the named probes and exit")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.list_probes:
        print(probes.describe())
        return 0
    if not a.run or not a.probe:
        p.error("RUN and --probe are required (or --list-probes)")
    def compute():
        run = runinfo.load_run(a.run)
        rounds = runinfo.parse_rounds(a.rounds, run.rounds)
        return behaviour(a.run, a.probe, rounds, a.targets, a.top, a.neighbors, a.saturation, not a.no_progress)

    return runinfo.run_tool("behaviour", compute, write, to_markdown, a.out or a.run)


if __name__ == "__main__":
    raise SystemExit(main())
