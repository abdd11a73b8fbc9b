"""Pure statistics behind the applications (diagnosis, behaviour formation, intervention, validation).

Everything here takes and returns numpy arrays / floats, has no torch, env or plotting imports, and is tested on
constructed cases whose answer is known (tests/test_analysis.py).

    discounted_returns(rewards, ends, gamma)          Monte Carlo reward-to-go G_t within each episode
    mc_advantage_buffer(states, actions, returns)     Ā(s,a) = mean G over (s,a) - mean G over s, in the buffer
    mc_advantage(returns, values, states, actions)    the buffer average for discrete states, else G_t - V(s_t)
    is_discrete_states(obs)                           integer ids or one-hot rows
    sign_mismatch(a_mc, a_gae), advantage_gap(...)    sign(Ā) != sign(Â), |Ā - Â|
    spearman(x, y)                                    rank correlation (nan, not a warning, on constant input)
    roughness(scores, embeddings, n_neighbors)        the paper's smoothness-of-influence metric (§4.2)
    top_bottom(scores, k)                             indices of the k most positive / most negative records
    t_ci, bootstrap_ci, paired_diff_ci                confidence intervals over seeds
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.spatial.distance import pdist, squareform

# ---------------------------------------------------------------------------------------------------------------------
# Monte Carlo returns and advantages


def discounted_returns(rewards, ends, gamma: float, bootstrap=None) -> np.ndarray:
    """Reward-to-go G_t = r_t + gamma * G_{t+1} * (1 - end_t), per column.

    rewards, ends: [T] or [T, E] (E parallel envs, time-major). ends[t] is True when the episode ended at transition t
    (terminated or truncated), so nothing after t flows back into G_t. bootstrap: None (= 0), or [E] / scalar values
    used for the tail of an episode still running at the end of the buffer.
    """
    r = np.asarray(rewards, dtype=np.float64)
    e = np.asarray(ends, dtype=bool)
    if r.shape != e.shape:
        raise ValueError(f"discounted_returns: rewards {r.shape} and ends {e.shape} must have the same shape")
    squeeze = r.ndim == 1
    r, e = (r[:, None], e[:, None]) if squeeze else (r, e)
    g = np.zeros(r.shape[1]) if bootstrap is None else np.broadcast_to(np.asarray(bootstrap, float), r.shape[1]).copy()
    out = np.empty_like(r)
    for t in range(r.shape[0] - 1, -1, -1):
        g = r[t] + gamma * g * (~e[t])
        out[t] = g
    return out[:, 0] if squeeze else out


def is_discrete_states(obs) -> bool:
    """True when observations identify a state exactly and compactly: integer ids ([N] or [N, 1] of integers), or
    one-hot rows ([N, S] of 0/1 with one 1 per row). Then the paper's buffer-average Monte Carlo advantage applies."""
    o = np.asarray(obs)
    if o.ndim == 1 or (o.ndim == 2 and o.shape[1] == 1):
        return bool(np.issubdtype(o.dtype, np.integer) or np.all(o == np.round(o)))
    if o.ndim == 2:
        return bool(np.all((o == 0) | (o == 1)) and np.all(o.sum(axis=1) == 1))
    return False


def state_ids(obs) -> np.ndarray:
    """[N] integer id per distinct observation row (ids are dense, in order of first sorted appearance)."""
    o = np.asarray(obs)
    o = o.reshape(len(o), -1)
    _, inverse = np.unique(o, axis=0, return_inverse=True)
    return inverse.reshape(-1)


def mc_advantage_buffer(states, actions, returns) -> np.ndarray:
    """The paper's Monte Carlo advantage for discrete states (§4.1, FrozenLake): over the buffer,

        Ā(s, a) = mean{G_t : s_t = s, a_t = a} - mean{G_t : s_t = s}.

    states: [N] ids or [N, ...] observation rows (rows that are equal are the same state); actions: [N] (or [N, d],
    compared row-wise); returns: [N] Monte Carlo returns G_t. Returns Ā evaluated at every record's own (s_t, a_t).
    """
    g = np.asarray(returns, dtype=np.float64).reshape(-1)
    s = state_ids(states)
    a = state_ids(actions)
    if not (len(s) == len(a) == len(g)):
        raise ValueError(f"mc_advantage_buffer: states {len(s)}, actions {len(a)}, returns {len(g)} records differ")
    sa = s * (a.max(initial=0) + 1) + a
    mean_s = _group_mean(s, g)
    mean_sa = _group_mean(sa, g)
    return mean_sa - mean_s


def _group_mean(groups: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per record, the mean of `values` over all records sharing its group."""
    _, inv = np.unique(groups, return_inverse=True)
    sums = np.bincount(inv, weights=values)
    counts = np.bincount(inv)
    return (sums / counts)[inv]


def mc_advantage(returns, values=None, states=None, actions=None, method: str = "auto") -> np.ndarray:
    """Monte Carlo advantage per record.

    method: "buffer" = mc_advantage_buffer (discrete states, the paper's FrozenLake analysis);
            "baseline" = G_t - V(s_t) with the buffer's own value estimates;
            "auto" = "buffer" when `states` are discrete (is_discrete_states) and actions are given, else "baseline".
    """
    if method == "auto":
        method = "buffer" if states is not None and actions is not None and is_discrete_states(states) else "baseline"
    g = np.asarray(returns, dtype=np.float64).reshape(-1)
    if method == "buffer":
        if states is None or actions is None:
            raise ValueError("mc_advantage(method='buffer') needs states and actions")
        return mc_advantage_buffer(states, actions, g)
    if method == "baseline":
        if values is None:
            raise ValueError("mc_advantage(method='baseline') needs the buffer's values V(s_t); pass values=...")
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if v.shape != g.shape:
            raise ValueError(f"mc_advantage: returns {g.shape} and values {v.shape} differ")
        return g - v
    raise ValueError(f"mc_advantage: method must be 'auto', 'buffer' or 'baseline', got {method!r}")


def sign_mismatch(a_mc, a_gae) -> np.ndarray:
    """[N] bool: sign(Ā) != sign(Â) (zero counts as its own sign, so 0 vs +0.3 is a mismatch)."""
    return np.sign(np.asarray(a_mc, dtype=np.float64)) != np.sign(np.asarray(a_gae, dtype=np.float64))


def advantage_gap(a_mc, a_gae) -> np.ndarray:
    """[N] |Ā - Â|."""
    return np.abs(np.asarray(a_mc, dtype=np.float64) - np.asarray(a_gae, dtype=np.float64))


# ---------------------------------------------------------------------------------------------------------------------
# Rank correlation and selection


def spearman(x, y) -> tuple[float, float]:
    """Spearman rank correlation (rho, two-sided p-value), ties averaged. Returns (nan, nan) when either input is
    constant or has fewer than 3 finite pairs, instead of scipy's warning. Non-finite pairs are dropped."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"spearman: x {x.shape} and y {y.shape} differ")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    res = stats.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


def top_bottom(scores, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(top, bottom): indices of the k highest scores (descending) and the k lowest (ascending).

    Ties are broken by record index (stable), so the result is deterministic. k is clipped to N."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if k < 0:
        raise ValueError(f"top_bottom: k must be >= 0, got {k}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"top_bottom: {int((~np.isfinite(s)).sum())} scores are not finite")
    k = min(k, len(s))
    order = np.argsort(s, kind="stable")
    bottom = order[:k]
    top = np.argsort(-s, kind="stable")[:k]
    return top, bottom


# ---------------------------------------------------------------------------------------------------------------------
# Roughness of influence over an embedding space (paper §4.2)


@dataclass
class Roughness:
    value: float          # Σ_{i<j} w_ij (Ĩ_i - Ĩ_j)² / Σ_{i<j} w_ij over the kNN graph; nan with < 2 positive records
    n_positive: int       # records with I > 0 (the only ones used)
    sigma: float          # kernel width used
    n_edges: int          # undirected edges in the kNN graph


def roughness(scores, embeddings, n_neighbors: int = 20, sigma: float | None = None) -> Roughness:
    """The paper's roughness of influence over a state(-action) embedding (§4.2, Fig. 4/10):

        R = Σ_{i<j} w_ij (Ĩ_i - Ĩ_j)² / Σ_{i<j} w_ij,    Ĩ = I / ||I||_∞,

    over the positive-influence records only. w_ij = exp(-||e_i - e_j||² / (2σ²)) on the edges of the symmetrised
    u-nearest-neighbour graph (edge i–j when j is among i's u nearest or i among j's), zero elsewhere. σ defaults to
    the median-distance heuristic: the median of the pairwise distances between the positive records' embeddings
    (non-zero ones; 1.0 if all embeddings coincide). Low R: similar states carry similar influence (semantic
    clustering); high R: influence varies from neighbour to neighbour.

    scores: [N]; embeddings: [N, D] (e.g. a trained network's penultimate features); n_neighbors: u (clipped to P-1).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    e = np.asarray(embeddings, dtype=np.float64)
    e = e.reshape(len(e), -1)
    if len(e) != len(s):
        raise ValueError(f"roughness: scores has {len(s)} records but embeddings has {len(e)}")
    if n_neighbors < 1:
        raise ValueError(f"roughness: n_neighbors must be >= 1, got {n_neighbors}")
    pos = s > 0
    p = int(pos.sum())
    if p < 2:
        return Roughness(float("nan"), p, float("nan"), 0)
    i_tilde = s[pos] / s[pos].max()
    x = e[pos]
    dist = squareform(pdist(x))  # exact zeros for identical states (the Gram expansion leaves ~1e-7 there)
    if sigma is None:
        iu = np.triu_indices(p, 1)
        d = dist[iu]
        d = d[d > 0]
        sigma = float(np.median(d)) if len(d) else 1.0
    if not sigma > 0:
        raise ValueError(f"roughness: sigma must be > 0, got {sigma}")
    u = min(n_neighbors, p - 1)
    masked = dist + np.diag(np.full(p, np.inf))        # a record is not its own neighbour
    nn = np.argsort(masked, axis=1, kind="stable")[:, :u]
    adj = np.zeros((p, p), dtype=bool)
    adj[np.repeat(np.arange(p), u), nn.reshape(-1)] = True
    adj |= adj.T
    iu, ju = np.nonzero(np.triu(adj, 1))
    w = np.exp(-dist[iu, ju] ** 2 / (2.0 * sigma * sigma))
    wsum = w.sum()
    value = float((w * (i_tilde[iu] - i_tilde[ju]) ** 2).sum() / wsum) if wsum > 0 else float("nan")
    return Roughness(value, p, float(sigma), int(len(iu)))


# ---------------------------------------------------------------------------------------------------------------------
# Confidence intervals


@dataclass
class CI:
    mean: float
    lo: float
    hi: float
    n: int
    level: float

    def __str__(self) -> str:
        return f"{self.mean:+.4g} [{self.lo:+.4g}, {self.hi:+.4g}] ({self.level:.0%} CI, n={self.n})"

    def as_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n, "level": self.level}


def t_ci(x, level: float = 0.95) -> CI:
    """Student-t interval for the mean: mean ± t_{(1+level)/2, n-1} · s / sqrt(n) (s: sample std, ddof=1).
    With n = 1 the bounds are nan (no spread to estimate)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if len(x) == 0:
        raise ValueError("t_ci: no values")
    m = float(x.mean())
    if len(x) < 2:
        return CI(m, float("nan"), float("nan"), 1, level)
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return CI(m, m - half, m + half, len(x), level)


def bootstrap_ci(x, stat=np.mean, level: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> CI:
    """Percentile bootstrap interval of stat(x) (resampling x with replacement n_boot times, fixed seed).
    `mean` in the result is stat(x) on the data itself."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if len(x) == 0:
        raise ValueError("bootstrap_ci: no values")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    boots = np.apply_along_axis(stat, 1, x[idx]) if stat is not np.mean else x[idx].mean(axis=1)
    lo, hi = np.quantile(boots, [0.5 - level / 2, 0.5 + level / 2])
    return CI(float(stat(x)), float(lo), float(hi), len(x), level)


def paired_diff_ci(a, b, level: float = 0.95) -> CI:
    """t interval for mean(a - b) over paired values (e.g. filtered vs unfiltered return, same seed)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired_diff_ci: a {a.shape} and b {b.shape} must pair up")
    return t_ci(a - b, level)


def quantiles(x, qs=(0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)) -> dict[str, float]:
    """{"q0": min, "q5": ..., "q100": max} of the finite values of x (nan when there are none)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    x = x[np.isfinite(x)]
    return {f"q{round(q * 100):g}": (float(np.quantile(x, q)) if len(x) else float("nan")) for q in qs}
