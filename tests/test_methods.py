"""The methods beyond IIF (--method iif-reweight | iif-adam | dtv-loo, --target lookahead) and the controls
(--target-kl, --reward-noise, the official update under --preset paper), each against its definition."""
import copy
import json

import numpy as np
import pytest
import torch

from fastattr import iif, ppo, targets
from fastattr.rl.agent import Agent, make_optimizer
from fastattr.rl.config import Args, paper_overrides
from fastattr.rl.update import TorchStep, lookahead_target_grads, ppo_update

TINY = dict(env_id="CartPole-v1", n_steps=64, batch_size=16, n_epochs=2, eval_episodes=2, progress=False,
            total_timesteps=192)


def rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def batch():
    """A CartPole agent and a synthetic buffer of 48 records (float32: the agent's preprocessing casts to it)."""
    import gymnasium as gym

    from fastattr.rl.rollout import Buffer

    torch.manual_seed(0)
    env = gym.make("CartPole-v1")
    agent = Agent(env.observation_space, env.action_space)
    g = torch.Generator().manual_seed(1)
    n = 48
    obs = torch.randn(n, 4, generator=g)
    act = torch.randint(0, 2, (n,), generator=g)
    with torch.no_grad():
        logp = agent.log_prob(obs, act)
        values = agent.value(obs)
    adv = torch.randn(n, generator=g)
    buf = Buffer(obs, act, logp, values, torch.zeros(n), torch.zeros(n), torch.zeros(n), torch.zeros(n),
                 torch.zeros(1), advantages=adv, returns=adv + values)
    return agent, buf


def per_record_grads(agent, losses):
    ps = [p for n, p in agent.named_parameters() if agent.is_actor_param(n)]
    return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(l, ps, retain_graph=True,
                                                                               allow_unused=False)]) for l in losses])


def test_paper_preset_drops_the_last_partial_minibatch():
    assert paper_overrides("LunarLander-v3")["minibatch_remainder"] == "drop"
    from fastattr.experiments import build_args

    assert build_args({"env_id": "Acrobot-v1", "preset": "paper"}).minibatch_remainder == "drop"
    assert build_args({"env_id": "Acrobot-v1", "preset": "paper", "minibatch_remainder": "keep"}) \
        .minibatch_remainder == "keep"


def test_linear_and_preconditioned_targets(batch):
    agent, buf = batch
    lp = lambda m: m.log_prob(buf.obs, buf.actions)  # noqa: E731
    G = targets.return_target_grads(agent, lp, buf.advantages, Agent.is_actor_param)
    opt = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-8)
    agent.log_prob(buf.obs, buf.actions).sum().backward()
    opt.step()  # some second moments
    P = targets.adam_precondition(G, agent, opt)
    for name, p in agent.named_parameters():
        if name in G:
            v = opt.state[p]["exp_avg_sq"] / (1 - 0.999)
            torch.testing.assert_close(P[name], G[name] / (v.sqrt() + 1e-8), rtol=1e-6, atol=0)
    got = targets.return_scores(agent, lp, buf.advantages, buf.advantages, params=Agent.is_actor_param, target_grads=P)
    rec = per_record_grads(agent, -buf.advantages * lp(agent))
    expect = rec.double() @ torch.cat([P[n].reshape(-1) for n, _ in agent.named_parameters() if n in P]).double()
    assert float((got.double() - expect).abs().max() / expect.abs().max()) < 1e-5
    with pytest.raises(ValueError, match="target_grads"):
        iif.select(agent, lp, buf.advantages, method="iif-adam", batch_size=16, params=Agent.is_actor_param)


def test_iif_reweight_keeps_positive_scores_weighted_by_score(batch):
    agent, buf = batch
    sel = iif.select(agent, lambda m: m.log_prob(buf.obs, buf.actions), buf.advantages, method="iif-reweight",
                     batch_size=16, params=Agent.is_actor_param, generator=torch.Generator().manual_seed(0))
    s = sel.scores.detach()
    assert torch.equal(sel.keep, s > 0)
    torch.testing.assert_close(sel.weights[sel.keep], s[sel.keep] / s[sel.keep].mean())
    assert float(sel.weights[sel.keep].mean()) == pytest.approx(1.0) and (sel.weights[~sel.keep] == 0).all()


def test_dtv_loo_equals_its_definition(batch):
    """DTV-LOO_j = <g_j, mean_{i != j} g_i> over the minibatch, g the per-record policy-loss gradient."""
    agent, buf = batch
    args = Args(**{**TINY, "method": "dtv-loo", "norm_adv": True})
    step = TorchStep(agent, make_optimizer(agent, args), buf, args)
    mb = torch.arange(16)
    per = step._policy_losses(agent, mb, newlogp=agent.log_prob(buf.obs[mb], buf.actions[mb]))[0]
    g = per_record_grads(agent, per)
    gram = g @ g.T
    loo = (gram.sum(1) - gram.diagonal()) / 15
    kept = step.dtv_loo_keep(mb)
    assert torch.equal(kept, mb[loo >= 0]) and 0 < len(kept) < 16


def test_lookahead_target_is_the_gradient_after_a_plain_update(batch):
    agent, buf = batch
    args = Args(**{**TINY, "optimizer": "adam", "update_backend": "torch"})
    opt = make_optimizer(agent, args)
    gen = torch.Generator().manual_seed(5)
    order = torch.randperm(buf.n, generator=torch.Generator().manual_seed(6))
    state = gen.get_state()
    before = copy.deepcopy(agent.state_dict())
    got = lookahead_target_grads(agent, opt, buf, args, gen, order)
    assert torch.equal(gen.get_state(), state)  # the real update's draws are untouched
    assert all(torch.equal(before[k], v) for k, v in agent.state_dict().items())  # and so is the agent
    ahead, opt2 = copy.deepcopy(agent), None
    opt2 = make_optimizer(ahead, args)
    ppo_update(ahead, opt2, buf, None, args, torch.Generator().manual_seed(5), epoch1_order=order)
    expect = targets.return_target_grads(ahead, lambda m: m.log_prob(buf.obs, buf.actions), buf.advantages,
                                         Agent.is_actor_param)
    assert all(torch.equal(got[k], expect[k]) for k in expect)


def test_target_kl_stops_the_update_before_the_step(batch):
    agent, buf = batch
    args = Args(**{**TINY, "update_backend": "torch", "learning_rate": 0.5, "optimizer": "sgd", "n_epochs": 4})
    full = ppo_update(copy.deepcopy(agent), make_optimizer(agent, args), buf, None, args,
                      torch.Generator().manual_seed(0))
    import dataclasses

    capped = dataclasses.replace(args, target_kl=1e-4)
    short = ppo_update(agent, make_optimizer(agent, capped), buf, None, capped, torch.Generator().manual_seed(0))
    assert 1 <= short["optimizer_steps"] < full["optimizer_steps"]


@pytest.mark.parametrize("method,extra", [("iif-reweight", {}), ("iif-adam", {"optimizer": "adam"}),
                                          ("dtv-loo", {}), ("iif", {"target": "lookahead"}),
                                          ("iif", {"reward_noise": 0.3, "target_kl": 0.02})])
def test_methods_train_and_resume_bit_identically(tmp_path, method, extra):
    straight = ppo.main(Args(**TINY, method=method, run_dir=str(tmp_path / "a"), **extra))
    ppo.main(Args(**{**TINY, "total_timesteps": 128}, method=method, run_dir=str(tmp_path / "b"), **extra))
    resumed = ppo.main(Args(**TINY, method=method, run_dir=str(tmp_path / "b"), resume=True, **extra))
    assert straight["round"] == resumed["round"] == 3
    keep = lambda r: {k: v for k, v in r.items() if not k.endswith("seconds") and k not in ("sps", "time")}  # noqa
    assert [keep(r) for r in rows(tmp_path / "a")] == [keep(r) for r in rows(tmp_path / "b")]


def test_reward_noise_flips_a_fraction_of_episodes_and_not_evaluation():
    from fastattr.rl.rollout import corrupted_sign

    args = Args(env_id="CartPole-v1", reward_noise=0.2, seed=3)
    signs = np.concatenate([corrupted_sign(args, np.full(4, k)) for k in range(500)])
    assert 0.15 < float((signs < 0).mean()) < 0.25
    np.testing.assert_array_equal(signs[:40], np.concatenate([corrupted_sign(args, np.full(4, k)) for k in range(10)]))
    assert (corrupted_sign(Args(env_id="CartPole-v1", reward_noise=0.0), np.arange(50)) == 1).all()


def test_env_stream_reseed_restarts_the_action_stream(tmp_path):
    """With a learning rate of ~0 the policy does not move: under reseed every round replays round 0's rollout."""
    from fastattr import store

    kw = dict(TINY, method="ppo", save_attribution=True, env_stream="reseed", optimizer="sgd", learning_rate=1e-12)
    ppo.main(Args(**kw, run_dir=str(tmp_path / "r")))
    r0, r1 = store.load_round(tmp_path / "r", 0), store.load_round(tmp_path / "r", 1)
    np.testing.assert_array_equal(r0["actions"], r1["actions"])
    np.testing.assert_array_equal(r0["obs"], r1["obs"])
