"""fastattr.envs: the environment wrappers change nothing an agent sees."""
import gymnasium as gym
import numpy as np
import pytest

from fastattr import envs


@pytest.mark.parametrize("env_id, config", [
    ("highway-fast-v0", {"observation": {"type": "Kinematics"}, "action": {"type": "DiscreteMetaAction"},
                         "vehicles_count": 10}),  # the paper preset's config
    ("highway-fast-v0", {"observation": {"type": "Kinematics", "features": ["presence", "x", "y", "cos_h", "sin_h"],
                                         "absolute": True, "order": "shuffled", "vehicles_count": 7},
                         "vehicles_count": 3}),  # fewer vehicles than rows: zero padding; shuffled rows
    ("merge-v1", {}),
])
def test_numpy_kinematics_is_highway_envs_observation_bit_for_bit(env_id, config):
    pytest.importorskip("highway_env")
    ours = envs.make_env(env_id, {"config": config})()
    theirs = gym.make(env_id, config=config)
    assert type(ours.unwrapped.observation_type).__name__ == "KinematicObservation"  # before the first reset
    rng = np.random.default_rng(0)
    episodes, seed = 0, 0
    o1, _ = ours.reset(seed=seed)
    o2, _ = theirs.reset(seed=seed)
    assert type(ours.unwrapped.observation_type).__name__ == "_NumpyKinematicObservation"
    for _ in range(60):
        a = int(rng.integers(ours.action_space.n))
        o1, r1, te1, tr1, _ = ours.step(a)
        o2, r2, te2, tr2, _ = theirs.step(a)
        assert o1.dtype == o2.dtype and o1.shape == o2.shape
        np.testing.assert_array_equal(o1, o2)
        assert (r1, te1, tr1) == (r2, te2, tr2)
        if te1 or tr1:
            episodes, seed = episodes + 1, seed + 1
            ours.reset(seed=seed)
            theirs.reset(seed=seed)


def test_numpy_kinematics_leaves_other_observation_types_alone():
    pytest.importorskip("highway_env")
    config = {"observation": {"type": "OccupancyGrid"}}
    env = envs.make_env("highway-fast-v0", {"config": config})()
    env.reset(seed=0)
    assert type(env.unwrapped.observation_type).__name__ == "OccupancyGridObservation"


def test_numpy_kinematics_class_is_built_once():
    pytest.importorskip("highway_env")
    env = envs.make_env("highway-fast-v0")()
    env.reset(seed=0)
    first = type(env.unwrapped.observation_type)
    env.reset(seed=1)
    assert type(env.unwrapped.observation_type) is first
