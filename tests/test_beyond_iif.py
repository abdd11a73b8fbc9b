"""benchmarks/beyond_iif.py's table, which the contest's published numbers come from: on synthetic run dirs with
known curves it picks PPO's best learning rate by mean return over the evaluated rounds, pairs the gains by seed, puts
in the verdict line exactly the labels whose 95% CI excludes 0, and reports each label's step size and kept fraction;
unfinished runs are left out."""
import numpy as np
import pytest
from _bench import load_benchmark
from _bench import write_run as write_run_dir

beyond_iif = load_benchmark("beyond_iif")

ROUNDS = 4  # total_timesteps // (n_steps * num_envs)


def write_run(root, label, seed, level, kl=0.01, kept=1.0, rounds=ROUNDS):
    """A finished (rounds == ROUNDS) run whose evaluated returns are `level` + a little seed noise."""
    rng = np.random.default_rng([seed, len(label)])
    rows = [{"round": 0, "global_step": 0, "eval_return": 0.0}]
    rows += [{"round": r, "global_step": 8 * r, "eval_return": level * r / rounds + 0.01 * rng.standard_normal(),
              "approx_kl": kl, "kept_fraction": kept} for r in range(1, rounds + 1)]
    write_run_dir(beyond_iif.run_dir("doorkey5", "clean", label, seed), rows, ROUNDS)


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setattr(beyond_iif, "ROOT", tmp_path)
    return tmp_path


def test_table_picks_best_ppo_pairs_by_seed_and_states_the_verdict(root):
    for s in range(5):
        write_run(root, "ppo-lr1x", s, 0.5)
        write_run(root, "ppo-lr2x", s, 0.8)      # the best PPO
        write_run(root, "ppo-lr5x", s, 0.3)
        write_run(root, "ppo-lr10x", s, 0.1)
        write_run(root, "iif", s, 1.0, kl=0.05, kept=0.9)   # clearly above best PPO
        write_run(root, "random", s, 0.4)        # clearly below
        write_run(root, "iif-adam", s, 0.8 + (0.2 if s % 2 else -0.2))  # around it: no verdict
    write_run(root, "dtv-loo", 0, 5.0, rounds=2)  # unfinished: left out
    out = beyond_iif.table("doorkey5", "clean")
    assert "against `ppo-lr2x`" in out
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| ")}
    assert "dtv-loo" not in rows
    assert rows["iif"][2].strip() == "5" and rows["iif"][-3].strip() == "0.05" and rows["iif"][-2].strip() == "90%"
    verdict = out.strip().splitlines()[-3]
    assert "above `ppo-lr2x`: iif (5 seeds)" in verdict
    below = verdict.split("below it:")[1]
    assert "random" in below and "ppo-lr1x" in below and "iif-adam" not in verdict


def test_no_finished_ppo_run_says_so(root):
    write_run(root, "iif", 0, 1.0)
    assert "no finished PPO run yet" in beyond_iif.table("doorkey5", "clean")
    write_run(root, "ppo-lr1x", 0, 0.5)
    write_run(root, "ppo-kl", 0, 0.5)
    assert "matched step" not in beyond_iif.table("doorkey5", "clean")  # no `iif-kl` to pair with


def test_a_plan_restricts_its_methods_regimes_and_the_kl_matched_rate():
    """empty8 runs only the methods it names, matches the step at 10x the base rate, and has no corrupted regime."""
    labels = beyond_iif.runs_of("empty8", "clean")
    assert set(labels) == {"ppo-lr1x", "ppo-lr2x", "ppo-lr5x", "ppo-lr10x", "iif", "random", "ppo-kl", "iif-kl"}
    assert labels["iif"][-2:] == ["--learning-rate", "0.005"]
    for label in ("ppo-kl", "iif-kl"):
        assert labels[label][2:] == ["--learning-rate", "0.05", "--target-kl", "0.005"]
    with pytest.raises(SystemExit, match="regimes clean"):
        beyond_iif.runs_of("empty8", "noise")
    # the other plans keep every method, the KL match at the base rate, and both regimes
    assert beyond_iif.runs_of("doorkey5", "clean")["iif-kl"][2:4] == ["--learning-rate", "0.0003"]
    assert "iif-adam" in beyond_iif.runs_of("lunarlander", "clean")
    assert set(beyond_iif.runs_of("acrobot", "clean")) == {"ppo-lr1x", "ppo-lr2x", "ppo-lr5x", "ppo-lr10x", "iif"}


def test_family_wise_verdict_corrects_for_the_number_of_intervals(root):
    """A gain clear at 95% but not at the Bonferroni level of the table's family is left out of the family-wise line."""
    for s in range(5):
        write_run(root, "ppo-lr1x", s, 0.5)
        write_run(root, "iif", s, 0.5 + [0.07, 0.01, 0.05, 0.02, 0.04][s])  # clear at 95%, not at 1 - 0.05 / 4
        write_run(root, "random", s, 2.0)                            # far above: survives any correction
    out = beyond_iif.table("doorkey5", "clean")
    lines = out.strip().splitlines()
    uncorrected, family = lines[-3], lines[-1]
    assert "iif (5 seeds)" in uncorrected and "random (5 seeds)" in uncorrected
    assert family.startswith("Family-wise (4 gain intervals, each at 98.75%")
    above = family.split("below it:")[0]
    assert "random (mean return)" in above and "random (final return)" in above and "iif" not in family


def test_step_matched_line_pairs_iif_kl_with_ppo_kl(root):
    """With both KL-stopped labels, the table ends with their paired gains (the records' effect at the same step)."""
    for s in range(5):
        write_run(root, "ppo-lr1x", s, 0.5)
        write_run(root, "ppo-kl", s, 0.4)
        write_run(root, "iif-kl", s, 0.6)
    last = beyond_iif.table("doorkey5", "clean").strip().splitlines()[-1]
    assert last.startswith("At the matched step (`iif-kl` against `ppo-kl`, 5 paired seeds")
    mean_gain = float(last.split("mean return over rounds ")[1].split(" ")[0])
    final_gain = float(last.split("final return ")[1].split(" ")[0])
    # levels 0.6 vs 0.4 ramp linearly over 4 rounds: mean over rounds 1-4 differs by 0.2 * 2.5 / 4, the last by 0.2
    assert mean_gain == pytest.approx(0.125, abs=0.02) and final_gain == pytest.approx(0.2, abs=0.02)
    # and the pair read as a family of its two intervals: both gains are far above the noise, so both survive
    assert "Family-wise (2 gain intervals, each at 97.50%, Bonferroni): above `ppo-kl`: iif-kl (mean return), " \
           "iif-kl (final return); below it: none." in last
