"""Helpers for the tests of the scripts under benchmarks/ (not a package): load one as a module, and write a
finished run dir with given metrics rows (no training)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(d: Path, rows: list[dict], rounds: int) -> None:
    """A run dir that counts as finished after `rounds` rounds (8 env steps each) with these metrics rows."""
    d.mkdir(parents=True)
    (d / "args.json").write_text(json.dumps({"total_timesteps": rounds * 8, "n_steps": 8, "num_envs": 1}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
