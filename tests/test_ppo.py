"""fastattr.ppo: scores against brute force, GAE, the update/score consistency, resume, determinism, bad inputs."""
import fcntl
import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap

from fastattr import envs, ppo, store, targets
from fastattr.rl import rollout, rundir
from fastattr.rl.agent import Agent, make_optimizer
from fastattr.rl.config import Args, train_env_seeds
from fastattr.rl.rollout import Buffer, compute_gae, discounted_returns
from fastattr.rl.rundir import LOCK_FILE, RunDirError, checkpoint_path, load_checkpoint, save_checkpoint, theta_path
from fastattr.targets import normalize_advantages
from fastattr.rl.update import ppo_update

TIMING = {"rollout_seconds", "attr_seconds", "update_seconds", "train_seconds", "eval_seconds", "io_seconds",
          "wall_seconds", "time", "sps"}


def tiny(tmp_path, name="run", **kw) -> Args:
    base = dict(env_id="CartPole-v1", method="iif", seed=1, n_steps=128, batch_size=32, n_epochs=2,
                total_timesteps=384, optimizer="sgd", learning_rate=5e-3, eval_episodes=3, progress=False,
                run_dir=str(tmp_path / name))
    base.update(kw)
    return Args(**base)


def rows(run_dir):
    out = [json.loads(x) for x in open(f"{run_dir}/metrics.jsonl")]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in out]


def weights(run_dir):
    return load_checkpoint(checkpoint_path(run_dir))["agent"]


# ----------------------------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------------------------
SPACES = {
    "onehot-mlp": (gym.spaces.Discrete(16), gym.spaces.Discrete(4)),
    "minigrid-cnn": (gym.spaces.Box(0, 255, (7, 7, 3), np.uint8), gym.spaces.Discrete(7)),
    "gaussian-mlp": (gym.spaces.Box(-1, 1, (5,), np.float32), gym.spaces.Box(-2, 2, (3,), np.float32)),
}


def random_records(obs_space, act_space, agent, n, g):
    if isinstance(obs_space, gym.spaces.Discrete):
        obs = torch.randint(0, obs_space.n, (n,), generator=g).float()
    elif len(obs_space.shape) == 3:
        obs = torch.randint(0, 11, (n,) + obs_space.shape, generator=g).float()
    else:
        obs = torch.randn((n,) + obs_space.shape, generator=g)
    if agent.continuous:
        act = torch.randn((n,) + act_space.shape, generator=g)
    else:
        act = torch.randint(0, act_space.n, (n,), generator=g)
    return obs, act


@pytest.mark.parametrize("kind", list(SPACES))
def test_score_buffer_matches_vmap_grad(kind):
    torch.manual_seed(0)
    obs_space, act_space = SPACES[kind]
    agent = Agent(obs_space, act_space)
    with torch.no_grad():  # move the Gaussian log-std and the tiny output layer off their init values
        for name, p in agent.named_parameters():
            if name == "actor_logstd" or name.startswith("actor.4"):
                p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    n = 67
    obs, act = random_records(obs_space, act_space, agent, n, g)
    adv_raw = torch.randn(n, generator=g) * 3 + 0.5
    adv_rec = normalize_advantages(adv_raw, torch.randperm(n, generator=g), 16)
    scores = agent.return_scores(obs, act, adv_rec, adv_raw)

    params = {k: v.detach() for k, v in agent.named_parameters()}
    actor = {k: v for k, v in params.items() if Agent.is_actor_param(k)}
    assert any(k.startswith("critic") for k in params) and not any(k.startswith("critic") for k in actor)

    def logp(pa, o, a):
        return functional_call(agent, {**params, **pa}, (o.unsqueeze(0), a.unsqueeze(0))).squeeze(0)

    per = vmap(grad(logp), in_dims=(None, 0, 0))(actor, obs, act)            # [N] grads of log pi(a_i|s_i)
    flat = torch.cat([per[k].reshape(n, -1) for k in actor], 1).double()
    g_rec = -adv_rec.double()[:, None] * flat                                   # grad of l_i
    g_tgt = -(adv_raw.double()[:, None] * flat).mean(0)                          # grad of f
    expected = g_rec @ g_tgt
    assert scores.shape == (n,)
    err = (scores.double() - expected).abs().max() / expected.abs().max()
    assert err < 1e-5, err


def test_score_buffer_extra_targets_hook():
    agent = Agent(gym.spaces.Box(-1, 1, (4,), np.float32), gym.spaces.Discrete(3))
    g = torch.Generator().manual_seed(0)
    obs, act = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    adv = torch.randn(40, generator=g)
    probe_obs, probe_act = torch.randn(2, 4, generator=g), torch.tensor([0, 2])
    base = agent.return_scores(obs, act, adv, adv)
    both = agent.return_scores(obs, act, adv, adv, extra_targets=lambda m: -m.log_prob(probe_obs, probe_act))
    assert both.shape == (40, 3)
    torch.testing.assert_close(both[:, 0], base, rtol=1e-5, atol=1e-7)
    # the probe columns against per-sample gradients: <grad l_i, grad(-log pi(a_m | s_m))> over the actor
    params = {k: v.detach() for k, v in agent.named_parameters()}
    actor = {k: v for k, v in params.items() if Agent.is_actor_param(k)}

    def logp(pa, o, a):
        return functional_call(agent, {**params, **pa}, (o.unsqueeze(0), a.unsqueeze(0))).squeeze(0)

    def flat(o, a):
        per = vmap(grad(logp), in_dims=(None, 0, 0))(actor, o, a)
        return torch.cat([per[k].reshape(len(o), -1) for k in actor], 1).double()

    expected = (-adv.double()[:, None] * flat(obs, act)) @ (-flat(probe_obs, probe_act)).T
    err = (both[:, 1:].double() - expected).abs().max() / expected.abs().max()
    assert err < 1e-5, err
    one = agent.return_scores(obs, act, adv, probe_act.new_zeros(40).float(),
                           extra_targets=lambda m: -m.log_prob(probe_obs[1:], probe_act[1:]))
    torch.testing.assert_close(one[:, 1], both[:, 2], rtol=1e-5, atol=1e-7)


def test_score_is_the_first_minibatch_step_of_the_update():
    """<grad of epoch 1's first minibatch loss at theta(k), grad f> = mean of that minibatch's scores: the record loss
    uses the update's own advantage normalisation and order (ratio = 1, so clipping is inactive)."""
    torch.manual_seed(0)
    agent = Agent(gym.spaces.Box(-1, 1, (6,), np.float32), gym.spaces.Discrete(3))
    g = torch.Generator().manual_seed(2)
    n, bs = 200, 64
    obs, act = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    adv = torch.randn(n, generator=g) * 2
    order = torch.randperm(n, generator=g)
    scores = agent.return_scores(obs, act, normalize_advantages(adv, order, bs), adv)
    actor = [p for k, p in agent.named_parameters() if Agent.is_actor_param(k)]
    gf = torch.autograd.grad(-(adv * agent.log_prob(obs, act)).mean(), actor)
    for mb in order.split(bs):
        a = (adv[mb] - adv[mb].mean()) / (adv[mb].std() + 1e-8)   # as ppo_update does
        logp = agent.log_prob(obs[mb], act[mb])
        ratio = (logp - logp.detach()).exp()
        loss = -torch.min(a * ratio, a * ratio.clamp(0.8, 1.2)).mean()
        gl = torch.autograd.grad(loss, actor)
        dot = sum((x * y).sum() for x, y in zip(gl, gf))
        torch.testing.assert_close(dot, scores[mb].mean(), rtol=1e-4, atol=1e-7)


def test_normalize_advantages_modes():
    adv = torch.tensor([1.0, 2.0, 3.0, 10.0, -4.0])
    order = torch.tensor([4, 0, 2, 1, 3])
    out = normalize_advantages(adv, order, 2)
    for chunk in ([4, 0], [2, 1]):
        a = adv[chunk]
        torch.testing.assert_close(out[chunk], (a - a.mean()) / (a.std() + 1e-8))
    assert out[3] == adv[3]  # a chunk of one record stays raw (SB3 skips normalising it)
    torch.testing.assert_close(normalize_advantages(adv, order, 2, "buffer"),
                               (adv - adv.mean()) / (adv.std() + 1e-8))
    torch.testing.assert_close(normalize_advantages(adv, order, 2, "none"), adv)


@pytest.mark.parametrize("kind,ent_coef,clip_grad", [("onehot-mlp", 0.0, False), ("gaussian-mlp", 0.01, True),
                                                      ("box-discrete", 0.01, True)])
def test_numpy_sgd_step_matches_torch_autograd(kind, ent_coef, clip_grad):
    """The numpy fast path (hand-written backward) takes the same SGD steps as torch autograd, to float32 rounding."""
    import copy

    torch.manual_seed(0)
    obs_space, act_space = SPACES.get(kind, (gym.spaces.Box(-1, 1, (8,), np.float32), gym.spaces.Discrete(4)))
    agent = Agent(obs_space, act_space)
    g = torch.Generator().manual_seed(3)
    n = 300
    obs, act = random_records(obs_space, act_space, agent, n, g)
    with torch.no_grad():
        logp, _, values = agent.evaluate_actions(obs, act)
    buf = make_buffer([0.0] * n, values.tolist(), [0] * n, [0] * n, [0.0])
    buf.obs, buf.actions, buf.logp = obs, act, logp + 0.1 * torch.randn(n, generator=g)
    buf.advantages, buf.returns = 2 * torch.randn(n, generator=g), torch.randn(n, generator=g)
    out = {}
    for backend in ("torch", "numpy"):
        a = copy.deepcopy(agent)
        args = Args(optimizer="sgd", learning_rate=0.05, n_epochs=3, batch_size=64, ent_coef=ent_coef,
                        clip_grad=clip_grad, max_grad_norm=0.3, update_backend=backend)
        keep = torch.arange(n) % 7 != 0  # a filtered buffer, with a partial last minibatch
        stats = ppo_update(a, make_optimizer(a, args), buf, keep, args, torch.Generator().manual_seed(0),
                               epoch1_order=torch.randperm(n, generator=torch.Generator().manual_seed(1)))
        out[backend] = (a.state_dict(), stats)
    (wt, st), (wn, sn) = out["torch"], out["numpy"]
    assert st["optimizer_steps"] == sn["optimizer_steps"] == 3 * math.ceil(int((torch.arange(n) % 7 != 0).sum()) / 64)
    for k in wt:
        torch.testing.assert_close(wn[k], wt[k], rtol=1e-5, atol=1e-6)
    for k in ("pg_loss", "v_loss", "approx_kl", "clipfrac"):
        assert sn[k] == pytest.approx(st[k], rel=1e-4, abs=1e-7)
    assert out["numpy"][1]["clipfrac"] > 0  # the clipped branch was exercised


# ----------------------------------------------------------------------------------------------------------------------
# GAE and Monte Carlo returns
# ----------------------------------------------------------------------------------------------------------------------
def make_buffer(rewards, values, dones, bootstrap, next_value, num_envs=1):
    t = lambda x: torch.tensor(x, dtype=torch.float32).reshape(-1)  # noqa: E731
    n = len(t(rewards))
    return Buffer(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long), torch.zeros(n), t(values), t(rewards),
                      t(bootstrap), t(dones), t(dones), t(next_value), num_envs=num_envs)


def sb3_gae(rewards, values, episode_starts, last_values, dones_last, gamma, lam):
    """Stable-Baselines3's RolloutBuffer.compute_returns_and_advantage, transcribed for [T, E] numpy arrays."""
    T = rewards.shape[0]
    adv = np.zeros_like(rewards)
    last = 0
    for step in reversed(range(T)):
        if step == T - 1:
            nnt, nv = 1.0 - dones_last, last_values
        else:
            nnt, nv = 1.0 - episode_starts[step + 1], values[step + 1]
        delta = rewards[step] + gamma * nv * nnt - values[step]
        last = delta + gamma * lam * nnt * last
        adv[step] = last
    return adv


def test_gae_matches_sb3_recursion():
    rng = np.random.default_rng(0)
    T, E = 50, 3
    r, v = rng.normal(size=(T, E)).astype(np.float32), rng.normal(size=(T, E)).astype(np.float32)
    d = (rng.random((T, E)) < 0.1).astype(np.float32)
    boot = np.where(rng.random((T, E)) < 0.5, 0.0, rng.normal(size=(T, E))).astype(np.float32) * d
    nv = rng.normal(size=E).astype(np.float32)
    buf = compute_gae(make_buffer(r, v, d, boot, nv, E), 0.99, 0.95)
    starts = np.concatenate([np.zeros((1, E)), d[:-1]])  # SB3: episode_starts[t+1] = done[t]
    expected = sb3_gae(r + boot, v, starts, nv, d[-1], 0.99, 0.95)
    np.testing.assert_allclose(buf.advantages.numpy().reshape(T, E), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(buf.returns.numpy(), (buf.advantages + buf.values).numpy())


def test_discounted_returns_by_hand():
    # gamma 0.5; episode ends at t=1 (terminated); t=3 is cut by a time limit with V(final) = 6 -> bootstrap 3
    buf = make_buffer([1, 2, 3, 4, 5], [0] * 5, [0, 1, 0, 1, 0], [0, 0, 0, 3, 0], [8])
    g = discounted_returns(buf, 0.5)
    # G4 = 5 + .5*8 = 9; G3 = 4 + 3 = 7 (cut); G2 = 3 + .5*7 = 6.5; G1 = 2 (end); G0 = 1 + .5*2 = 2
    assert g.tolist() == [2.0, 2.0, 6.5, 7.0, 9.0]


# ----------------------------------------------------------------------------------------------------------------------
# Runs: resume, determinism, saved attribution, environments
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("error::RuntimeWarning")  # the env replay must rebuild the envs exactly
@pytest.mark.parametrize("method,kill,env_id", [
    ("iif", "after_checkpoint", "CartPole-v1"),
    ("random", "before_checkpoint", "CartPole-v1"),
    ("iif", "after_checkpoint", "FrozenLake-v1"),  # discrete observations, a dict lookup in step
])
@pytest.mark.parametrize("stream", ["continue", "reseed"])
def test_resume_is_bit_identical(tmp_path, monkeypatch, method, kill, env_id, stream):
    def run_args(*a, **kw):
        return tiny(*a, env_id=env_id, env_stream=stream, **kw)

    straight = ppo.main(run_args(tmp_path, "straight", method=method))
    assert straight["round"] == 3

    real = save_checkpoint

    def killed(path, **kw):
        if kw["round_"] == 2 and kill == "before_checkpoint":
            raise KeyboardInterrupt  # the metrics line of round 2 is written, its checkpoint is not
        real(path, **kw)
        if kw["round_"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(rundir, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        ppo.main(run_args(tmp_path, "resumed", method=method))
    monkeypatch.setattr(rundir, "save_checkpoint", real)
    with pytest.raises(RunDirError, match="--resume"):
        ppo.main(run_args(tmp_path, "resumed", method=method))
    ppo.main(run_args(tmp_path, "resumed", method=method, resume=True))

    assert rows(tmp_path / "resumed") == rows(tmp_path / "straight")
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = ppo.main(run_args(tmp_path, "resumed", method=method, resume=True))
    assert again["already_finished"]


def test_same_curve_with_one_or_two_threads(tmp_path):
    ppo.main(tiny(tmp_path, "t1", threads=1, total_timesteps=256))
    ppo.main(tiny(tmp_path, "t2", threads=2, total_timesteps=256))
    torch.set_num_threads(1)
    assert rows(tmp_path / "t1") == rows(tmp_path / "t2")
    a, b = weights(tmp_path / "t1"), weights(tmp_path / "t2")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["iif", "random"])
def test_a_shorter_budget_is_the_start_of_a_longer_run(tmp_path, method):
    # --total-timesteps sets only the number of rounds (no schedule reads it), so a budget's metrics can be read
    # off the first rounds of a longer run (benchmarks/ablation_table.py --rounds)
    ppo.main(tiny(tmp_path, "short", method=method, total_timesteps=256))
    ppo.main(tiny(tmp_path, "long", method=method, total_timesteps=384))
    short, long = rows(tmp_path / "short"), rows(tmp_path / "long")
    assert len(short) == 3 and len(long) == 4
    assert long[:3] == short


def test_ppo_and_iif_share_round_one_and_differ_after(tmp_path):
    p = {}
    for m in ("ppo", "iif"):
        ppo.main(tiny(tmp_path, m, method=m, total_timesteps=256))
        p[m] = rows(tmp_path / m)
    assert p["ppo"][0]["eval_return"] == p["iif"][0]["eval_return"]  # same theta(0)
    assert p["ppo"][1]["kept_fraction"] == 1.0 and p["iif"][1]["kept_fraction"] < 1.0
    assert p["ppo"][1]["pg_loss"] != p["iif"][1]["pg_loss"]


def test_save_attribution_round_trip(tmp_path):
    args = tiny(tmp_path, "fl", env_id="FrozenLake-v1", env_kwargs={"map_name": "4x4", "is_slippery": False},
                total_timesteps=256, save_attribution=True, method="ppo")
    ppo.main(args)
    assert store.saved_rounds(args.run_dir) == [0, 1]
    d = store.load_round(args.run_dir, 1)
    n = 128
    for key in ("obs", "actions", "rewards", "dones", "values", "logp", "adv_gae", "returns_mc", "score_return",
                "adv_norm", "keep", "order_epoch1"):
        assert d[key].shape[0] == n, key
    assert set(np.unique(d["obs"])) <= set(range(16)) and d["keep"].all()
    # the saved scores are reproducible from the saved theta(1) and the saved buffer
    theta = torch.load(theta_path(args.run_dir, 1), weights_only=True)
    agent = Agent(gym.spaces.Discrete(16), gym.spaces.Discrete(4))
    agent.load_state_dict(theta["agent"])
    s = agent.return_scores(torch.from_numpy(d["obs"]), torch.from_numpy(d["actions"]),
                         torch.from_numpy(d["adv_norm"]), torch.from_numpy(d["adv_gae"]))
    torch.testing.assert_close(s, torch.from_numpy(d["score_return"]), rtol=1e-5, atol=1e-8)
    # returns_mc: the discounted return-to-go recomputed from the saved rewards, cuts and bootstraps
    g, out = float(d["next_value"][0]), np.zeros(n)
    for t in reversed(range(n)):
        g = d["rewards"][t] + d["bootstrap"][t] + 0.99 * (1 - d["dones"][t]) * g
        out[t] = g
    np.testing.assert_allclose(d["returns_mc"], out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("env_id,kw", [
    ("Pendulum-v1", {}),
    ("MiniGrid-Empty-5x5-v0", {}),
])
def test_other_spaces_run(tmp_path, env_id, kw):
    out = ppo.main(tiny(tmp_path, env_id, env_id=env_id, n_steps=64, total_timesteps=128, **kw))
    assert out["round"] == 2 and math.isfinite(out["eval_return"]) and 0 < out["kept_fraction"] <= 1


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------
class NaNRewardEnv(gym.Env):
    observation_space = gym.spaces.Box(-1, 1, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        reward = float("nan") if self.t == 50 else 1.0
        return np.zeros(2, np.float32), reward, False, self.t >= 100, {}


class MultiDiscreteEnv(NaNRewardEnv):
    action_space = gym.spaces.MultiDiscrete([2, 2])


class ShiftedActionsEnv(NaNRewardEnv):
    action_space = gym.spaces.Discrete(2, start=1)


class ChannelFirstEnv(NaNRewardEnv):
    observation_space = gym.spaces.Box(0, 255, (3, 8, 8), np.uint8)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros((3, 8, 8), np.uint8), {}

    def step(self, action):
        _, reward, term, trunc, info = super().step(action)
        return np.zeros((3, 8, 8), np.uint8), 1.0, term, trunc, info


class EndlessEnv(NaNRewardEnv):  # never terminates, no TimeLimit
    def step(self, action):
        return np.zeros(2, np.float32), 1.0, False, False, {}


gym.register("FastattrTest/NaNReward-v0", entry_point=NaNRewardEnv)
gym.register("FastattrTest/MultiDiscrete-v0", entry_point=MultiDiscreteEnv)
gym.register("FastattrTest/ShiftedActions-v0", entry_point=ShiftedActionsEnv)
gym.register("FastattrTest/ChannelFirst-v0", entry_point=ChannelFirstEnv)
gym.register("FastattrTest/Endless-v0", entry_point=EndlessEnv)


@pytest.mark.parametrize("kw,match", [
    ({"env_id": "CartPole-v9"}, "unknown --env-id"),
    ({"env_id": "Blackjack-v1"}, "unsupported observation space"),
    ({"env_id": "FastattrTest/MultiDiscrete-v0"}, "unsupported action space"),
    ({"env_id": "FastattrTest/ShiftedActions-v0"}, "starts at 1"),
    ({"env_id": "FastattrTest/ChannelFirst-v0"}, "channel-first"),
    ({"optimizer": "adam", "update_backend": "numpy"}, "--update-backend numpy needs"),
    ({"seed": -1}, "--seed must be"),
    ({"p": 0.0}, r"p \(--p"),
    ({"p": 1.5}, r"p \(--p"),
    ({"method": "best"}, "--method"),
    ({"total_timesteps": 100}, "less than one round"),
    ({"env_kwargs": {"no_such_kwarg": 1}}, "could not create"),
    ({"network": "cnn"}, "image observations"),
    ({"env_stream": "fresh"}, "--env-stream must be continue or reseed"),
])
def test_bad_input_is_a_clear_error_and_leaves_no_run_dir(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        ppo.main(tiny(tmp_path, **kw))
    assert not (tmp_path / "run").exists()


def test_nan_reward_stops_with_the_last_good_round_kept(tmp_path):
    args = tiny(tmp_path, env_id="FastattrTest/NaNReward-v0", n_steps=32, total_timesteps=128, eval_episodes=0)
    with pytest.raises(ValueError, match="non-finite reward"):
        ppo.main(args)
    assert [r["round"] for r in rows(args.run_dir)] == [0, 1]
    assert load_checkpoint(checkpoint_path(args.run_dir))["round"] == 1


def test_nan_reward_in_evaluation_is_an_error_not_a_nan_return(tmp_path):
    with pytest.raises(ValueError, match=r"NaNReward-v0 \(evaluation\) returned a non-finite reward"):
        ppo.main(tiny(tmp_path, env_id="FastattrTest/NaNReward-v0", n_steps=32, total_timesteps=128, eval_episodes=1))


def test_channel_first_images_run_with_the_mlp(tmp_path):
    out = ppo.main(tiny(tmp_path, env_id="FastattrTest/ChannelFirst-v0", network="mlp", n_steps=32,
                        total_timesteps=64, eval_episodes=0))
    assert out["round"] == 2


def test_evaluation_of_an_env_that_never_ends_stops_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(rollout, "EVAL_EPISODE_CAP", 500)
    with pytest.raises(ValueError, match="without ending.*max_episode_steps"):
        ppo.main(tiny(tmp_path, env_id="FastattrTest/Endless-v0", n_steps=32, total_timesteps=64, eval_episodes=1))
    # that run never finished a round, so the same dir takes the fixed arguments
    out = ppo.main(tiny(tmp_path, env_id="FastattrTest/Endless-v0", n_steps=32, total_timesteps=64, eval_episodes=1,
                        env_kwargs={"max_episode_steps": 40}))
    assert out["round"] == 2 and json.loads((tmp_path / "run" / "args.json").read_text())["env_kwargs"] == {
        "max_episode_steps": 40}


def test_env_id_with_a_module_prefix(tmp_path, monkeypatch):
    """'module:Env-v0' as gym.make takes it: the module is imported (and registers the id) before the id is checked."""
    (tmp_path / "my_envs_fa.py").write_text(
        "import gymnasium as gym\n"
        "gym.register('FastattrMod/Cart-v0', entry_point='gymnasium.envs.classic_control:CartPoleEnv', "
        "max_episode_steps=50)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    envs.check_env_id("my_envs_fa:FastattrMod/Cart-v0")
    with pytest.raises(ValueError, match="cannot import module"):
        envs.check_env_id("no_such_module_fa:FastattrMod/Cart-v0")
    out = ppo.main(tiny(tmp_path, env_id="my_envs_fa:FastattrMod/Cart-v0", n_steps=32, total_timesteps=64))
    assert out["round"] == 2


def test_runs_with_neighbouring_seeds_share_no_training_env():
    """One env: the run's seed (the paper's runs). Several: seeds derived per env, so seed 0's env 1 is not seed 1's
    env 0 (a plain vector-env seed gives env i seed + i)."""
    assert train_env_seeds(Args(seed=3)) == 3
    a, b = (train_env_seeds(Args(seed=s, num_envs=4)) for s in (0, 1))
    assert len(set(a) | set(b)) == 8 and a == train_env_seeds(Args(seed=0, num_envs=4))


def test_run_dir_holding_another_run_is_never_touched(tmp_path):
    ppo.main(tiny(tmp_path, total_timesteps=128, n_steps=128))
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").glob("*.json*")}
    with pytest.raises(RunDirError, match="holds another run.*seed: 1 there vs 2 now"):
        ppo.main(tiny(tmp_path, total_timesteps=128, n_steps=128, seed=2, resume=True))
    assert before == {p.name: p.read_bytes() for p in (tmp_path / "run").glob("*.json*")}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty"):
        ppo.main(tiny(tmp_path, "other"))


def test_run_dir_in_use_by_another_process_is_never_touched(tmp_path):
    args = tiny(tmp_path, total_timesteps=256)
    ppo.main(args)
    def files():
        return {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != LOCK_FILE}

    before = files()
    with open(tmp_path / "run" / LOCK_FILE, "a+") as held:  # what a still-running `fastattr train` holds
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate(0)
        held.write("4242\n")
        held.flush()
        with pytest.raises(RunDirError, match=r"in use by another fastattr process \(pid 4242\)"):
            ppo.main(tiny(tmp_path, total_timesteps=256, resume=True))
    assert files() == before
    # main drops its lock when it returns or fails: the same process can go on with the run dir
    with pytest.raises(RunDirError, match="holds another run"):
        ppo.main(tiny(tmp_path, total_timesteps=256, seed=2, resume=True))
    assert ppo.main(tiny(tmp_path, total_timesteps=256, resume=True))["already_finished"]


def test_filter_keeping_nothing_trains_on_everything(tmp_path, monkeypatch):
    monkeypatch.setattr(targets, "return_scores", lambda model, log_prob, adv, *a, **k: -torch.ones(adv.shape[0]))
    with pytest.warns(RuntimeWarning, match="keep no records"):
        ppo.main(tiny(tmp_path, method="iif-all-neg", total_timesteps=128))
    r = rows(tmp_path / "run")[1]
    assert r["filter_fallback"] and r["kept_fraction"] == 1.0


@pytest.mark.parametrize("stream", ["continue", "reseed"])
def test_env_stream_reseed_starts_every_round_from_the_seeded_reset(tmp_path, stream):
    args = tiny(tmp_path, stream, method="ppo", save_attribution=True, env_stream=stream, eval_episodes=0)
    ppo.main(args)
    first = envs.make_vector_env(args.env_id, 1).reset(seed=args.seed)[0][0]
    starts = [store.load_round(args.run_dir, k)["obs"][0] for k in store.saved_rounds(args.run_dir)]
    assert len(starts) == 3
    np.testing.assert_array_equal(starts[0], first)
    same = [np.array_equal(starts[0], s) for s in starts[1:]]
    assert all(same) if stream == "reseed" else not any(same)


def test_run_from_before_an_option_existed_resumes_with_its_default(tmp_path):
    args = tiny(tmp_path, total_timesteps=256)
    ppo.main(args)
    stored = json.loads((tmp_path / "run" / "args.json").read_text())
    del stored["env_stream"]  # as written before --env-stream existed
    (tmp_path / "run" / "args.json").write_text(json.dumps(stored))
    assert ppo.main(tiny(tmp_path, total_timesteps=256, resume=True))["already_finished"]
    with pytest.raises(RunDirError, match="env_stream: 'continue' there vs 'reseed' now"):
        ppo.main(tiny(tmp_path, total_timesteps=256, resume=True, env_stream="reseed"))
