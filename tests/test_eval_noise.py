"""benchmarks/eval_noise.py's table, on synthetic run dirs: the 100-episode runs are read at the 1,000-episode runs'
checkpoints only, a pair whose training differs is flagged, and the evaluation noise columns are the stored standard
deviations over sqrt(episodes) and the returns' differences."""
from pathlib import Path

import numpy as np
import pytest
from _bench import load_benchmark, write_run

eval_noise = load_benchmark("eval_noise")

ROUNDS = 10


def write(d: Path, level: float, episodes: int, every: int, std: float, shift: float = 0.0, kl: float = 0.01):
    rows = []
    for r in range(ROUNDS + 1):
        row = {"round": r, "global_step": 8 * r, "train_return": 0.1 * r, "approx_kl": None if r == 0 else kl,
               "eval_return": None}
        if r % every == 0:
            row.update(eval_return=level * r / ROUNDS + shift, eval_return_std=std, eval_episodes=episodes)
        rows.append(row)
    write_run(d, rows, ROUNDS)


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_noise, "ROOT", tmp_path)
    return tmp_path


def test_noise_columns_and_metrics_from_both_budgets(root):
    for s in (0, 1):
        write(eval_noise.small_dir("ppo", s), 0.5, 100, 1, std=0.3, shift=0.02)
        write(eval_noise.big_dir("ppo", s), 0.5, 1000, eval_noise.EVERY, std=0.3)
        write(eval_noise.small_dir("iif", s), 0.8, 100, 1, std=0.2, shift=-0.01)
        write(eval_noise.big_dir("iif", s), 0.8, 1000, eval_noise.EVERY, std=0.2)
    out = eval_noise.table([0, 1])
    assert "ppo s0: identical" in out and "DIFFERENT" not in out
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| ")}
    ppo = [c.strip() for c in rows["ppo"]]
    assert ppo[2] == str(2 * (ROUNDS // eval_noise.EVERY + 1))                  # checkpoints 0, 5, 10 on 2 seeds
    assert float(ppo[3]) == pytest.approx(0.3 / np.sqrt(100), rel=1e-3)
    assert float(ppo[4]) == pytest.approx(0.3 / np.sqrt(1000), rel=1e-3)
    assert float(ppo[5]) == pytest.approx(0.02, rel=1e-3)
    assert float([c.strip() for c in rows["iif"]][5]) == pytest.approx(-0.01, rel=1e-3)
    # the every-5th-round metrics from both budgets, and the published every-round one
    assert "| 100 episodes, every 5th round | 2 |" in out and "| 1000 episodes, every 5th round | 2 |" in out
    assert "every round (the runs as published) | 2 |" in out


def test_a_pair_that_trained_differently_is_flagged_and_unfinished_runs_listed(root):
    write(eval_noise.small_dir("ppo", 0), 0.5, 100, 1, std=0.3)
    write(eval_noise.big_dir("ppo", 0), 0.5, 1000, eval_noise.EVERY, std=0.3, kl=0.02)
    out = eval_noise.table([0])
    assert "ppo s0: DIFFERENT" in out
    assert "iif seed 0: not finished" in out
