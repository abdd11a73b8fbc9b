"""`fastattr diagnose` on synthetic run dirs built with fastattr.store.save_round (no training)."""
import json

import numpy as np
import pytest

from _synthetic_run import make_run
from fastattr import diagnose, store


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"), rounds=(0, 1), n=512)


def test_diagnosis_finds_the_planted_wrong_sign_records(run):
    result, d = diagnose.diagnose_round(run, 1, top=16)
    assert result["mc_advantage"] == "buffer"                       # one-hot FrozenLake states -> buffer averages
    assert result["spearman_influence_vs_amc_agae"]["rho"] > 0.9    # score = Ā·Â·(1+noise) by construction
    g = result["groups"]
    assert g["bottom"]["sign_mismatch_frac"] >= 0.9                 # the harmful records are the flipped ones
    assert g["top"]["sign_mismatch_frac"] <= 0.1
    assert g["bottom"]["abs_gap_mean"] > 3 * g["buffer"]["abs_gap_mean"]
    assert [r["index"] for r in result["records"]["bottom"]] == list(np.argsort(d["score"], kind="stable")[:16])
    assert any("sign(Ā) ≠ sign(Â)" in f for f in result["findings"])


def test_group_statistics_on_a_hand_built_round(tmp_path):
    # 4 records, state ids 0/0/1/1; G chosen so Ā = [+1, -1, +0.5, -0.5]; Â flips the sign of records 1 and 2
    obs = np.eye(2, dtype=np.float32)[[0, 0, 1, 1]]
    store.save_round(tmp_path, 0, obs=obs, actions=np.array([0, 1, 0, 1]), returns_mc=np.array([2.0, 0.0, 1.0, 0.0]),
                     adv_gae=np.array([1.0, 1.0, -0.5, -0.5]), score_return=np.array([4.0, -3.0, -2.0, 1.0]))
    result, _ = diagnose.diagnose_round(tmp_path, 0, top=2)
    g = result["groups"]
    assert [r["index"] for r in result["records"]["bottom"]] == [1, 2]
    assert g["bottom"]["sign_mismatch_frac"] == 1.0 and g["top"]["sign_mismatch_frac"] == 0.0
    assert g["buffer"]["sign_mismatch_frac"] == 0.5
    assert g["bottom"]["abs_gap_mean"] == pytest.approx((2.0 + 1.0) / 2)
    assert result["negative_frac"] == 0.5


def test_write_outputs_and_cli(run, capsys):
    assert diagnose.main([str(run), "--round", "0", "--top", "8"]) == 0
    out = capsys.readouterr().out
    assert "Spearman" in out
    for suffix in (".json", ".md", ".png", "_states.png"):
        assert (run / f"diagnose_round_0{suffix}").stat().st_size > 0
    result = json.loads((run / "diagnose_round_0.json").read_text())
    assert result["top_k"] == 8 and len(result["records"]["top"]) == 8
    assert "## Findings" in (run / "diagnose_round_0.md").read_text()


def test_bad_input_gets_a_clear_error(run, tmp_path, capsys):
    assert diagnose.main([str(run), "--round", "7"]) == 2
    assert "round 7 was not saved" in capsys.readouterr().err
    store.save_round(tmp_path, 0, obs=np.zeros((3, 2)), actions=np.zeros(3), adv_gae=np.zeros(3),
                     score_return=np.zeros(3))
    with pytest.raises(KeyError, match="returns_mc"):
        diagnose.diagnose_round(tmp_path, 0)
    np.savez(store.round_path(tmp_path, 1), format_version=np.array(99), obs=np.zeros(3))
    assert diagnose.main([str(tmp_path), "--round", "1"]) == 2
    assert "format 99" in capsys.readouterr().err
    assert diagnose.main([str(tmp_path / "nope"), "--round", "1"]) == 2


def test_minigrid_observation_renders():
    import gymnasium as gym
    pytest.importorskip("minigrid")  # importing it registers the MiniGrid envs
    env = gym.make("MiniGrid-Empty-8x8-v0")
    obs, _ = env.reset(seed=0)
    img = obs["image"]
    for variant in (img, np.transpose(img, (2, 0, 1)), img.reshape(-1).astype(np.float32)):
        pic = diagnose.minigrid_image(variant, tile=8)
        assert pic.shape == (56, 56, 3) and pic.std() > 0
    assert diagnose.can_render("MiniGrid-Empty-8x8-v0", img[None].astype(np.float32))
    assert not diagnose.can_render("Acrobot-v1", np.zeros((2, 6)))
