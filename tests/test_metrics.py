"""The paper's SE_ave / SE_peak / RT_peak and the final-gain CI on curves whose answers are worked out by hand."""
import json
import math

import numpy as np
import pytest
from _bench import load_benchmark

from fastattr import metrics


def curve(returns, opt=None, train=None, start_round=1):
    rounds = list(range(start_round, start_round + len(returns)))
    opt = opt or [1.0] * len(returns)
    rows = [{"round": r, "global_step": 100 * r, "eval_return": v, "attr_seconds": 0.0, "update_seconds": o,
             "train_seconds": t, "optimizer_steps": int(10 * o)}
            for r, v, o, t in zip(rounds, returns, opt, train or [2 * o for o in opt])]
    return metrics.curve_from_rows(rows)


def test_levels_are_the_record_highs():
    assert metrics.levels_reached([1, 2, 3, 4, 5], [0.0, 2.0, 1.0, 3.0, 3.0]) == [(0.0, 1), (2.0, 2), (3.0, 4)]
    assert metrics.first_reach([1, 2, 3], [0.1, 0.5, 0.9], 0.5) == 2
    assert metrics.first_reach([1, 2, 3], [0.1, 0.5, 0.9], 1.0) is None


def test_se_by_hand():
    std = curve([0, 1, 2, 3, 4])     # levels 0@1 1@2 2@3 3@4 4@5
    iif = curve([1, 3, 4, 4, 4])     # reaches them at 1, 1, 2, 2, 3
    d = metrics.sample_efficiency(std, iif)
    # reductions 1-1/1, 1-1/2, 1-2/3, 1-2/4, 1-3/5
    assert d["se_ave"] == pytest.approx((0 + 0.5 + 1 / 3 + 0.5 + 0.4) / 5)
    assert d["se_peak"] == pytest.approx(0.4)
    assert d["censored_levels"] == 0 and d["m_peak"] == 3 and d["m_std_peak"] == 5
    # grid levels 0.2, 0.4, ..., 4.0: std reaches v at ceil(v) + 1, iif at 1 (v <= 1), 2 (v <= 3), 3 (v <= 4)
    grid = np.linspace(0, 4, 21)[1:]
    m_std = np.ceil(grid - 1e-9) + 1
    m_iif = np.where(grid <= 1, 1, np.where(grid <= 3, 2, 3))
    assert d["se_ave_grid"] == pytest.approx(np.mean(1 - m_iif / m_std))


def test_rt_peak_by_hand():
    # std rounds cost 2 s of optimisation each, iif rounds 1 s; std peaks at round 4, iif reaches it at round 2
    std = curve([0, 1, 2, 5, 3], opt=[2.0] * 5, train=[3.0] * 5)
    iif = curve([1, 5, 5, 5, 5], opt=[1.0] * 5, train=[2.5] * 5)
    d = metrics.sample_efficiency(std, iif)
    assert d["rt_peak_opt"] == pytest.approx(1 - 2.0 / 8.0)
    assert d["rt_peak_train"] == pytest.approx(1 - 5.0 / 12.0)
    assert d["rt_peak_updates"] == pytest.approx(1 - 20 / 80)
    assert d["se_peak"] == pytest.approx(1 - 2 / 4)


def test_round_zero_is_ignored_and_censoring_penalises():
    rows = [{"round": 0, "global_step": 0, "eval_return": 10.0, "train_seconds": 0.0}]
    std = metrics.curve_from_rows(rows + [{"round": r, "global_step": r, "eval_return": v, "update_seconds": 1.0,
                                           "attr_seconds": 0.0, "train_seconds": 1.0}
                                          for r, v in [(1, 1.0), (2, 2.0), (3, 3.0)]])
    other = curve([1.0, 1.5, 2.5])  # never reaches 3.0 -> counted at round 4
    d = metrics.sample_efficiency(std, other)
    assert d["n_levels"] == 3 and d["censored_levels"] == 1 and d["peak_censored"]
    assert d["se_peak"] == pytest.approx(1 - 4 / 3)
    assert d["se_ave"] == pytest.approx((0 + (1 - 3 / 2) + (1 - 4 / 3)) / 3)
    assert d["rt_peak_opt"] == pytest.approx(1 - 4.0 / 3.0)  # 3 s + one mean round (1 s) vs 3 s


def test_a_shorter_budget_never_turns_an_unreached_level_into_a_reduction():
    # std peaks at round 6 of 6; the method stops after 3 rounds below every level past 1.0. Counting its unreached
    # levels at its own budget + 1 (round 4) would report SE_peak = 1 - 4/6 > 0 for a peak it never reached.
    std = curve([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], opt=[1.0] * 6)
    short = curve([1.0, 1.0, 1.0], opt=[1.0] * 3)
    d = metrics.sample_efficiency(std, short)
    assert d["censored_levels"] == 5 and d["peak_censored"]
    assert d["se_peak"] == pytest.approx(1 - 7 / 6)  # counted after the longer budget
    assert d["rt_peak_opt"] == pytest.approx(1 - 7.0 / 6.0)  # 3 s + 4 mean rounds of 1 s
    assert d["se_ave"] < 0 and d["se_ave_grid"] < 0


def test_eval_every_and_missing_evals():
    rows = [{"round": r, "global_step": r, "eval_return": (float(r) if r % 2 == 0 else None), "update_seconds": 1.0,
             "attr_seconds": 0.5, "train_seconds": 2.0} for r in range(1, 7)]
    c = metrics.curve_from_rows(rows)
    assert c.rounds.tolist() == [2, 4, 6] and c.opt.tolist() == [3.0, 6.0, 9.0] and c.train.tolist() == [4, 8, 12]


def test_final_gain_t_interval_by_hand():
    std = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0, 4: 5.0}
    iif = {0: 2.0, 1: 2.0, 2: 5.0, 3: 5.0, 4: 6.0}   # diffs 1, 0, 2, 1, 1
    g = metrics.final_gain(std, iif)
    sd = np.std([1, 0, 2, 1, 1], ddof=1)
    half = 2.7764451051977987 * sd / math.sqrt(5)
    assert g["mean"] == pytest.approx(1.0) and g["n"] == 5
    assert g["ci_low"] == pytest.approx(1 - half) and g["ci_high"] == pytest.approx(1 + half)


def test_mean_se_and_band():
    m, se, n = metrics.mean_se([1.0, 2.0, 3.0, None, float("nan")])
    assert (m, n) == (2.0, 3) and se == pytest.approx(1 / math.sqrt(3))
    mean, lo, hi = metrics.band([np.array([0.0, 2.0, 9.0]), np.array([2.0, 4.0])])
    assert mean.tolist() == [1.0, 3.0]
    half = 12.706204736174707 * math.sqrt(2) / math.sqrt(2)
    assert lo[0] == pytest.approx(1 - half) and hi[1] == pytest.approx(3 + half)


def test_summarize_and_markdown():
    curves = {"ppo": {0: curve([0, 1, 2]), 1: curve([0, 2, 2])}, "iif": {0: curve([1, 2, 2]), 1: curve([2, 2, 3])}}
    s = metrics.summarize(curves)
    e = s["methods"]["iif"]
    # seed 0: levels 0@1 1@2 2@3 -> iif 1,1,2 -> reductions 0, .5, 1/3; seed 1: levels 0@1 2@2 -> 1, 1 -> 0, .5
    assert e["se_ave"]["mean"] == pytest.approx(((0 + 0.5 + 1 / 3) / 3 + 0.25) / 2)
    assert e["se_peak"]["mean"] == pytest.approx((1 / 3 + 0.5) / 2)
    assert e["final_gain"]["mean"] == pytest.approx(0.5)
    md = metrics.to_markdown(s, "test")
    assert "SE_ave" in md and "| iif | 2 |" in md


def test_no_std_levels_is_an_error():
    empty = metrics.curve_from_rows([{"round": 0, "global_step": 0, "eval_return": 1.0}])
    with pytest.raises(ValueError, match="standard-PPO curve"):
        metrics.sample_efficiency(empty, curve([1.0]))


def test_repro_table_rows_come_from_the_summary(tmp_path):
    table = load_benchmark("repro_table")
    curves = {"ppo": {0: curve([0, 1, 2]), 1: curve([0, 2, 2])}, "iif": {0: curve([1, 2, 2]), 1: curve([2, 2, 3])}}
    s = metrics.summarize(curves)
    s["env_id"] = "Acrobot-v1"
    (tmp_path / "Acrobot-v1").mkdir()
    (tmp_path / "Acrobot-v1" / "summary.json").write_text(json.dumps(s, default=float))
    rows = table.rows(json.loads((tmp_path / "Acrobot-v1" / "summary.json").read_text()))
    assert rows[0].startswith("| Acrobot-v1 | paper (IIF, best p) | 5 | 36.7 ± 6.5 |")
    # se_ave from test_summarize_and_markdown: ((0 + .5 + 1/3) / 3 + .25) / 2 = 26.4%; final gain +0.5
    se_ave = 100 * ((0 + 0.5 + 1 / 3) / 3 + 0.25) / 2
    assert rows[1].startswith(f"| Acrobot-v1 | iif | 2 | {se_ave:.1f} ± ")
    assert "| 2 / 2.5 | +0.5 [" in rows[1]
    with pytest.raises(SystemExit):  # an empty root is an error naming --root, not an empty table
        table.main(["--root", str(tmp_path / "nothing")])
    # a seed the method has not finished yet: the finals on both sides are over the paired seeds only
    curves["ppo"][2] = curve([0, 1, 9])
    s = {**metrics.summarize(curves), "env_id": "Acrobot-v1"}
    assert s["methods"]["ppo"]["final_return"]["mean"] == pytest.approx(13 / 3)
    assert s["methods"]["iif"]["final_return_paired"]["ppo"] == {"mean": 2.0, "se": 0.0, "n": 2}
    assert "| Acrobot-v1 | iif | 2 |" in table.rows(s)[1] and "| 2 / 2.5 | +0.5 [" in table.rows(s)[1]


def test_update_phases_by_hand():
    # 7 rounds (0..6): round 0 is ignored; rounds 1-6 split in thirds {1,2} {3,4} {5,6}
    rows = [{"round": r, "global_step": 100 * r, "eval_return": float(r), "approx_kl": 0.01 * r,
             "clipfrac": 0.1, "kept_fraction": 1.0 if r < 5 else 0.5} for r in range(7)]
    rows[3]["approx_kl"] = None  # a round without the stat is skipped, not counted as 0
    c = metrics.curve_from_rows(rows)
    assert c.phases["approx_kl"] == pytest.approx([0.015, 0.04, 0.055])
    assert c.phases["kept_fraction"] == pytest.approx([1.0, 1.0, 0.5])
    other = metrics.curve_from_rows([{**r, "approx_kl": 0.02 * r["round"]} for r in rows])
    s = metrics.summarize({"ppo": {0: c, 1: other}})
    kl = s["methods"]["ppo"]["update_phases"]["approx_kl"]
    assert kl[0]["mean"] == pytest.approx((0.015 + 0.03) / 2) and kl[0]["n"] == 2
    md = metrics.to_markdown(s, "t")
    assert "| ppo | 0.022 / " in md


def test_ablation_table_pairs_labelled_runs_by_seed(tmp_path, capsys):
    from _synthetic_run import train_tiny

    table = load_benchmark("ablation_table")
    finals = {}
    for label, lr in (("base", 5e-2), ("fast", 2e-1)):
        for seed in (0, 1):
            d = train_tiny(tmp_path / label / f"ppo_s{seed}", rounds=2, seed=seed, learning_rate=lr,
                           save_attribution=False)
            rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
            finals[label, seed] = rows[-1]["eval_return"]
    (tmp_path / "fast" / "ppo_s7").mkdir()  # an unfinished run dir is left out, not an error
    out = tmp_path / "s.json"
    assert table.main([f"base={tmp_path}/base/ppo_s*", f"fast lr={tmp_path}/fast/ppo_s*", "--json", str(out)]) == 0
    s = json.loads(out.read_text())
    assert list(s["methods"]) == ["base", "fast lr"] and s["baseline"] == "base"
    gain = s["methods"]["fast lr"]["final_gain"]
    assert gain["n"] == 2
    assert gain["mean"] == pytest.approx(np.mean([finals["fast", k] - finals["base", k] for k in (0, 1)]))
    assert "| fast lr | 2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no finished run"):
        table.main([f"x={tmp_path}/nothing_s*"])

    # --rounds 1: each run read as a one-round budget, so the final gain is round 1's
    first = {(label, seed): json.loads((tmp_path / label / f"ppo_s{seed}" / "metrics.jsonl").read_text()
                                       .splitlines()[1])["eval_return"] for label in ("base", "fast") for seed in (0, 1)}
    assert table.main([f"base={tmp_path}/base/ppo_s*", f"fast={tmp_path}/fast/ppo_s*", "--rounds", "1",
                       "--json", str(out)]) == 0
    gain1 = json.loads(out.read_text())["methods"]["fast"]["final_gain"]
    assert gain1["mean"] == pytest.approx(np.mean([first["fast", k] - first["base", k] for k in (0, 1)]))
    cut = metrics.load_curve(tmp_path / "base" / "ppo_s0", rounds=1)
    assert cut.last_round == 1 and cut.rounds.tolist() == [0, 1]
    with pytest.raises(SystemExit, match="fewer than the 3"):
        table.main([f"base={tmp_path}/base/ppo_s*", "--rounds", "3"])
    with pytest.raises(SystemExit):
        table.main([f"base={tmp_path}/base/ppo_s*", "--rounds", "0"])


def test_band_is_clipped_to_the_return_range():
    curves = [np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 1.0]), np.array([0.0, 0.0, 0.9])]
    mean, lo, hi = metrics.band(curves)
    assert lo.min() < 0 and hi.max() > 1  # a t-band over [0, 1] returns leaves the range
    mean, lo, hi = metrics.band(curves, bounds=(0.0, 1.0))
    assert lo.min() >= 0 and hi.max() <= 1 and np.all(lo <= mean) and np.all(mean <= hi)
