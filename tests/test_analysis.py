"""Every statistic in fastattr.analysis on a constructed case whose answer is known by hand."""
import math

import numpy as np
import pytest

from fastattr import analysis as A


# --- Monte Carlo returns and advantages ------------------------------------------------------------------------------

def test_discounted_returns_resets_at_episode_end():
    # episode 1: rewards 1, 1 (ends at t=1); episode 2: 0, 2 (still running at the end of the buffer)
    g = A.discounted_returns([1, 1, 0, 2], [False, True, False, False], gamma=0.5)
    np.testing.assert_allclose(g, [1 + 0.5 * 1, 1, 0 + 0.5 * 2, 2])


def test_discounted_returns_bootstrap_and_parallel_envs():
    r = np.array([[1.0, 0.0], [1.0, 0.0]])          # [T=2, E=2]
    ends = np.array([[False, False], [False, True]])
    g = A.discounted_returns(r, ends, gamma=0.9, bootstrap=[10.0, 10.0])
    # env 0 runs on: G_1 = 1 + 0.9*10, G_0 = 1 + 0.9*G_1; env 1 ends at t=1: no bootstrap
    np.testing.assert_allclose(g[:, 0], [1 + 0.9 * (1 + 9), 1 + 9])
    np.testing.assert_allclose(g[:, 1], [0, 0])


def test_mc_advantage_buffer_matches_hand_computation():
    # state 0: action 0 gives returns 1 and 3, action 1 gives 0   -> mean_s = 4/3
    # state 1: action 2 gives 5 (only one record)                  -> Ā = 0
    states = [0, 0, 0, 1]
    actions = [0, 0, 1, 2]
    returns = [1.0, 3.0, 0.0, 5.0]
    adv = A.mc_advantage_buffer(states, actions, returns)
    np.testing.assert_allclose(adv, [2 - 4 / 3, 2 - 4 / 3, 0 - 4 / 3, 0.0])


def test_mc_advantage_buffer_one_hot_states_equal_integer_states():
    ids = np.array([2, 0, 2, 1, 0, 2])
    onehot = np.eye(4)[ids]
    actions = np.array([1, 0, 0, 1, 1, 1])
    g = np.array([0.5, 1.0, 2.0, 0.0, 3.0, 1.5])
    np.testing.assert_allclose(A.mc_advantage_buffer(onehot, actions, g), A.mc_advantage_buffer(ids, actions, g))


def test_mc_advantage_auto_picks_buffer_or_baseline():
    g = np.array([1.0, 2.0, 3.0])
    v = np.array([0.5, 0.5, 0.5])
    cont = np.array([[0.1, 0.2], [0.3, 0.1], [0.2, 0.2]])
    np.testing.assert_allclose(A.mc_advantage(g, v, cont, [0, 1, 0]), g - v)
    assert A.is_discrete_states(np.eye(3)) and A.is_discrete_states(np.array([0, 3, 1]))
    assert not A.is_discrete_states(cont)
    np.testing.assert_allclose(A.mc_advantage(g, v, np.eye(3)[[0, 0, 1]], [0, 1, 0]), [-0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="values"):
        A.mc_advantage(g, None, cont, [0, 1, 0])


def test_sign_mismatch_and_gap():
    a_mc = np.array([1.0, -1.0, 0.5, 0.0])
    a_gae = np.array([2.0, 0.5, -0.5, 0.3])
    np.testing.assert_array_equal(A.sign_mismatch(a_mc, a_gae), [False, True, True, True])
    np.testing.assert_allclose(A.advantage_gap(a_mc, a_gae), [1.0, 1.5, 1.0, 0.3])


# --- rank correlation and selection ----------------------------------------------------------------------------------

def test_spearman_known_values():
    x = [1, 2, 3, 4, 5]
    assert A.spearman(x, [10, 20, 30, 40, 1000])[0] == pytest.approx(1.0)      # monotone -> 1
    assert A.spearman(x, [5, 4, 3, 2, 1])[0] == pytest.approx(-1.0)
    # no ties: rho = 1 - 6 Σd² / (n(n²-1)) with d = [-1, 1, -1, 1, 0] -> 1 - 24/120 = 0.8
    assert A.spearman(x, [2, 1, 4, 3, 5])[0] == pytest.approx(0.8)
    assert math.isnan(A.spearman(x, [1, 1, 1, 1, 1])[0])                       # constant -> nan, no warning
    assert A.spearman([1, 2, np.nan, 4], [1, 2, 3, 4])[0] == pytest.approx(1.0)  # non-finite pairs dropped


def test_top_bottom_order_ties_and_clipping():
    s = np.array([0.1, -2.0, 3.0, -2.0, 0.5])
    top, bottom = A.top_bottom(s, 2)
    np.testing.assert_array_equal(top, [2, 4])
    np.testing.assert_array_equal(bottom, [1, 3])                                  # tie broken by index
    top, bottom = A.top_bottom(s, 99)
    assert len(top) == len(bottom) == 5
    with pytest.raises(ValueError, match="not finite"):
        A.top_bottom([1.0, np.nan], 1)


# --- roughness -------------------------------------------------------------------------------------------------------

def test_roughness_hand_computed_three_points():
    # embeddings on a line at 0, 1, 3; u = 1: 0->1, 1->0, 2->1, so edges (0,1) and (1,2)
    # pairwise distances 1, 3, 2 -> median sigma = 2; w01 = exp(-1/8), w12 = exp(-4/8)
    e = np.array([[0.0], [1.0], [3.0]])
    s = np.array([4.0, 2.0, 1.0])                      # Ĩ = [1, 0.5, 0.25]
    r = A.roughness(s, e, n_neighbors=1)
    w01, w12 = math.exp(-1 / 8), math.exp(-4 / 8)
    expected = (w01 * 0.5 ** 2 + w12 * 0.25 ** 2) / (w01 + w12)
    assert r.value == pytest.approx(expected)
    assert (r.n_positive, r.sigma, r.n_edges) == (3, 2.0, 2)


def test_roughness_identical_states_are_at_distance_zero():
    """Repeated states (common in FrozenLake / MiniGrid buffers) are exactly 0 apart, so the median heuristic for
    sigma sees only the distances between different states."""
    a, b, c = [0.1, 0.7, 1e3 / 3], [0.3, -0.2, 1e3 / 7], [2.0, 0.0, 1.0]
    e = np.array([a, a, a, b, b, c])
    s = np.array([1.0, 0.5, 0.25, 0.8, 0.4, 0.6])
    d = {(0, 3): np.linalg.norm(np.subtract(a, b)), (0, 5): np.linalg.norm(np.subtract(a, c)),
         (3, 5): np.linalg.norm(np.subtract(b, c))}
    distinct = [d[0, 3]] * 6 + [d[0, 5]] * 3 + [d[3, 5]] * 2   # every pair of different states, with repeats
    assert A.roughness(s, e, n_neighbors=2).sigma == pytest.approx(float(np.median(distinct)), rel=1e-12)


def test_roughness_ignores_negative_records_and_scale():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(40, 3))
    s = rng.uniform(0.1, 1.0, size=40)
    base = A.roughness(s, e, n_neighbors=5).value
    assert A.roughness(7.0 * s, e, n_neighbors=5).value == pytest.approx(base)          # Ĩ = I / max I
    e2 = np.vstack([e, rng.normal(size=(10, 3))])
    s2 = np.concatenate([s, -rng.uniform(0.1, 1.0, size=10)])
    assert A.roughness(s2, e2, n_neighbors=5).value == pytest.approx(base)              # negatives are dropped


def test_roughness_low_for_clustered_influence_high_for_random():
    rng = np.random.default_rng(1)
    centres = np.repeat([[0.0, 0.0], [10.0, 10.0]], 30, axis=0)
    e = centres + 0.1 * rng.normal(size=centres.shape)
    s_smooth = np.repeat([1.0, 0.2], 30)              # constant within each cluster
    assert A.roughness(s_smooth, e, n_neighbors=10).value == pytest.approx(0.0, abs=1e-12)
    s_rough = rng.uniform(0.01, 1.0, size=60)
    assert A.roughness(s_rough, e, n_neighbors=10).value > 0.05
    assert A.roughness(np.full(5, 3.0), rng.normal(size=(5, 2))).value == 0.0            # constant influence
    assert math.isnan(A.roughness([1.0, -1.0], [[0.0], [1.0]]).value)                    # < 2 positive records


# --- confidence intervals --------------------------------------------------------------------------------------------

def test_t_ci_known_value():
    ci = A.t_ci([1.0, 2.0, 3.0], level=0.95)
    half = 4.302652729911275 * 1.0 / math.sqrt(3)      # t_{0.975, 2} · s / sqrt(n), s = 1
    assert (ci.mean, ci.lo, ci.hi, ci.n) == pytest.approx((2.0, 2 - half, 2 + half, 3))
    one = A.t_ci([5.0])
    assert one.mean == 5.0 and math.isnan(one.lo)


def test_paired_diff_ci():
    ci = A.paired_diff_ci([3.0, 4.0, 5.0], [2.0, 2.0, 2.0])   # differences 1, 2, 3
    assert ci.mean == pytest.approx(2.0)
    assert ci.lo == pytest.approx(2 - 4.302652729911275 / math.sqrt(3))


def test_bootstrap_ci_constant_and_close_to_t_for_normal_data():
    ci = A.bootstrap_ci(np.full(10, 2.5))
    assert (ci.mean, ci.lo, ci.hi) == (2.5, 2.5, 2.5)
    x = np.random.default_rng(3).normal(1.0, 2.0, size=400)
    b, t = A.bootstrap_ci(x, n_boot=4000), A.t_ci(x)
    assert b.lo == pytest.approx(t.lo, abs=0.05) and b.hi == pytest.approx(t.hi, abs=0.05)
    assert A.bootstrap_ci(x, n_boot=500, seed=7).lo == A.bootstrap_ci(x, n_boot=500, seed=7).lo  # deterministic
    med = A.bootstrap_ci([1.0, 2.0, 100.0], stat=np.median, n_boot=200)
    assert med.mean == 2.0 and med.lo >= 1.0 and med.hi <= 100.0


def test_quantiles():
    q = A.quantiles(np.arange(101.0), qs=(0.0, 0.5, 1.0))
    assert q == {"q0": 0.0, "q50": 50.0, "q100": 100.0}
