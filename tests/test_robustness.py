"""Nothing lost, nothing raw: damaged files, odd run dirs and interrupted commands end in a rebuild or a one-line error
that names the file and the fix, never in a gap or a traceback."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastattr import experiments, launch, ppo, runinfo
from fastattr.rl.config import Args
from fastattr.rl.rundir import checkpoint_path, theta_path
from fastattr.store import round_path

from _synthetic_run import train_tiny

TINY = dict(env_id="CartPole-v1", n_steps=64, batch_size=32, n_epochs=2, eval_episodes=2, progress=False)
TINY_FLAGS = ["--env-id", "CartPole-v1", "--n-steps", "64", "--batch-size", "32", "--n-epochs", "2",
              "--eval-episodes", "2", "--no-progress", "--method", "iif"]


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "fastattr", *argv], capture_output=True, text=True, timeout=300)


def one_line_error(r, *needles):
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr


def rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines() if x.strip()]


def deterministic(row):
    return {k: v for k, v in row.items() if not k.endswith("seconds") and k not in ("sps", "time")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("robust") / "run"
    ppo.main(Args(**TINY, method="iif", total_timesteps=192, run_dir=str(run)))
    return run


DAMAGE = {
    "cut_line": lambda text: text[:-25],
    "garbage_line": lambda text: text.replace("\n", "\nnot json at all\n", 1),
    "deleted": None,
    "last_rows_removed": lambda text: "".join(line + "\n" for line in text.splitlines()[:-2]),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_metrics_are_rebuilt_on_resume(tmp_path, finished, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = rows(run)
    metrics = run / "metrics.jsonl"
    if DAMAGE[damage] is None:
        metrics.unlink()
    else:
        metrics.write_text(DAMAGE[damage](metrics.read_text()))
    # a finished run: --resume only rebuilds the file
    assert experiments.main_train([*TINY_FLAGS, "--total-timesteps", "192", "--run-dir", str(run), "--resume"]) == 0
    assert rows(run) == before
    # the same damage before an extension: every row there, none missing
    if DAMAGE[damage] is None:
        metrics.unlink()
    else:
        metrics.write_text(DAMAGE[damage](metrics.read_text()))
    assert experiments.main_train([*TINY_FLAGS, "--total-timesteps", "320", "--run-dir", str(run), "--resume"]) == 0
    assert [r["round"] for r in rows(run)] == [0, 1, 2, 3, 4, 5] and rows(run)[:4] == before


def test_a_finished_run_is_extended_exactly_like_a_longer_run(tmp_path):
    straight = ppo.main(Args(**TINY, method="iif", total_timesteps=320, run_dir=str(tmp_path / "straight")))
    ppo.main(Args(**TINY, method="iif", total_timesteps=192, run_dir=str(tmp_path / "grown")))
    with pytest.raises(ValueError, match="extend a run but not shorten it"):
        ppo.main(Args(**TINY, method="iif", total_timesteps=128, run_dir=str(tmp_path / "grown"), resume=True))
    grown = ppo.main(Args(**TINY, method="iif", total_timesteps=320, run_dir=str(tmp_path / "grown"), resume=True))
    assert straight["round"] == grown["round"] == 5
    assert [deterministic(r) for r in rows(tmp_path / "straight")] == [deterministic(r) for r in rows(tmp_path / "grown")]
    a = torch.load(checkpoint_path(tmp_path / "straight"), weights_only=True)["agent"]
    b = torch.load(checkpoint_path(tmp_path / "grown"), weights_only=True)["agent"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="holds another run"):  # any other change is still refused
        ppo.main(Args(**TINY, method="iif", total_timesteps=320, seed=3, run_dir=str(tmp_path / "grown"),
                      resume=True))


@pytest.mark.parametrize("how", ["truncated", "empty"])
def test_damaged_checkpoint_is_a_one_line_error(tmp_path, finished, how):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    ck = checkpoint_path(run)
    ck.write_bytes(ck.read_bytes()[: len(ck.read_bytes()) // 2] if how == "truncated" else b"")
    r = run_cli("train", *TINY_FLAGS, "--total-timesteps", "320", "--run-dir", str(run), "--resume")
    one_line_error(r, "latest.pt is damaged", "new --run-dir")


def test_damaged_args_json_is_named(tmp_path, finished):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "args.json").write_text('{"env_id": "CartPole-v1", "meth')
    one_line_error(run_cli("train", *TINY_FLAGS, "--total-timesteps", "192", "--run-dir", str(run), "--resume"),
                   "args.json is damaged")
    one_line_error(run_cli("diagnose", str(run), "--round", "0"), "args.json is damaged")


def test_run_dir_that_is_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    one_line_error(run_cli("train", *TINY_FLAGS, "--total-timesteps", "128", "--run-dir", str(f)),
                   "is a file, not a directory")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes through read-only permissions")
def test_read_only_run_dir(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        one_line_error(run_cli("train", *TINY_FLAGS, "--total-timesteps", "128", "--run-dir", str(d / "run")),
                       "cannot be created")
    finally:
        d.chmod(0o700)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("saved") / "run", rounds=3, probe="frozenlake-down", probe_targets=5)


@pytest.mark.parametrize("which", ["attribution", "theta"])
def test_damaged_round_files_are_one_line_errors(tmp_path, saved, which):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(saved, run)
    path = round_path(run, 1) if which == "attribution" else theta_path(run, 1)
    path.write_bytes(path.read_bytes()[:100])
    commands = [("behaviour", str(run), "--probe", "frozenlake-down", "--rounds", "1", "--no-progress"),
                ("validate", str(run), "--round", "1", "--subsets", "3", "--modes", "sgd-step", "--no-progress")]
    if which == "attribution":
        commands.append(("diagnose", str(run), "--round", "1"))
    for argv in commands:
        one_line_error(run_cli(*argv), "is damaged", path.name)
    r = run_cli("report", str(run))  # the report leaves the damaged round out and says so
    assert r.returncode in (0, 2) and "Traceback" not in r.stderr, r.stderr


def test_seeds_are_validated():
    for bad in ("0,,1", "0-1000000", "-1", "3-1", ""):
        with pytest.raises(ValueError, match="--seeds"):
            runinfo.parse_seeds(bad)
    r = run_cli("compare", "--env-id", "CartPole-v1", "--seeds", "0,,1", "--out", "/tmp/never")
    one_line_error(r, "--seeds")


def test_ctrl_c_in_compare_is_a_message(tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(launch.subprocess, "run", interrupted)
    rc = experiments.main_compare(["--env-id", "CartPole-v1", "--seeds", "0", "--methods", "ppo", "--out",
                                   str(tmp_path / "cmp"), "--jobs", "1", "--total-timesteps", "128", "--n-steps", "64"])
    assert rc == 130 and "interrupted" in capsys.readouterr().err


def test_zero_records_and_zero_targets():
    import fastattr
    from torch import nn

    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    none = torch.zeros(0, 3)
    assert fastattr.score(m, lambda m: m(none).squeeze(-1), lambda m: m(torch.ones(2, 3)).sum()).shape == (0,)
    assert fastattr.score(m, lambda m: m(none).squeeze(-1), lambda m: m(torch.ones(2, 3)).squeeze(-1)).shape == (0, 2)
    with pytest.raises(fastattr.ScoringError, match="zero targets"):
        fastattr.score(m, lambda m: m(torch.ones(2, 3)).squeeze(-1), lambda m: m(none).squeeze(-1))
