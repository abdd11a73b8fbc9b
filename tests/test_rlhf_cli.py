"""`fastattr rlhf`, `fastattr compare --rlhf` and `fastattr report` on RLHF runs, on the shared tiny task: the command
runs (subprocess smoke) and resumes, bad arguments exit 2 with one line, Ctrl-C exits 130; compare resumes unfinished
runs and aggregates finished ones into summary.json, summary.md and curves.png; the report of a run dir and of a
compare dir has the curves, the summary and the records as text."""
import json
import re
import subprocess
import sys
from dataclasses import asdict

import pytest
from _rlhf_tiny import TINY_EXPERIMENT, tiny_task

pytest.importorskip("trl")

from fastattr import experiments, launch, report
from fastattr.rlhf import cli
from fastattr.rlhf.experiment import run_rlhf

TINY = json.dumps(asdict(TINY_EXPERIMENT))


def rlhf_argv(run_dir, *extra, method="iif", trainer="ppo", rounds=1):
    _, cache = tiny_task()
    return ["--method", method, "--trainer", trainer, "--seed", "0", "--rounds", str(rounds), "--run-dir",
            str(run_dir), "--cache-dir", str(cache), "--config", TINY, *extra]


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_rlhf_command_runs_and_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "fastattr", "rlhf", *rlhf_argv(run)], capture_output=True, text=True,
                       check=False, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "round 1: reward" in r.stdout and f"done: {run}" in r.stdout
    assert cli.main(rlhf_argv(run, "--resume", rounds=2)) == 0
    assert "resuming" in capsys.readouterr().out
    assert [x["round"] for x in lines(run / "metrics.jsonl")] == [0, 1, 2]
    assert [x["round"] for x in lines(run / "records.jsonl")] == [1, 2]
    assert cli.main(rlhf_argv(run, "--resume", rounds=2)) == 0
    assert "already finished" in capsys.readouterr().out
    assert cli.main(rlhf_argv(run, rounds=2)) == 2  # a run dir holding a run is not overwritten
    err = capsys.readouterr().err
    assert f"{run / 'run.json'} holds a run already" in err and "--resume" in err


@pytest.mark.parametrize("change,match", [
    (["--method", "sft"], "argument --method: invalid choice"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--config", "{bad"], "--config is not valid JSON"),
    (["--config", '{"ppo": {"lr": "fast"}}'], "config.ppo.lr must be a float"),
    (["--config", '{"task": {"layers": 2}}'], "config.task: unknown field(s) layers"),
    (["--config", "no-such-file.json"], "neither a JSON object nor a file"),
])
def test_rlhf_bad_arguments_exit_2_with_one_line(tmp_path, capsys, change, match):
    argv = rlhf_argv(tmp_path / "run")
    i = argv.index(change[0])
    argv[i:i + 2] = change
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_rlhf_refuses_a_run_with_other_settings_and_stops_on_ctrl_c(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"method": "ppo", "trainer": "ppo", "seed": 0, "config": {}}))
    assert cli.main(rlhf_argv(run, "--resume")) == 2
    err = capsys.readouterr().err
    assert f"{run / 'run.json'} holds a run with other settings (ppo/ppo, seed 0, another config)" in err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_rlhf", interrupted)
    assert cli.main(rlhf_argv(tmp_path / "fresh")) == 130
    assert "interrupted" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# compare --rlhf and the report
# ----------------------------------------------------------------------------------------------------------------------
METHODS = ("ppo", "iif", "random")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """A compare dir of 2 seeds x ppo, iif, random (trainer ppo, 2 rounds), written by `compare --rlhf`: iif seed 1
    stops after round 1 and compare resumes it (its `fastattr rlhf` command line run in-process)."""
    out = tmp_path_factory.mktemp("rlhf-compare")
    _, cache = tiny_task()
    for method in METHODS:
        for seed in (0, 1):
            rounds = 1 if (method, seed) == ("iif", 1) else 2
            run_rlhf(method, "ppo", seed, rounds, out / "runs" / f"ppo_{method}_s{seed}", config=TINY_EXPERIMENT,
                     cache_dir=cache, log=lambda message: None)
    launched = []

    def in_process(jobs, n_parallel, out_, n_runs):
        failed = []
        for label, (cmd, _) in jobs.items():
            assert cmd[1:4] == ["-m", "fastattr", "rlhf"] and "--resume" in cmd
            launched.append(label)
            if cli.main(cmd[4:]) != 0:
                failed.append(label)
        return failed

    mp = pytest.MonkeyPatch()
    mp.setattr(launch, "run_all", in_process)
    try:
        rc = experiments.main_compare(["--rlhf", "--trainer", "ppo", "--seeds", "0-1", "--methods", ",".join(METHODS),
                                       "--rounds", "2", "--out", str(out), "--config", TINY, "--cache-dir", str(cache)])
    finally:
        mp.undo()
    assert rc == 0 and launched == ["ppo/iif seed 1"]
    return out


def test_compare_rlhf_aggregates_runs_into_summary_and_plot(compared):
    summary = json.loads((compared / "summary.json").read_text())
    assert summary["kind"] == "rlhf" and summary["rounds"] == 2 and summary["unfinished_runs"] == []
    methods = summary["trainers"]["ppo"]
    assert list(methods) == list(METHODS)
    rows = {(m, s): lines(compared / "runs" / f"ppo_{m}_s{s}" / "metrics.jsonl")[-1] for m in METHODS for s in (0, 1)}
    for m, e in methods.items():
        assert e["seeds"] == [0, 1] and e["final_reward"]["n"] == 2
        assert e["final_reward"]["mean"] == pytest.approx((rows[m, 0]["reward"] + rows[m, 1]["reward"]) / 2)
        assert e["final_toxicity"]["lo"] <= e["final_toxicity"]["mean"] <= e["final_toxicity"]["hi"]
        reach = e["to_baseline_final"]
        for s, d in reach["per_seed"].items():
            assert d["level"] == rows["ppo", int(s)]["reward"] and 1 <= d["round"] <= 3
            assert d["reached"] == (d["round"] <= 2) and (int(s) in reach["unreached_seeds"]) == (not d["reached"])
    assert methods["ppo"]["to_baseline_final"]["unreached_seeds"] == []  # ppo reaches its own final reward
    assert "reward_change" in methods["iif"] and "reward_change" not in methods["ppo"]
    md = (compared / "summary.md").read_text()
    assert "## ppo trainer, 2 rounds" in md and "| iif | 2 |" in md and "rounds to ppo's final reward" in md
    assert (compared / "curves.png").stat().st_size > 20_000


def test_compare_rlhf_bad_arguments_exit_2(tmp_path, capsys):
    base = ["--rlhf", "--out", str(tmp_path / "cmp"), "--seeds", "0"]
    assert experiments.main_compare([*base, "--methods", "ppo,iif-all-neg"]) == 2
    assert "with --rlhf choose from ppo, iif, random" in capsys.readouterr().err
    assert experiments.main_compare([*base, "--total-timesteps", "5"]) == 2
    assert "unknown arguments with --rlhf: --total-timesteps 5" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def _section(page: str, sid: str) -> str:
    m = re.search(rf"<section id=\"{sid}\">(.*?)</section>", page, re.DOTALL)
    assert m, f"section {sid} missing"
    return m.group(1)


def test_report_of_an_rlhf_compare_dir_and_run_dir(compared, tmp_path):
    assert report.main([str(compared)]) == 0
    page = (compared / "report.html").read_text()
    for sid, _ in report.RLHF_SECTIONS:
        assert 'class="missing"' not in _section(page, sid), sid
    assert page.count("data:image/png;base64,") == 2  # the curves and the cost
    assert "rounds to ppo&#x27;s final reward" in _section(page, "summary")
    records = lines(compared / "runs" / "ppo_iif_s0" / "records.jsonl")
    shown = _section(page, "records")
    assert records[-1]["top"][0]["completion"] in shown and records[0]["bottom"][0]["prompt"] in shown

    run = compared / "runs" / "ppo_random_s1"
    assert report.main([str(run), "--out", str(tmp_path / "run.html")]) == 0
    page = (tmp_path / "run.html").read_text()
    assert lines(run / "records.jsonl")[-1]["bottom"][-1]["completion"] in _section(page, "records")
    assert "No ppo run to compare with" in _section(page, "summary")  # and which command gives it
    assert report.main([str(compared / "runs" / "ppo_ppo_s0"), "--out", str(tmp_path / "ppo.html")]) == 0
    assert "No records.jsonl" in _section((tmp_path / "ppo.html").read_text(), "records")
