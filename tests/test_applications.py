"""intervene / validate / behaviour on a tiny real FrozenLake run (3 rounds of 128 records), plus their pure parts on
constructed cases whose answer is known."""
import json

import numpy as np
import pytest
import torch

from _synthetic_run import train_tiny
from fastattr import behaviour, intervene, runinfo, validate
from fastattr import targets as fa_targets


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("tiny") / "run")


# --- intervene -------------------------------------------------------------------------------------------------------

def test_keep_masks_known_case():
    scores = np.array([-1.0, 2.0, -3.0, 0.5, -0.2])
    m = intervene.keep_masks(scores, seed=0, k=0)
    assert m["unfiltered"].all()
    assert m["drop negative"].tolist() == [False, True, False, True, False]
    assert int((~m["drop random"]).sum()) == 3
    assert torch.equal(m["drop random"], intervene.keep_masks(scores, seed=0, k=0)["drop random"])  # seeded
    half = intervene.keep_masks(scores, seed=0, k=0, p=0.5)["drop negative"]   # IIF rule: bottom int(3*0.5)=1
    assert half.tolist() == [True, True, False, True, True]


def test_summarize_pairs_arms_by_seed():
    rows = [{"round": 3, "seed": s, "arm": arm, "n_dropped": 0 if arm == "unfiltered" else 10, "return": r}
            for s, base in ((0, 1.0), (1, 2.0), (2, 3.0))
            for arm, r in (("unfiltered", base), ("drop negative", base + 0.5 + 0.1 * s), ("drop random", base))]
    summ = {s["arm"]: s for s in intervene.summarize(rows)}
    assert summ["drop negative"]["delta"]["mean"] == pytest.approx(0.6)          # 0.5, 0.6, 0.7
    assert summ["drop negative"]["delta"]["lo"] == pytest.approx(0.6 - 4.302652729911275 * 0.1 / np.sqrt(3))
    assert summ["drop random"]["delta"]["mean"] == 0.0 and summ["unfiltered"]["return"]["mean"] == 2.0


def test_intervene_end_to_end(run, capsys):
    res = intervene.intervene(run, [1], [0, 1], episodes=8, progress=False)
    scores = runinfo.load_round(run, 1)["score_return"]
    by_arm = {s["arm"]: s for s in res["summary"]}
    assert by_arm["unfiltered"]["delta"]["mean"] == 0.0
    assert by_arm["drop negative"]["n_dropped"] == by_arm["drop random"]["n_dropped"] == int((scores < 0).sum())
    again = intervene.intervene(run, [1], [0, 1], episodes=8, progress=False)
    assert [r["return"] for r in again["results"]] == [r["return"] for r in res["results"]]   # deterministic
    assert intervene.main([str(run), "--round", "9"]) == 2
    assert "not saved" in capsys.readouterr().err


# --- validate --------------------------------------------------------------------------------------------------------

def test_subsets_random_and_ranked():
    scores = np.array([5.0, -1.0, 3.0, 0.0, 2.0, -4.0, 1.0, 4.0])
    sets = validate.subsets(scores, size=2, n_subsets=4, seed=0)
    assert all(len(s) == 2 and len(set(s)) == 2 for s in sets["random"])
    assert sets["ranked"][0].tolist() == [1, 5]            # the two lowest scores
    assert sets["ranked"][-1].tolist() == [0, 7]           # the two highest
    with pytest.raises(ValueError, match="subset size"):
        validate.subsets(scores, size=8, n_subsets=4, seed=0)


def test_first_order_prediction_matches_one_sgd_step(run):
    """Removing a subset from one small SGD step changes J by −(lr/N) Σ_S score_i to first order: the scores'
    defining property, checked on a real buffer."""
    args = runinfo.ppo_args(runinfo.load_run(run))
    res = validate.validate_round(runinfo.load_run(run), args, 2, lrs=[1e-3], frac=0.2, n_subsets=8,
                                  modes=("sgd-step",))
    assert res["score_reproduction_max_rel_err"] < 1e-4
    for s in res["summary"]:
        assert s["spearman"] > 0.95, s
        assert 0.9 < s["slope"] < 1.1, s


def test_validate_retrains_each_start_from_the_saved_optimizer_state(tmp_path, monkeypatch):
    """Adam at k >= 1: every retrain (reference and each subset) starts from θ(k)'s saved moments and step count;
    optimiser state must not carry over from one retrain to the next."""
    adam = train_tiny(tmp_path / "adam", rounds=2, optimizer="adam", learning_rate=3e-4)
    starts, real = [], validate.ppo_updates

    def spy(agent, optimizer, *a):
        state = list(optimizer.state.values())
        starts.append((float(state[0]["step"]), float(state[0]["exp_avg"].abs().sum())))
        real(agent, optimizer, *a)

    monkeypatch.setattr(validate, "ppo_updates", spy)
    run_ = runinfo.load_run(adam)
    validate.validate_round(run_, runinfo.ppo_args(run_), 1, lrs=[1e-3], frac=0.2, n_subsets=3, modes=("ppo",))
    assert len(starts) == 1 + 2 * 3 and starts[0][0] > 0  # the reference, then 3 random and 3 ranked subsets
    assert all(s == starts[0] for s in starts), starts


def test_validate_cli_ppo_mode(run, capsys):
    assert validate.main([str(run), "--round", "1", "--lrs", "1e-3", "--subsets", "4", "--modes", "ppo",
                          "--no-progress"]) == 0
    res = json.loads((run / "validate_r1.json").read_text())
    assert {s["selection"] for s in res["summary"]} == {"random", "ranked"}
    assert all(np.isfinite(p["actual"]) for p in res["points"])
    assert validate.main([str(run), "--round", "1", "--modes", "nope"]) == 2


# --- behaviour -------------------------------------------------------------------------------------------------------

def test_phases_known_case():
    rough = [0.5, 0.45, 0.1, 0.08, 0.09, 0.07]
    scale = [1.0, 2.0, 1.5, 1.0, 0.05, 0.04]
    rows = [{"round": k, "influence_absmax": s, "roughness": r} for k, (s, r) in enumerate(zip(scale, rough))]
    ph = behaviour.phases(rows, saturation=0.1)
    assert [(p["name"][0], p["start"], p["end"]) for p in ph] == [("1", 0, 1), ("2", 2, 3), ("3", 4, 5)]


def test_action_influence_equals_brute_force(run):
    r = runinfo.load_run(run)
    args = runinfo.ppo_args(r)
    agent, _ = runinfo.load_theta(r, 1, args)
    buf, data = runinfo.load_buffer(r, 1)
    adv = torch.as_tensor(data["adv_norm"])
    targets = np.array([3, 10, 50])
    fast = fa_targets.action_scores(agent, lambda m, o, a: m.log_prob(o, a), buf.obs, buf.actions, adv, targets,
                                    params=agent.is_actor_param)
    params = [p for n, p in agent.named_parameters() if agent.is_actor_param(n)]
    g_t = torch.autograd.grad(-agent.log_prob(buf.obs[targets], buf.actions[targets]).mean(), params)
    for i in (0, 7, 100):
        g_i = torch.autograd.grad(-adv[i] * agent.log_prob(buf.obs[i:i + 1], buf.actions[i:i + 1]).sum(), params)
        brute = sum((a * b).sum() for a, b in zip(g_i, g_t))
        assert float(fast[i]) == pytest.approx(float(brute), rel=1e-4, abs=1e-9)


def test_behaviour_end_to_end_and_bad_probes(run, capsys):
    assert behaviour.main([str(run), "--probe", "frozenlake-down", "--top", "10", "--neighbors", "5",
                           "--no-progress"]) == 0
    res = json.loads((run / "behaviour_frozenlake-down.json").read_text())
    assert [r["round"] for r in res["rounds"]] == [0, 1, 2]
    assert all(r["n_match"] > 0 and 0 <= r["top_share"] <= 1 for r in res["rounds"])
    assert (run / "behaviour_frozenlake-down.png").stat().st_size > 0
    capsys.readouterr()
    assert behaviour.main([str(run), "--probe", "state=15,action=0", "--no-progress"]) == 2   # goal cell: no record
    assert "matched no record" in capsys.readouterr().err
    assert behaviour.main([str(run), "--probe", "minigrid-turn"]) == 2
    assert "MiniGrid runs" in capsys.readouterr().err
    assert behaviour.main([str(run), "--probe", "no-such-probe"]) == 2
    assert "unknown probe" in capsys.readouterr().err


def test_run_dir_from_another_version(tmp_path, capsys):
    from _synthetic_run import make_run
    old = make_run(tmp_path / "old", rounds=(0,), n=64)
    args = json.loads((old / "args.json").read_text())
    (old / "args.json").write_text(json.dumps({**args, "num_steps": 64, "legacy_flag": True}))
    for main, extra in ((intervene.main, []), (validate.main, []), (behaviour.main, ["--probe", "action=1"])):
        assert main([str(old), "--round" if main is not behaviour.main else "--rounds", "0", *extra]) == 2
        assert "another fastattr version" in capsys.readouterr().err


# --- train --probe: action-target scores stored per round ---------------------------------------------------------------

def test_train_probe_stores_action_scores_equal_to_behaviour_recomputation(tmp_path):
    run = train_tiny(tmp_path / "probe", rounds=2, probe="frozenlake-down", probe_targets=5)
    for k in (0, 1):
        data = runinfo.load_round(run, k)
        mask, targets = data["probe_mask"].astype(bool), data["probe_targets"]
        assert mask.shape == (128,) and len(targets) == min(5, int(mask.sum())) and mask[targets].all()
        assert np.all(data["actions"][mask] == 1)  # frozenlake-down = action 1
        # recompute from the saved theta(k) and buffer with the behaviour tool's own path
        r = runinfo.load_run(run)
        agent, _ = runinfo.load_theta(r, k, runinfo.ppo_args(r))
        buf, saved = runinfo.load_buffer(r, k, continuous=agent.continuous)
        again = fa_targets.action_scores(agent, lambda m, o, a: m.log_prob(o, a), buf.obs, buf.actions,
                                         torch.as_tensor(saved["adv_norm"]), targets, params=agent.is_actor_param)
        np.testing.assert_allclose(data["score_action"], again.numpy(), rtol=1e-4, atol=1e-6)


def test_train_probe_for_another_env_is_rejected_before_any_io(tmp_path):
    with pytest.raises(ValueError, match="probe 'minigrid-turn' is for MiniGrid runs, but this run is FrozenLake"):
        train_tiny(tmp_path / "bad", rounds=1, probe="minigrid-turn")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="add --save-attribution"):
        train_tiny(tmp_path / "bad", rounds=1, probe="frozenlake-down", save_attribution=False)
