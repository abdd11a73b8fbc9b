"""`fastattr validate RUN --round k`: counterfactual validation of the scores (the paper has none; §7 names the lack
of a counterfactual interpretation as a limitation).

For subsets S of the buffer B(k), compare the first-order prediction of how removing S changes the return target
with the actual change after the update without S, starting from θ(k):

    J(θ) = (1/N) Σ_j Â_j log π_θ(a_j|s_j)          the return target as an objective (higher = better), on B(k)
    predicted ΔJ_S = −c · Σ_{i∈S} score_i            (score_i = <∇l_i, ∇f>, f = −J; removing helpful records lowers J)
    actual    ΔJ_S = J(θ'_{−S}) − J(θ')              θ' = the update on all of B(k), θ'_{−S} = the update without S

Two updates are checked, at several learning rates η:
    sgd-step  one SGD step on the scored record losses (1/N) Σ l_i: the setting in which the first-order
              prediction is exact as η → 0, with c = η/N (so the actual/predicted slope should be ≈ 1);
    ppo       the run's full PPO update (its optimiser, epochs, minibatches, clipping, value loss); the minibatch
              order of every epoch is shared between θ' and every θ'_{−S}, and c = η·epochs/batch_size.
Subsets: `random` (uniform, size frac·N) and `ranked` (windows of size frac·N evenly spaced over the records sorted
by score, from the bottom window to the top one). The Spearman correlation between predicted and actual ΔJ over
the subsets, per update, learning rate and selection, tells a user how far the scores can be trusted.
Writes <run>/validate_r<rounds>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from . import analysis, runinfo, targets
from .rl.config import derived_seed

MODES = ("sgd-step", "ppo")
SELECTIONS = ("random", "ranked")


def return_objective(agent, buf) -> float:
    """J(θ) = (1/N) Σ_j Â_j log π_θ(a_j|s_j) on the buffer (raw GAE advantages); see fastattr.targets."""
    with torch.no_grad():
        return targets.return_objective(agent.log_prob(buf.obs, buf.actions), buf.advantages)


def subsets(scores: np.ndarray, size: int, n_subsets: int, seed: int) -> dict[str, list[np.ndarray]]:
    """{'random': n_subsets uniform subsets, 'ranked': n_subsets windows of the score-sorted order}, each of `size`."""
    n = len(scores)
    if not 1 <= size < n:
        raise ValueError(f"subset size {size} must be in [1, {n - 1}] (use --frac in (0, 1))")
    rng = np.random.default_rng(derived_seed(seed, 0x5B5E7))
    random_sets = [np.sort(rng.choice(n, size=size, replace=False)) for _ in range(n_subsets)]
    order = np.argsort(scores, kind="stable")
    starts = np.unique(np.linspace(0, n - size, n_subsets).round().astype(int))
    ranked = [np.sort(order[s:s + size]) for s in starts]
    return {"random": random_sets, "ranked": ranked}


def sgd_step(agent, buf, adv_record: torch.Tensor, keep: torch.Tensor, lr: float) -> None:
    """θ ← θ − lr · ∇ (1/N) Σ_{i kept} l_i with l_i = −Ã_i log π(a_i|s_i) (N = all records, so removal is additive)."""
    params = [p for name, p in agent.named_parameters() if agent.is_actor_param(name)]
    loss = -(adv_record * keep.float() * agent.log_prob(buf.obs, buf.actions)).sum() / buf.n
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p -= lr * g


def ppo_updates(agent, optimizer, buf, keep: torch.Tensor, args, orders: list[torch.Tensor]) -> None:
    """The run's PPO update with a fixed minibatch order per epoch (orders[e] restricted to the kept records)."""
    from .rl.update import ppo_update
    one = dataclasses.replace(args, n_epochs=1)
    gen = torch.Generator().manual_seed(0)  # unused: every epoch's order is given
    for order in orders:
        ppo_update(agent, optimizer, buf, keep, one, gen, epoch1_order=order)


def validate_round(run, args, k: int, lrs: list[float], frac: float, n_subsets: int, modes=MODES, seed: int = 0,
                   bar=None) -> dict:
    from .rl.agent import make_optimizer
    agent0, opt0 = runinfo.load_theta(run, k, args)
    buf, data = runinfo.load_buffer(run, k, continuous=agent0.continuous)
    n = buf.n
    if "adv_norm" in data:
        adv_record = torch.as_tensor(np.asarray(data["adv_norm"], dtype=np.float32))
    else:
        adv_record = (buf.advantages - buf.advantages.mean()) / (buf.advantages.std() + 1e-8)
    # The scores the prediction uses, recomputed at θ(k) for exactly this record loss; the saved ones must agree.
    scores = agent0.return_scores(buf.obs, buf.actions, adv_record, buf.advantages).double().numpy()
    saved = np.asarray(data["score_return"], dtype=np.float64)
    reproduction = float(np.abs(scores - saved).max() / max(np.abs(saved).max(), 1e-30))
    sets = subsets(scores, max(1, int(round(frac * n))), n_subsets, derived_seed(seed, k))
    state0 = {key: v.clone() for key, v in agent0.state_dict().items()}
    opt_state0 = copy.deepcopy(opt0.state_dict())  # state_dict() holds references to the live moments
    gen = torch.Generator().manual_seed(derived_seed(seed, k, 0x0D3E))
    orders = [torch.randperm(n, generator=gen) for _ in range(args.n_epochs)]

    def run_update(mode: str, lr: float, keep: torch.Tensor) -> float:
        agent0.load_state_dict(state0)
        if mode == "sgd-step":
            sgd_step(agent0, buf, adv_record, keep, lr)
        else:
            opt = make_optimizer(agent0, dataclasses.replace(args, learning_rate=lr))
            opt.load_state_dict(copy.deepcopy(opt_state0))  # load_state_dict keeps references: Adam would carry
            # its moments and step count from one retrain to the next
            for group in opt.param_groups:
                group["lr"] = lr
            ppo_updates(agent0, opt, buf, keep, args, orders)
        return return_objective(agent0, buf)

    points, summary = [], []
    for mode in modes:
        for lr in lrs:
            c = lr / n if mode == "sgd-step" else lr * args.n_epochs / args.batch_size
            ref = run_update(mode, lr, torch.ones(n, dtype=torch.bool))
            for sel in SELECTIONS:
                pred, actual = [], []
                for idx in sets[sel]:
                    keep = torch.ones(n, dtype=torch.bool)
                    keep[torch.as_tensor(idx)] = False
                    actual.append(run_update(mode, lr, keep) - ref)
                    pred.append(-c * scores[idx].sum())
                    if bar is not None:
                        bar.update(1)
                pred, actual = np.array(pred), np.array(actual)
                rho, _ = analysis.spearman(pred, actual)
                pearson = float(np.corrcoef(pred, actual)[0, 1]) if np.ptp(pred) > 0 and np.ptp(actual) > 0 \
                    else float("nan")
                slope = float((pred @ actual) / (pred @ pred)) if pred @ pred > 0 else float("nan")
                summary.append({"round": k, "mode": mode, "learning_rate": lr, "selection": sel,
                                "n_subsets": len(pred), "spearman": rho, "pearson": pearson, "slope": slope,
                                "sign_agreement": float(np.mean(np.sign(pred) == np.sign(actual)))})
                points += [{"round": k, "mode": mode, "learning_rate": lr, "selection": sel, "predicted": float(p),
                            "actual": float(a)} for p, a in zip(pred, actual)]
    return {"round": k, "n_records": n, "subset_size": len(sets["random"][0]),
            "score_reproduction_max_rel_err": reproduction, "summary": summary, "points": points}


def validate(run_dir, rounds: list[int], lrs: list[float] | None = None, frac: float = 0.1, n_subsets: int = 16,
             modes=MODES, seed: int = 0, progress: bool = True) -> dict:
    from tqdm.auto import tqdm
    run = runinfo.load_run(run_dir)
    args = runinfo.ppo_args(run)
    torch.set_num_threads(args.threads)
    lrs = lrs or [args.learning_rate * f for f in (0.1, 1.0, 4.0)]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    if not 0 < frac < 1:
        raise ValueError(f"--frac must be in (0, 1), got {frac}")
    if n_subsets < 3:
        raise ValueError(f"--subsets must be >= 3 for a rank correlation, got {n_subsets}")
    if any(lr <= 0 for lr in lrs):
        raise ValueError(f"--lrs must all be > 0, got {lrs}")
    missing = [k for k in rounds if k not in run.rounds]
    if missing:
        raise FileNotFoundError(f"round(s) {missing} were not saved in {run.path} (saved rounds: {run.rounds[:10]}"
                                f"{'...' if len(run.rounds) > 10 else ''}); train with --save-attribution")
    total = len(rounds) * len(modes) * len(lrs) * len(SELECTIONS) * n_subsets
    bar = tqdm(total=total, desc="validate", unit="update", disable=not progress)
    try:
        per_round = [validate_round(run, args, k, lrs, frac, n_subsets, modes, seed, bar) for k in rounds]
    finally:
        bar.close()
    return {"run": str(run.path), "env_id": args.env_id, "rounds": rounds, "optimizer": args.optimizer,
            "learning_rates": lrs, "frac": frac, "seed": seed,
            "summary": [s for r in per_round for s in r["summary"]],
            "points": [p for r in per_round for p in r["points"]],
            "per_round": [{key: r[key] for key in ("round", "n_records", "subset_size",
                                                    "score_reproduction_max_rel_err")} for r in per_round]}


def figure(res: dict) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = [m for m in MODES if any(p["mode"] == m for p in res["points"])]
    lrs = res["learning_rates"]
    fig, axes = plt.subplots(len(modes), len(lrs), figsize=(3.6 * len(lrs), 3.3 * len(modes)), squeeze=False)
    colours = {"random": "#1f77b4", "ranked": "#d62728"}
    for i, mode in enumerate(modes):
        for j, lr in enumerate(lrs):
            ax = axes[i, j]
            for sel in SELECTIONS:
                pts = [p for p in res["points"] if p["mode"] == mode and p["learning_rate"] == lr
                       and p["selection"] == sel]
                rhos = [s["spearman"] for s in res["summary"] if s["mode"] == mode and s["learning_rate"] == lr
                        and s["selection"] == sel]
                ax.scatter([p["predicted"] for p in pts], [p["actual"] for p in pts], s=12, color=colours[sel],
                           alpha=0.8, label=f"{sel}: ρ={np.nanmean(rhos):+.2f}")
            lim = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
            ax.plot(lim, lim, color="k", lw=0.6, ls=":")
            ax.set_title(f"{mode}, lr={lr:g}", fontsize=10)
            ax.set_xlabel("predicted ΔJ (first order)")
            ax.set_ylabel("actual ΔJ after the update")
            ax.legend(fontsize=7)
            ax.ticklabel_format(style="sci", scilimits=(-2, 3))
    fig.suptitle(f"{res['env_id']}: removing a subset of B(k), predicted vs actual change of the return target J "
                 f"(rounds {res['rounds']})", fontsize=10)
    fig.tight_layout()
    from .report import fig_to_png

    return fig_to_png(fig)


def to_markdown(res: dict) -> str:
    lines = [f"# Counterfactual validation: {res['env_id']}", "",
             f"Rounds {res['rounds']}, subsets of {res['frac']:.0%} of the buffer; ΔJ = change of the return target "
             "after removing the subset. ρ: Spearman(predicted, actual) over the subsets.", "",
             "| round | update | lr | subsets | n | Spearman ρ | Pearson | slope actual/pred | sign agreement |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in res["summary"]:
        lines.append(f"| {s['round']} | {s['mode']} | {s['learning_rate']:g} | {s['selection']} | {s['n_subsets']} | "
                     f"{s['spearman']:+.3f} | {s['pearson']:+.3f} | {s['slope']:.3g} | {s['sign_agreement']:.0%} |")
    for r in res["per_round"]:
        lines.append(f"\nRound {r['round']}: saved scores reproduced to a max relative error of "
                     f"{r['score_reproduction_max_rel_err']:.1e}.")
    return "\n".join(lines) + "\n"


def write(res: dict, out_dir) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = "-".join(str(k) for k in res["rounds"][:8])
    stem = out / f"validate_r{tag}"
    Path(f"{stem}.json").write_text(json.dumps(res, indent=1))
    Path(f"{stem}.md").write_text(to_markdown(res))
    Path(f"{stem}.png").write_bytes(figure(res))
    return {"json": f"{stem}.json", "md": f"{stem}.md", "png": f"{stem}.png"}


def _floats(spec: str) -> list[float]:
    try:
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--lrs must be comma-separated numbers, got {spec!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastattr validate", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run dir trained with --save-attribution")
    p.add_argument("--round", dest="rounds", required=True, help="round(s): 5, or 1,5,9, or 2-4")
    p.add_argument("--lrs", default=None, help="learning rates, comma-separated (default: the run's x 0.1, 1, 4)")
    p.add_argument("--frac", type=float, default=0.1, help="subset size as a fraction of the buffer (default 0.1)")
    p.add_argument("--subsets", type=int, default=16, help="subsets per selection (default 16)")
    p.add_argument("--modes", default="sgd-step,ppo", help="updates to check: sgd-step, ppo (default both)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random subsets and minibatch orders")
    p.add_argument("--out", default=None, help="output dir (default: the run dir)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    def compute():
        run = runinfo.load_run(a.run)
        rounds = runinfo.parse_rounds(a.rounds, run.rounds)
        return validate(a.run, rounds, _floats(a.lrs) if a.lrs else None, a.frac, a.subsets,
                        tuple(m.strip() for m in a.modes.split(",") if m.strip()), a.seed, not a.no_progress)

    return runinfo.run_tool("validate", compute, write, to_markdown, a.out or a.run)


if __name__ == "__main__":
    raise SystemExit(main())
