"""examples/cleanrl_ppo_iif.py: the CleanRL-style PPO script with IIF runs, trains exactly as plain PPO with
--filter none, never shows a dropped record to the update, and computes exact scores."""
import copy
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastattr.iif
from fastattr import filtering

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "cleanrl_ppo_iif.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("cleanrl_ppo_iif", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture(autouse=True)
def _restore_threads():
    # main() sets torch's thread count for its process; give the rest of the test session its own back
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _args(script, **overrides):
    kw = dict(env_id="CartPole-v1", total_timesteps=2048, num_envs=4, num_steps=128, cuda=False, seed=3)
    kw.update(overrides)
    return script.Args(**kw)


def _final_params(result):
    return {k: v.detach().clone() for k, v in result["agent"].state_dict().items()}


def test_script_runs_and_prints_kept_fractions():
    env = dict(os.environ, PYTHONPATH=str(SCRIPT.parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--env-id", "CartPole-v1", "--total-timesteps", "2048", "--num-envs", "4",
         "--num-steps", "128", "--no-cuda"],
        capture_output=True, text=True, timeout=120, env=env, cwd=SCRIPT.parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = [float(k) for k in re.findall(r"kept=([0-9.]+)", proc.stdout)]
    assert len(kept) == 2048 // (4 * 128), proc.stdout
    assert all(0.0 < k <= 1.0 for k in kept), kept
    assert re.search(r"attribution_s=[0-9.]+", proc.stdout)
    assert "final mean episodic return" in proc.stdout


def test_bad_filter_is_refused_before_training(script):
    with pytest.raises(ValueError, match="filter must be one of"):
        script.main(_args(script, filter="iff"))


def test_filter_none_trains_exactly_like_plain_ppo(script, monkeypatch):
    args = _args(script, filter="none")
    result = script.main(args)
    assert result["kept_fractions"] == [1.0] * args.num_iterations

    # the minibatches are plain CleanRL's: one np.random.shuffle of the index array per epoch, seeded by args.seed
    np.random.seed(args.seed)
    for used in result["minibatches"]:
        b_inds = np.arange(args.batch_size)
        for epoch_mbs in used:
            np.random.shuffle(b_inds)
            expected = [b_inds[s:s + args.minibatch_size] for s in range(0, args.batch_size, args.minibatch_size)]
            assert len(epoch_mbs) == len(expected)
            for got, want in zip(epoch_mbs, expected):
                np.testing.assert_array_equal(got, want)

    # and scoring perturbs nothing (no RNG draw, parameter or gradient state): the same run with the selection
    # replaced by a stub that keeps every record without touching the agent ends bit-identically
    def keep_all(args, agent, b_obs, b_actions, b_advantages, order, rng):
        n = len(order)
        return fastattr.iif.Selection(scores=torch.zeros(n), keep=torch.ones(n, dtype=torch.bool),
                                      epoch1_order=torch.as_tensor(order).clone(), adv_record=torch.zeros(n),
                                      seconds=0.0)

    monkeypatch.setattr(script, "select_records", keep_all)
    plain = script.main(_args(script, filter="none"))
    assert plain["episodic_returns"] == result["episodic_returns"]
    for name, value in _final_params(plain).items():
        assert torch.equal(value, _final_params(result)[name]), name


@pytest.mark.parametrize("method", ["iif", "random"])
def test_dropped_records_never_reach_an_update(script, method):
    args = _args(script, filter=method, p=0.5)
    result = script.main(args)
    assert len(result["keep"]) == len(result["minibatches"]) == args.num_iterations
    assert any(f < 1.0 for f in result["kept_fractions"]), "the filter dropped nothing: the test checks nothing"
    for keep, used in zip(result["keep"], result["minibatches"]):
        kept = np.flatnonzero(keep)
        assert len(used) == args.update_epochs
        for epoch_mbs in used:
            seen = np.concatenate(epoch_mbs)
            # each kept record exactly once per epoch, no dropped one ever; full minibatches but the last
            np.testing.assert_array_equal(np.sort(seen), kept)
            assert all(len(mb) == args.minibatch_size for mb in epoch_mbs[:-1])
            assert 0 < len(epoch_mbs[-1]) <= args.minibatch_size


def test_random_drops_as_many_records_as_iif(script):
    iif = script.main(_args(script, filter="iif", total_timesteps=512))
    rnd = script.main(_args(script, filter="random", total_timesteps=512))
    # same seed, same first batch and parameters: the control drops exactly as many records, others
    assert iif["kept_fractions"][0] == rnd["kept_fractions"][0] < 1.0
    assert not np.array_equal(iif["keep"][0], rnd["keep"][0])


def _brute_force_scores(agent, b_obs, b_actions, b_advantages, order, minibatch_size):
    """score_i = <grad l_i, grad f> over the actor's parameters in float64, one autograd pass per record:
    l_i = -A~_i log pi(a_i|s_i) with A~ normalised per minibatch of epoch 1's order, f = -mean_j A_j log pi(a_j|s_j)."""
    agent = copy.deepcopy(agent).double()
    obs, adv = b_obs.double(), b_advantages.double()
    adv_norm = adv.clone()
    for chunk in torch.as_tensor(order).split(minibatch_size):
        if len(chunk) > 1:  # as the update loop does it: torch's unbiased std
            adv_norm[chunk] = (adv[chunk] - adv[chunk].mean()) / (adv[chunk].std() + 1e-8)
    params = [p for name, p in agent.named_parameters() if name.startswith("actor")]
    logp = agent.get_action_and_value(obs, b_actions.long())[1]
    grad_f = torch.autograd.grad(-(adv * logp).mean(), params, retain_graph=True)
    scores = torch.empty(len(adv), dtype=torch.float64)
    for i in range(len(adv)):
        grad_i = torch.autograd.grad(-adv_norm[i] * logp[i], params, retain_graph=True)
        scores[i] = sum((gi * gf).sum() for gi, gf in zip(grad_i, grad_f))
    return scores


def test_script_scores_equal_brute_force_autograd(script, monkeypatch):
    original = script.select_records
    calls = []

    def capture(args, agent, b_obs, b_actions, b_advantages, order, rng):
        inputs = (copy.deepcopy(agent), b_obs.clone(), b_actions.clone(), b_advantages.clone(), np.array(order))
        sel = original(args, agent, b_obs, b_actions, b_advantages, order, rng)
        calls.append((inputs, sel))
        return sel

    monkeypatch.setattr(script, "select_records", capture)
    # two iterations of an uneven minibatch split (66 records, minibatch 16): the second batch is scored at trained
    # parameters, and its last epoch-1 minibatch holds 2 records, normalised on their own
    args = _args(script, num_envs=3, num_steps=22, num_minibatches=4, total_timesteps=132, filter="iif")
    script.main(args)
    assert len(calls) == 2
    (agent, b_obs, b_actions, b_advantages, order), sel = calls[1]
    ref = _brute_force_scores(agent, b_obs, b_actions, b_advantages, order, args.minibatch_size)
    assert sel.scores.dtype == torch.float32
    torch.testing.assert_close(sel.scores.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # the kept records are the scores' iif selection, epoch 1 visiting them in the drawn order
    kept = sel.keep.numpy()
    np.testing.assert_array_equal(kept, filtering.iif_keep_mask(sel.scores, args.p).numpy())
    np.testing.assert_array_equal(sel.epoch1_order.numpy(), order[kept[order]])
