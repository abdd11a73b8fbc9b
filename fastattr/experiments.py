"""`fastattr train` (one run) and `fastattr compare` (methods x seeds in parallel processes, then plots and the
paper's metrics). Flags come from the Args dataclass through tyro (field docstrings are the --help text); `--preset
paper` applies the paper's settings for the env (fastattr/envs.py) under any flag given explicitly."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from . import filtering, ppo
from .launch import run_all
from .runinfo import parse_int_list
from .rl.config import Args, paper_overrides, validate_args
from .rl.rundir import args_differences, checkpoint_path, load_checkpoint, recorded_args, semantic_args


# ----------------------------------------------------------------------------------------------------------------------
# Args <-> the command line (tyro builds the flags from the Args dataclass and its field docstrings)
# ----------------------------------------------------------------------------------------------------------------------
TRAIN_DESCRIPTION = ("Train PPO / IIF on one env and seed with per-round attribution. Writes <run-dir>/args.json, "
                     "metrics.jsonl (one line per round), checkpoints/ and, with --save-attribution, attribution/. "
                     "--preset paper applies the paper's settings for --env-id; flags given explicitly win.")


def preset_defaults(env_id: str | None, preset: str | None) -> Args:
    """Args defaults, with the paper preset applied for env_id when preset == 'paper'."""
    if preset == "paper":
        if not env_id:
            raise ValueError("--preset paper needs --env-id")
        return Args(**paper_overrides(env_id))
    return Args()


def build_args(given: dict) -> Args:
    """Args defaults < the paper preset (if given['preset'] == 'paper') < the values given."""
    if given.get("preset") not in (None, "", "paper"):
        raise ValueError(f"--preset must be 'paper', got {given['preset']!r}")
    return dataclasses.replace(preset_defaults(given.get("env_id"), given.get("preset")), **given)


def parse_train_args(argv: list[str], prog: str = "fastattr train") -> Args:
    """The Args of a `fastattr train` command line: defaults < --preset paper < the flags given (tyro prints usage
    errors and exits 2)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--env-id")
    pre.add_argument("--preset", default="")
    known, _ = pre.parse_known_args(argv)
    default = preset_defaults(known.env_id, known.preset if known.preset == "paper" else "")
    import tyro

    return tyro.cli(Args, args=argv, default=default, prog=prog, description=TRAIN_DESCRIPTION)


def main_train(argv: list[str] | None = None) -> int:
    argv = sys.argv[2:] if argv is None else list(argv)
    try:
        args = parse_train_args(argv)
        out = ppo.main(args)
    except (ValueError, FloatingPointError) as e:  # RunDirError is a ValueError
        print(f"fastattr train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nfastattr train: interrupted; the run dir keeps its last finished round: add --resume to the same "
              "command to continue", file=sys.stderr)
        return 130
    if out.get("already_finished"):
        print(f"{out['run_dir']}: already finished (round {out.get('round')}); nothing to do")
    else:
        ret = out.get("eval_return")
        print(f"done: {out['run_dir']}  round {out.get('round')}  steps {out.get('global_step')}  "
              f"eval return {ret if ret is None else f'{ret:.4g}'}")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# compare
# ----------------------------------------------------------------------------------------------------------------------
def run_finished(run_dir: Path) -> bool:
    """True when run_dir holds a checkpoint marked finished (a run `fastattr compare` skips)."""
    ck = checkpoint_path(run_dir)
    if not ck.exists():
        return False
    try:
        return bool(load_checkpoint(ck).get("finished"))
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is simply not finished
        return False


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastattr compare", formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
        description="Run methods x seeds (one `fastattr train` process each, --jobs at a time; resumable: finished "
                    "runs are skipped, killed ones resumed) and write OUT/curves.png, OUT/summary.json, "
                    "OUT/summary.md. Any other `fastattr train` flag (e.g. --preset paper, --total-timesteps) is "
                    "passed to every run. With --rlhf: the RLHF detoxification experiment instead (`fastattr rlhf` "
                    "runs under OUT/runs/<trainer>_<method>_s<seed>/; fastattr/rlhf/compare.py).")
    p.add_argument("--env-id", help="gymnasium id (required without --rlhf)")
    p.add_argument("--seeds", default="0-4", help="seeds: '0-4' or '0,3,7'")
    p.add_argument("--methods", default="ppo,iif,random", help="comma-separated: ppo, iif, iif-all-neg, random")
    p.add_argument("--out", required=True, help="output dir (runs under OUT/runs/<method>_s<seed>/)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs in parallel (the number of cores)")
    p.add_argument("--baseline", default="ppo", help="method the others are measured against")
    p.add_argument("--aggregate-only", action="store_true", help="do not run anything; summarise what exists")
    rlhf = p.add_argument_group("RLHF (with --rlhf; --methods from ppo, iif, random)")
    rlhf.add_argument("--rlhf", action="store_true", help="compare on the RLHF detoxification experiment")
    rlhf.add_argument("--trainer", default="grpo", choices=("grpo", "ppo", "both"), help="the RL trainer(s)")
    rlhf.add_argument("--rounds", type=int, default=20, help="rounds per run")
    rlhf.add_argument("--config", default=None, help="ExperimentConfig fields over the defaults (JSON object or "
                                                     "file; see `fastattr rlhf --help`)")
    rlhf.add_argument("--cache-dir", default="runs/rlhf-cache", help="where the task is cached")
    return p


def main_compare(argv: list[str] | None = None) -> int:
    p = compare_parser()
    opts, rest = p.parse_known_args(argv)
    if opts.rlhf:
        from .rlhf.compare import main_compare_rlhf

        return main_compare_rlhf(opts, rest)
    if not opts.env_id:
        p.error("the following arguments are required: --env-id")
    try:
        seeds = parse_int_list(opts.seeds)
        methods = [m.strip() for m in opts.methods.split(",") if m.strip()]
        bad = [m for m in methods if m not in filtering.METHODS]
        if bad or not methods:
            raise ValueError(f"--methods: unknown {bad}; choose from {', '.join(filtering.METHODS)}")
        if opts.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {opts.jobs}")
        forbidden = [a for a in rest if a.split("=")[0] in ("--method", "--seed", "--run-dir", "--env-id")]
        if forbidden:
            raise ValueError(f"{forbidden} are set by compare itself (use --methods, --seeds, --out)")
        # validate the pass-through flags once, before launching anything
        checked = parse_train_args(rest + ["--env-id", opts.env_id, "--method", methods[0], "--run-dir",
                                           os.path.join(opts.out, "_check")], prog="fastattr compare (train flags)")
        validate_args(checked)
        if {"random", "iif-all-neg"} <= set(methods) and checked.p < 1:
            print(f"compare: note: `random` drops as many records as `iif` at --p {checked.p}, not as `iif-all-neg`; "
                  "for a same-size control of iif-all-neg run it with --p 1", file=sys.stderr)
        out = Path(opts.out)
        # seed-major order: with --jobs 1 the paired comparisons (ppo vs iif of one seed) complete early
        runs = {(m, s): out / "runs" / f"{m}_s{s}" for s in seeds for m in methods}
        other = [] if opts.aggregate_only else runs_with_other_settings(runs, checked)
        if other:
            raise ValueError(f"--out {out} holds runs trained with other settings: {'; '.join(other)}. Pass the flags "
                             "they were run with, or choose another --out. Nothing was run.")
    except ValueError as e:
        print(f"fastattr compare: error: {e}", file=sys.stderr)
        return 2

    failed = []
    if not opts.aggregate_only:
        todo = [(m, s) for (m, s), d in runs.items() if not run_finished(d)]
        jobs = {f"{m} seed {s}": ([sys.executable, "-m", "fastattr", "train", "--env-id", opts.env_id, "--method", m,
                                   "--seed", str(s), "--run-dir", str(runs[m, s]), "--resume", "--no-progress", *rest],
                                  f"{m}_s{s}") for m, s in todo}
        failed = run_all(jobs, opts.jobs, out, len(runs))
        if failed is None:
            return 130
    paths = aggregate(out, opts.env_id, methods, seeds, opts.baseline)
    if paths:
        print("\n".join(f"wrote {p}" for p in paths))
    return 1 if failed or (opts.aggregate_only and not paths) else 0


def runs_with_other_settings(runs: dict[tuple[str, int], Path], args: Args) -> list[str]:
    """Existing runs whose args.json differs from what compare would pass them (args with each run's method, seed
    and run dir), as 'dir (differences)'. A finished run is skipped rather than resumed, so `train` never gets to
    check it."""
    other = []
    for (m, s), d in runs.items():
        if (d / "args.json").exists():
            now = semantic_args(dataclasses.replace(args, method=m, seed=s, run_dir=str(d)))
            diff = args_differences(recorded_args(d), now)
            if diff:
                other.append(f"{d} ({diff})")
    return other


def aggregate(out: Path, env_id: str, methods: list[str], seeds: list[int], baseline: str = "ppo") -> list[Path]:
    """Reads OUT/runs/*/metrics.jsonl of finished runs; writes summary.json, summary.md and curves.png."""
    from . import metrics

    curves: dict[str, dict[int, metrics.Curve]] = {}
    unfinished = []
    for m in methods:
        for s in seeds:
            d = out / "runs" / f"{m}_s{s}"
            if run_finished(d):
                curves.setdefault(m, {})[s] = metrics.load_curve(d)
            else:
                unfinished.append(f"{m}_s{s}")
    if not curves:
        print(f"compare: no finished runs under {out / 'runs'} yet", file=sys.stderr)
        return []
    summary = metrics.summarize(curves, baseline=baseline)
    summary["env_id"] = env_id
    summary["unfinished_runs"] = unfinished
    run_args = {}
    for m in curves:
        s = next(iter(curves[m]))
        args_file = out / "runs" / f"{m}_s{s}" / "args.json"
        if args_file.exists():
            run_args[m] = json.loads(args_file.read_text())
    summary["args"] = run_args
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    md = metrics.to_markdown(summary, title=f"{env_id}: {', '.join(curves)} ({len(seeds)} seeds requested)")
    if unfinished:
        md += f"\nNot finished (left out): {', '.join(unfinished)}\n"
    (out / "summary.md").write_text(md)
    plot_curves(curves, out / "curves.png", env_id)
    return [out / "summary.json", out / "summary.md", out / "curves.png"]


def plot_curves(curves, path: Path, env_id: str) -> None:
    """Mean and 95% CI over seeds per method against env steps, training wall-clock and optimisation time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from . import metrics
    from .probes import return_range

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for method, runs in curves.items():
        cs = list(runs.values())
        n = min(len(c.returns) for c in cs)
        mean, lo, hi = metrics.band([c.returns[:n] for c in cs], bounds=return_range(env_id))
        xs = {
            0: np.mean([c.steps[:n] for c in cs], 0),
            1: np.mean([c.train[:n] for c in cs], 0),
            2: np.mean([c.opt[:n] for c in cs], 0),
        }
        for i, ax in enumerate(axes):
            (line,) = ax.plot(xs[i], mean, label=f"{method} (n={len(cs)})")
            ax.fill_between(xs[i], lo, hi, color=line.get_color(), alpha=0.2)
    labels = ["environment steps", "training wall-clock (s): rollouts + influence + optimisation",
              "optimisation + influence time (s), the paper's RT"]
    for ax, xl in zip(axes, labels):
        ax.set_xlabel(xl)
        ax.set_ylabel("evaluation return (stochastic policy)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{env_id}: mean and 95% CI over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
