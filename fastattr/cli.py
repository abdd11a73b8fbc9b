"""The `fastattr` command line. Each subcommand lives in its own module with `main(argv) -> int`; this file only
dispatches, so `fastattr --help` stays fast (no env or plotting imports until a command runs)."""
from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "info": ("fastattr.info", "versions, which kernels are built, and a numeric self-test of every op"),
    "demo": ("fastattr.demo", "the main job on an embedded default (what `make demo` runs)"),
    "train": ("fastattr.experiments", "train PPO / IIF on one env and seed, with per-round attribution"),
    "compare": ("fastattr.experiments", "run methods x seeds in parallel and write curves.png, summary.{json,md}"),
    "rlhf": ("fastattr.rlhf.cli", "one run of the RLHF detoxification experiment (method x trainer x seed)"),
    "diagnose": ("fastattr.diagnose", "top/bottom records of a saved round and what they have in common"),
    "behaviour": ("fastattr.behaviour", "behaviour-formation analysis of a probe across rounds"),
    "intervene": ("fastattr.intervene", "retrain chosen rounds without negative / random records"),
    "validate": ("fastattr.validate", "counterfactual check: predicted vs actual change of the target"),
    "report": ("fastattr.report", "one self-contained report.html for a run or compare dir"),
}


def _usage() -> str:
    lines = ["usage: fastattr <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`fastattr <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fastattr: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    entry = getattr(module, f"main_{name}", None) or getattr(module, "main")
    return int(entry(rest) or 0)
