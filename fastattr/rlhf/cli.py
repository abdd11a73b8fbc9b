"""`fastattr rlhf`: one run of the RLHF detoxification experiment (fastattr.rlhf.experiment.run_rlhf).

    fastattr rlhf --method iif --trainer grpo --seed 0 --rounds 20 --run-dir runs/rlhf/grpo_iif_s0 [--resume]

The task is built once and cached under --cache-dir (default runs/rlhf-cache), then reused. Every round is trained,
evaluated on the test prompts and printed as one line. The run dir gets run.json (method, trainer, seed, config),
metrics.jsonl (one line per round; round 0 = the pretrained policy), records.jsonl (iif and random: each round's 3
highest- and 3 lowest-scoring records as text) and checkpoints. Ctrl-C keeps the last finished round: the same
command with --resume continues it, bit-identically.

--config takes a JSON object, or a .json file holding one, of ExperimentConfig fields set over the defaults (nested
sections as objects), e.g. '{"eval_samples": 4, "task": {"n_train": 256}, "ppo": {"lr": 1e-4}}'; the tests run a tiny
configuration this way. A run resumes only with the configuration it was started with.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .experiment import (METHODS, TRAINERS, ExperimentConfig, check_run_dir, completed_rounds, config_from_dict,
                         run_meta, run_rlhf)
from .task import default_cache_dir

PROG = "fastattr rlhf"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = _Parser(prog=PROG, description=doc[0], epilog="\n\n".join(doc[2:]), allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=METHODS,
                   help="ppo: every record trains; iif: keep the records whose score is >= 0; random: drop as many "
                        "at random")
    p.add_argument("--trainer", required=True, choices=TRAINERS,
                   help="grpo: TRL's GRPOTrainer (IIFGRPOTrainer for iif / random); ppo: fastattr's sequence PPO")
    p.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    p.add_argument("--rounds", type=int, default=20, help="rounds of generation + update (default 20)")
    p.add_argument("--run-dir", default=None, help="output dir (default runs/rlhf/<trainer>_<method>_s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last finished round")
    p.add_argument("--cache-dir", default=None, help=f"where the task is cached (default {default_cache_dir()})")
    p.add_argument("--config", default=None, help="ExperimentConfig fields over the defaults: a JSON object or a "
                                                   ".json file (see below)")
    return p


def load_config(spec: str | None) -> ExperimentConfig:
    """--config: None (the defaults), a JSON object, or the path of a .json file holding one."""
    if spec is None:
        return ExperimentConfig()
    text = spec
    if not spec.lstrip().startswith("{"):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"--config: {spec!r} is neither a JSON object nor a file")
        text = path.read_text()
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--config is not valid JSON ({e})") from None
    return config_from_dict(values)


def _print(message: str) -> None:
    print(message, flush=True)


def main(argv: list[str] | None = None) -> int:
    opts = parser().parse_args(sys.argv[2:] if argv is None else list(argv))
    run_dir = Path(opts.run_dir or Path("runs") / "rlhf" / f"{opts.trainer}_{opts.method}_s{opts.seed}")
    try:
        if opts.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {opts.rounds}")
        if opts.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {opts.seed}")
        config = load_config(opts.config)
        check_run_dir(run_dir, run_meta(opts.method, opts.trainer, opts.seed, config), opts.resume)
    except FileExistsError:
        print(f"{PROG}: error: {run_dir / 'run.json'} holds a run already: add --resume to continue it, or choose "
              "another --run-dir", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    done = completed_rounds(run_dir) if opts.resume else -1
    if done >= opts.rounds:
        print(f"{run_dir}: already finished (round {done}); nothing to do")
        return 0
    try:
        rows = run_rlhf(opts.method, opts.trainer, opts.seed, opts.rounds, run_dir, opts.resume, config=config,
                        cache_dir=opts.cache_dir, log=_print)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; {run_dir} keeps its last finished round: add --resume to the same command to "
              "continue", file=sys.stderr)
        return 130
    last = rows[-1]
    print(f"done: {run_dir}  round {last['round']}  reward {last['reward']:.3f}  toxicity {last['toxicity']:.3f}  "
          f"({last['wall_seconds']:.0f} s)")
    return 0
