"""fastattr.integrations.sb3.IIFPPO: bit-identical to SB3's PPO without a filter, scores equal to a brute-force float64
per-record autograd loop, dropped records absent from every minibatch, and an IIF run that learns."""
import copy
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

pytest.importorskip("stable_baselines3")
from stable_baselines3 import PPO  # noqa: E402
from stable_baselines3.common.buffers import RolloutBuffer  # noqa: E402
from stable_baselines3.common.evaluation import evaluate_policy  # noqa: E402
from stable_baselines3.common.logger import configure  # noqa: E402
from stable_baselines3.common.preprocessing import preprocess_obs  # noqa: E402

from fastattr.integrations.sb3 import IIFPPO, is_actor_param  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # scores and timings as in the loop, whatever the machine

SMALL = dict(n_steps=128, batch_size=32, n_epochs=2, device="cpu")
TINY = dict(n_steps=64, batch_size=16, device="cpu")


class TinyImageEnv(gym.Env):
    """36x36x3 uint8 noise images (NatureCNN's smallest input), 3 actions, reward 1 for action 1, 10-step episodes."""

    observation_space = spaces.Box(0, 255, (36, 36, 3), np.uint8)
    action_space = spaces.Discrete(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        return self._obs(), float(action == 1), self.t >= 10, False, {}

    def _obs(self):
        return self.np_random.integers(0, 256, self.observation_space.shape, dtype=np.uint8)


class MultiDiscreteEnv(gym.Env):
    """Random 3-dim observations, MultiDiscrete([3, 2]) actions, reward 1 when the first action is 1."""

    observation_space = spaces.Box(-1, 1, (3,), np.float32)
    action_space = spaces.MultiDiscrete([3, 2])

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self._obs(), {}

    def step(self, action):
        return self._obs(), float(action[0] == 1), bool(self.np_random.random() < 0.1), False, {}

    def _obs(self):
        return self.np_random.uniform(-1, 1, 3).astype(np.float32)


class DictObsEnv(gym.Env):
    observation_space = spaces.Dict({"x": spaces.Box(-1, 1, (2,), np.float32)})
    action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return {"x": np.zeros(2, np.float32)}, {}

    def step(self, action):
        return {"x": np.zeros(2, np.float32)}, 0.0, True, False, {}


def capture_rounds(model) -> list:
    """Wraps model.train: records (a copy of the policy, numpy's global RNG state) just before each update."""
    rounds, train = [], model.train

    def spy():
        rounds.append((copy.deepcopy(model.policy), np.random.get_state()))
        train()

    model.train = spy
    return rounds


def epoch1_order(rng_state, n: int) -> np.ndarray:
    """The permutation SB3's RolloutBuffer.get() draws first from numpy's global RNG in that state."""
    rs = np.random.RandomState()
    rs.set_state(rng_state)
    return rs.permutation(n)


def brute_force_scores(policy, buffer, order, batch_size: int, records) -> torch.Tensor:
    """score_i = <grad l_i, grad f> over the actor's parameters by one autograd call per record, in float64, written
    out independently of fastattr: l_i = -A~_i log pi(a_i|s_i) with A~ normalised per batch_size chunk of `order`,
    f = -(1/N) sum_j A_j log pi(a_j|s_j) with the raw advantages."""
    pol = copy.deepcopy(policy).double()
    params = [p for name, p in pol.named_parameters() if is_actor_param(name)]
    obs = preprocess_obs(torch.as_tensor(buffer.observations), pol.observation_space,
                         normalize_images=pol.normalize_images).double()
    actions = torch.as_tensor(buffer.actions, dtype=torch.float64)
    if isinstance(pol.action_space, spaces.Discrete):
        actions = actions.long().flatten()
    adv = torch.as_tensor(buffer.advantages.flatten(), dtype=torch.float64)
    adv_norm = adv.clone()
    for chunk in torch.as_tensor(order).split(batch_size):
        adv_norm[chunk] = (adv[chunk] - adv[chunk].mean()) / (adv[chunk].std() + 1e-8)

    def logp(idx):
        latent = pol.mlp_extractor.forward_actor(pol.pi_features_extractor(obs[idx]))
        return pol._get_action_dist_from_latent(latent).log_prob(actions[idx])

    grad_f = torch.autograd.grad(-(adv * logp(slice(None))).mean(), params)
    out = []
    for i in records:
        grad_i = torch.autograd.grad(-(adv_norm[i] * logp(slice(i, i + 1))).sum(), params)
        out.append(sum((a * b).sum() for a, b in zip(grad_i, grad_f)))
    return torch.stack(out)


def assert_scores_close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5):
    torch.testing.assert_close(ours.double(), ref, rtol=rtol, atol=rtol * float(ref.abs().max()))


def test_import_fastattr_does_not_import_sb3():
    code = "import sys, fastattr; assert 'stable_baselines3' not in sys.modules, 'sb3 imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_filter_none_is_bit_identical_to_ppo(env_id):
    plain = PPO("MlpPolicy", env_id, seed=3, **SMALL).learn(3 * SMALL["n_steps"])
    ours = IIFPPO("MlpPolicy", env_id, filter="none", seed=3, **SMALL).learn(3 * SMALL["n_steps"])
    expected, got = plain.policy.state_dict(), ours.policy.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert ours.last_keep.all() and torch.isfinite(ours.last_scores).all()


@pytest.mark.parametrize("env", ["CartPole-v1", "Pendulum-v1", MultiDiscreteEnv])
def test_scores_equal_brute_force(env):
    env = env if isinstance(env, str) else env()
    model = IIFPPO("MlpPolicy", env, filter="iif", seed=1, n_steps=64, batch_size=32, n_epochs=1, device="cpu")
    rounds = capture_rounds(model)
    model.learn(2 * 64)
    policy, rng_state = rounds[-1]
    buffer = model.rollout_buffer
    n = buffer.buffer_size * buffer.n_envs
    ref = brute_force_scores(policy, buffer, epoch1_order(rng_state, n), model.batch_size, range(n))
    assert model.last_scores.dtype == torch.float32 and model.last_scores.shape == (n,)
    assert_scores_close(model.last_scores, ref)


def test_scores_follow_sb3_record_order_with_several_envs():
    """The buffer is stored [n_steps, n_envs]: record i must be SB3's flattened index i."""
    from stable_baselines3.common.env_util import make_vec_env

    env = make_vec_env("CartPole-v1", n_envs=3, seed=0)
    model = IIFPPO("MlpPolicy", env, filter="iif", seed=0, n_steps=32, batch_size=16, n_epochs=1, device="cpu")
    rounds = capture_rounds(model)
    model.learn(32 * 3)
    policy, rng_state = rounds[-1]
    buffer = model.rollout_buffer
    n = 32 * 3
    ref = brute_force_scores(policy, buffer, epoch1_order(rng_state, n), model.batch_size, range(n))
    assert_scores_close(model.last_scores, ref)


def test_scores_in_float64_contractions():
    model = IIFPPO("MlpPolicy", "CartPole-v1", filter="iif", seed=2, score_kwargs={"dtype": torch.float64},
                   n_steps=64, batch_size=16, n_epochs=1, device="cpu")
    rounds = capture_rounds(model)
    model.learn(64)
    policy, rng_state = rounds[-1]
    ref = brute_force_scores(policy, model.rollout_buffer, epoch1_order(rng_state, 64), 16, range(64))
    assert model.last_scores.dtype == torch.float64
    assert_scores_close(model.last_scores, ref)


def test_cnn_policy_scores_equal_brute_force():
    model = IIFPPO("CnnPolicy", TinyImageEnv(), filter="iif", seed=0, n_steps=64, batch_size=16, n_epochs=1,
                   device="cpu")
    assert any(name.startswith("features_extractor.cnn.") for name, _ in model.policy.named_parameters())
    rounds = capture_rounds(model)
    model.learn(64)
    policy, rng_state = rounds[-1]
    records = [0, 5, 17, 31, 42, 63]
    ref = brute_force_scores(policy, model.rollout_buffer, epoch1_order(rng_state, 64), 16, records)
    assert_scores_close(model.last_scores[records], ref)
    assert model.last_keep.shape == (64,) and not model.last_keep.all()


def actor_and_critic(policy) -> tuple[list[str], list[str]]:
    names = [name for name, _ in policy.named_parameters()]
    return [n for n in names if is_actor_param(n)], [n for n in names if not is_actor_param(n)]


def test_actor_parameters():
    actor, critic = actor_and_critic(IIFPPO("MlpPolicy", "Pendulum-v1", **TINY).policy)
    assert "log_std" in actor and "action_net.weight" in actor
    assert any(n.startswith("mlp_extractor.policy_net.") for n in actor)
    assert critic and all(n.startswith(("mlp_extractor.value_net.", "value_net.")) for n in critic)
    actor, critic = actor_and_critic(IIFPPO("CnnPolicy", TinyImageEnv(), **TINY).policy)
    assert any(n.startswith("features_extractor.cnn.") for n in actor)  # shared: the actor's
    assert critic == ["value_net.weight", "value_net.bias"]
    actor, critic = actor_and_critic(IIFPPO("CnnPolicy", TinyImageEnv(), **TINY,
                                            policy_kwargs={"share_features_extractor": False}).policy)
    assert any(n.startswith("features_extractor.cnn.") for n in actor)
    assert any(n.startswith("vf_features_extractor.cnn.") for n in critic)


def spy_minibatches(model) -> list:
    batches, get_samples = [], model.rollout_buffer._get_samples

    def spy(batch_inds, env=None):
        batches.append(np.array(batch_inds))
        return get_samples(batch_inds, env)

    model.rollout_buffer._get_samples = spy
    return batches


@pytest.mark.parametrize("remainder", ["keep", "drop"])
def test_update_sees_exactly_the_kept_records(remainder):
    n_steps, batch_size, n_epochs = 128, 32, 3
    model = IIFPPO("MlpPolicy", "CartPole-v1", filter="iif", p=1.0, minibatch_remainder=remainder, seed=0,
                   n_steps=n_steps, batch_size=batch_size, n_epochs=n_epochs, device="cpu")
    rounds = capture_rounds(model)
    batches = spy_minibatches(model)
    model.learn(n_steps)
    keep = model.last_keep
    assert keep.dtype == torch.bool and keep.shape == (n_steps,)
    assert model.last_scores.shape == (n_steps,)
    assert torch.equal(keep, model.last_scores >= 0)  # p = 1: every negative record dropped
    kept = np.flatnonzero(keep.numpy())
    k = len(kept)
    assert 0 < k < n_steps and k % batch_size, "the case must have dropped records and a partial minibatch"
    order = epoch1_order(rounds[0][1], n_steps)
    order1 = order[keep.numpy()[order]]
    per_epoch = -(-k // batch_size) if remainder == "keep" else k // batch_size
    assert len(batches) == n_epochs * per_epoch
    epochs = [np.concatenate(batches[e * per_epoch:(e + 1) * per_epoch]) for e in range(n_epochs)]
    if remainder == "keep":
        assert all(np.array_equal(np.sort(e), kept) for e in epochs)
        np.testing.assert_array_equal(epochs[0], order1)
    else:
        assert all(len(b) == batch_size for b in batches)
        assert all(len(np.unique(e)) == len(e) and np.isin(e, kept).all() for e in epochs)
        np.testing.assert_array_equal(epochs[0], order1[:per_epoch * batch_size])
    assert not np.array_equal(epochs[1], epochs[2])  # later epochs reshuffle


@pytest.mark.filterwarnings("ignore:You have specified a mini-batch size")
def test_remainder_drop_without_filter_uses_full_minibatches():
    model = IIFPPO("MlpPolicy", "CartPole-v1", filter="none", minibatch_remainder="drop", seed=0,
                   n_steps=100, batch_size=32, n_epochs=2, device="cpu")
    batches = spy_minibatches(model)
    model.learn(100)
    assert [len(b) for b in batches] == [32] * 6


def test_logger_records_attribution(tmp_path):
    model = IIFPPO("MlpPolicy", "CartPole-v1", filter="iif", seed=0, **SMALL)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    model.learn(2 * SMALL["n_steps"])
    header = (tmp_path / "progress.csv").read_text().splitlines()[0].split(",")
    assert "attribution/kept_fraction" in header and "attribution/seconds" in header
    assert model.logger.name_to_value["attribution/kept_fraction"] == pytest.approx(model.last_keep.float().mean())


def test_random_drops_as_many_as_iif_and_is_seeded():
    def first_round(filter, seed=4):
        return IIFPPO("MlpPolicy", "CartPole-v1", filter=filter, seed=seed, **SMALL).learn(SMALL["n_steps"])

    iif_model, rand, rand_again = first_round("iif"), first_round("random"), first_round("random")
    assert torch.equal(iif_model.last_scores, rand.last_scores)  # same rollout, same parameters
    assert int((~rand.last_keep).sum()) == int((~iif_model.last_keep).sum()) > 0
    assert not torch.equal(rand.last_keep, iif_model.last_keep)
    assert torch.equal(rand.last_keep, rand_again.last_keep)
    assert not torch.equal(first_round("random", seed=5).last_keep, rand.last_keep)


def test_save_and_load_keep_the_filter(tmp_path):
    model = IIFPPO("MlpPolicy", "CartPole-v1", filter="random", p=0.25, minibatch_remainder="drop", **SMALL)
    model.save(tmp_path / "m.zip")
    loaded = IIFPPO.load(tmp_path / "m.zip", env=gym.make("CartPole-v1"), device="cpu")
    assert (loaded.filter, loaded.p, loaded.minibatch_remainder) == ("random", 0.25, "drop")
    loaded.learn(SMALL["n_steps"])
    assert loaded.last_keep.shape == (SMALL["n_steps"],)


@pytest.mark.parametrize("kwargs, match", [
    ({"filter": "ppo2"}, "filter must be one of"),
    ({"p": 0.0}, r"p \(the fraction"),
    ({"p": True}, r"p \(the fraction"),
    ({"minibatch_remainder": "skip"}, "minibatch_remainder must be"),
    ({"score_kwargs": {"params": ["action_net"]}}, "score_kwargs"),
    ({"score_kwargs": [("dtype", torch.float64)]}, "score_kwargs must be a dict"),
    ({"rollout_buffer_class": RolloutBuffer}, "rollout_buffer_class must be FilteredRolloutBuffer"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IIFPPO("MlpPolicy", "CartPole-v1", **SMALL, **kwargs)


def test_dict_observations_are_refused():
    with pytest.raises(ValueError, match="Dict observation spaces"):
        IIFPPO("MultiInputPolicy", DictObsEnv(), **SMALL)


def mean_return(model, seed: int, episodes: int = 10) -> float:
    env = gym.make("LunarLander-v3")
    env.reset(seed=seed)
    return evaluate_policy(model, env, n_eval_episodes=episodes, deterministic=False, warn=False)[0]


def test_iif_learns_lunar_lander():
    """SB3's default PPO settings, 20 rounds of 2048 steps (about 45 s on one core). Verified over seeds 0-4: the mean
    return of 10 stochastic episodes rose by 128-245 (from -150..-235 to -75..+12); the test asks for 60."""
    model = IIFPPO("MlpPolicy", "LunarLander-v3", filter="iif", seed=0, device="cpu")
    before = mean_return(model, seed=100)
    model.learn(20 * 2048)
    after = mean_return(model, seed=100)
    assert after > before + 60, (before, after)
