"""Probe predicates on constructed (state, action) arrays whose answer is known."""
import numpy as np
import pytest

from fastattr import probes


def test_generic_probes():
    obs = np.array([0.0, 1.0, 2.0, 1.0])
    acts = np.array([1, 1, 2, 3])
    assert probes.get_probe("action=1")(obs, acts).tolist() == [True, True, False, False]
    assert probes.get_probe("state=1")(np.eye(3)[[0, 1, 2, 1]], acts).tolist() == [False, True, False, True]
    assert probes.get_probe("state=1,action=3")(obs, acts).tolist() == [False, False, False, True]
    with pytest.raises(ValueError, match="unknown probe"):
        probes.get_probe("dance")


def test_highway_slower_when_tailing():
    ego = [1, 0.5, 0.0, 0.3, 0]
    far = [1, 0.4, 0.0, -0.01, 0]          # same lane, 80 m ahead
    close = [1, 0.08, 0.02, -0.02, 0]      # same lane, 16 m ahead
    side = [1, 0.08, 0.33, -0.02, 0]       # next lane
    behind = [1, -0.08, 0.0, 0.0, 0]
    absent = [0, 0.08, 0.0, 0.0, 0]
    obs = np.array([[ego, far, absent], [ego, close, absent], [ego, side, behind], [ego, absent, close]])
    p = probes.get_probe("highway-slower-when-tailing")
    assert p(obs, np.array([4, 4, 4, 4])).tolist() == [False, True, False, True]
    assert p(obs, np.array([4, 3, 4, 1])).tolist() == [False, False, False, False]   # not SLOWER
    assert p(obs.reshape(4, -1), np.array([4, 4, 4, 4])).tolist() == [False, True, False, True]  # flattened obs
    wide = probes.get_probe("highway-slower-when-tailing:gap=0.5")
    assert wide(obs, np.array([4, 4, 4, 4])).tolist() == [True, True, False, True]


def test_minigrid_turn_at_wall():
    img = np.ones((2, 7, 7, 3))                 # object 1 = empty everywhere
    img[0, 3, 5, 0] = 2                         # record 0: a wall right in front of the agent (3, 6) facing up
    p = probes.get_probe("minigrid-turn-at-wall")
    assert p(img, np.array([0, 0])).tolist() == [True, False]
    assert p(img, np.array([2, 1])).tolist() == [False, False]
    assert p(np.transpose(img, (0, 3, 1, 2)), np.array([1, 1])).tolist() == [True, False]   # channel-first
    with pytest.raises(ValueError, match="MiniGrid runs"):
        p.check_env("FrozenLake-v1")
