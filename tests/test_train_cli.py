"""`fastattr train` and `fastattr compare` as a user runs them (subprocess smoke, CleanRL style) plus flag parsing."""
import json
import subprocess
import sys

import pytest

from fastattr import experiments, ppo, runinfo
from fastattr.rl.config import Args

TINY = ["--n-steps", "64", "--batch-size", "32", "--n-epochs", "2", "--eval-episodes", "2"]


def fastattr(*argv, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastattr", *argv], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_train_subprocess_smoke(tmp_path):
    run = tmp_path / "run"
    r = fastattr("train", "--env-id", "CartPole-v1", "--method", "iif", "--seed", "0", "--total-timesteps", "128",
                 "--run-dir", str(run), "--no-progress", *TINY)
    assert r.returncode == 0, r.stderr
    assert "done:" in r.stdout
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0, 1, 2]
    for key in ("round", "global_step", "eval_return", "kept_fraction", "attr_seconds", "update_seconds",
                "rollout_seconds", "eval_seconds", "wall_seconds"):
        assert key in lines[-1]
    assert json.loads((run / "args.json").read_text())["method"] == "iif"
    # a second plain call refuses; --resume on a finished run is a no-op
    r = fastattr("train", "--env-id", "CartPole-v1", "--method", "iif", "--seed", "0", "--total-timesteps", "128",
                 "--run-dir", str(run), "--no-progress", *TINY)
    assert r.returncode == 2 and "--resume" in r.stderr
    r = fastattr("train", "--env-id", "CartPole-v1", "--method", "iif", "--seed", "0", "--total-timesteps", "128",
                 "--run-dir", str(run), "--no-progress", "--resume", *TINY)
    assert r.returncode == 0 and "already finished" in r.stdout


@pytest.mark.parametrize("argv,match", [
    (["--env-id", "NoSuchEnv-v0"], "unknown --env-id"),
    (["--env-id", "CartPole-v1", "--p", "0"], "must be in (0, 1]"),
    (["--env-id", "CartPole-v1", "--preset", "paper"], "no paper preset"),
    (["--env-id", "CartPole-v1", "--env-kwargs", "[1]"], "JSON object"),
])
def test_train_bad_flags_exit_2(tmp_path, capsys, argv, match):
    r = experiments.main_train([*argv, "--run-dir", str(tmp_path / "r"), "--no-progress"]) if "[1]" not in argv \
        else None
    if r is None:
        with pytest.raises(SystemExit) as e:
            experiments.main_train([*argv, "--run-dir", str(tmp_path / "r")])
        assert e.value.code == 2
    else:
        assert r == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_build_args_precedence():
    a = experiments.build_args({"env_id": "LunarLander-v3", "preset": "paper", "p": 0.25})
    assert (a.p, a.optimizer, a.learning_rate, a.total_timesteps, a.n_steps) == (0.25, "sgd", 5e-3, 307_200, 2048)
    b = experiments.build_args({"env_id": "BipedalWalker-v3", "preset": "paper"})
    assert (b.optimizer, b.learning_rate, b.p) == ("adam", 3e-4, 0.0625)
    c = experiments.build_args({"env_id": "FrozenLake-v1", "preset": "paper"})
    assert c.env_kwargs == {"map_name": "4x4", "is_slippery": False} and c.eval_episodes == 1000
    assert experiments.build_args({"env_id": "Acrobot-v1"}).optimizer == Args().optimizer
    assert experiments.parse_int_list("0-2,5") == [0, 1, 2, 5]
    assert runinfo.parse_seeds("0,0,1") == [0, 1] and runinfo.parse_rounds("all", [2, 5]) == [2, 5]
    with pytest.raises(ValueError, match="--round"):  # a reversed range was an empty list (and exit 0)
        runinfo.parse_rounds("9-5", [5, 9])
    with pytest.raises(ValueError, match="--seeds"):
        experiments.parse_int_list("3-1")


def test_compare_runs_aggregates_and_resumes(tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--env-id", "CartPole-v1", "--seeds", "0-1", "--methods", "ppo,iif", "--out", str(out),
            "--jobs", "2", "--total-timesteps", "128", *TINY]
    r = fastattr(*argv)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((out / "summary.json").read_text())
    iif = summary["methods"]["iif"]
    assert iif["seeds"] == [0, 1] and iif["se_ave"]["n"] == 2 and iif["final_gain"]["n"] == 2
    assert (out / "curves.png").stat().st_size > 10_000
    assert "SE_ave" in (out / "summary.md").read_text()

def test_compare_skips_finished_runs_and_rejects_bad_methods(tmp_path, capsys):
    out = tmp_path / "cmp"
    for m in ("ppo", "iif"):
        ppo.main(Args(env_id="CartPole-v1", method=m, seed=0, n_steps=64, batch_size=32, n_epochs=1,
                          total_timesteps=128, eval_episodes=2, progress=False, run_dir=str(out / "runs" / f"{m}_s0")))
    argv = ["--env-id", "CartPole-v1", "--seeds", "0", "--methods", "ppo,iif", "--out", str(out), "--n-steps", "64",
            "--batch-size", "32", "--n-epochs", "1", "--total-timesteps", "128", "--eval-episodes", "2"]
    assert experiments.main_compare(argv) == 0
    assert "2 of 2 runs already finished; running 0" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["methods"]["iif"]["se_ave"]["n"] == 1
    assert experiments.main_compare(["--env-id", "CartPole-v1", "--methods", "ppo,best", "--out", str(out)]) == 2
    assert "--methods" in capsys.readouterr().err
    assert experiments.main_compare(argv + ["--seed", "3"]) == 2
    empty = ["--env-id", "CartPole-v1", "--seeds", "0", "--out", str(tmp_path / "empty"), "--aggregate-only"]
    assert experiments.main_compare(empty) == 1  # nothing to summarise is a failure, not a success
    capsys.readouterr()
    # finished runs trained with other settings are never paired with new ones: refused before anything runs
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert experiments.main_compare(argv + ["--learning-rate", "0.05", "--seeds", "0-1"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "ppo_s0" in err
    assert f"learning_rate: {Args().learning_rate!r} there vs 0.05 now" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not (out / "runs" / "ppo_s1").exists()


def test_demo_prints_where_the_plot_and_summary_are(tmp_path, capsys):
    from fastattr import demo

    rc = demo.main(["--seeds", "0", "--out", str(tmp_path), "--jobs", "2", "--total-timesteps", "2048",
                    "--eval-episodes", "20"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"plot:    {tmp_path / 'FrozenLake-v1' / 'curves.png'}" in out and "SE_ave" in out
    assert (tmp_path / "FrozenLake-v1" / "curves.png").exists()
