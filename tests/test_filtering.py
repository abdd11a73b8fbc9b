"""IIF's drop rule on hand-made scores, the random control and the bad inputs."""
import numpy as np
import pytest
import torch

from fastattr import filtering


def test_iif_drops_bottom_p_of_negatives():
    # 6 negatives, 4 positives; p = 0.5 -> idx int(6 * 0.5) = 3 -> thr = sorted[3] = -3 -> drop -6, -5, -4
    scores = torch.tensor([-6.0, 5.0, -1.0, -4.0, 2.0, -3.0, 0.5, -2.0, -5.0, 9.0])
    keep = filtering.iif_keep_mask(scores, 0.5)
    assert keep.tolist() == [False, True, True, False, True, True, True, True, False, True]


def test_iif_p_one_drops_every_negative_and_only_those():
    scores = torch.tensor([-0.1, 0.0, 3.0, -2.0, 1e-9])
    assert filtering.iif_keep_mask(scores, 1.0).tolist() == [False, True, True, False, True]
    assert filtering.keep_mask("iif-all-neg", scores, 0.25).tolist() == [False, True, True, False, True]


def test_iif_rounds_down_and_keeps_ties():
    scores = torch.tensor([-3.0, -1.0, 4.0])  # n_neg 2, p 0.4 -> int(0.8) = 0 -> nothing dropped
    assert filtering.iif_keep_mask(scores, 0.4).all()
    scores = torch.tensor([-2.0, -2.0, -1.0, 1.0])  # n_neg 3, p 0.5 -> idx 1 -> thr -2 -> "< -2" drops nothing
    assert filtering.iif_keep_mask(scores, 0.5).all()


def test_iif_no_negatives_and_all_negatives():
    assert filtering.iif_keep_mask(torch.tensor([0.0, 1.0, 2.0]), 1.0).all()
    # every record negative and p = 1: the rule keeps nothing (ppo.main then trains on all; see test_ppo)
    assert not filtering.iif_keep_mask(torch.tensor([-1.0, -2.0]), 1.0).any()
    assert filtering.iif_keep_mask(torch.tensor([-1.0, -2.0, -3.0, -4.0]), 0.5).tolist() == [True, True, False, False]


def test_random_drops_as_many_as_iif_reproducibly():
    scores = torch.randn(500, generator=torch.Generator().manual_seed(0))
    n_drop = int((~filtering.iif_keep_mask(scores, 0.5)).sum())
    a = filtering.keep_mask("random", scores, 0.5, np.random.default_rng(3))
    b = filtering.keep_mask("random", scores, 0.5, np.random.default_rng(3))
    c = filtering.keep_mask("random", scores, 0.5, np.random.default_rng(4))
    assert int((~a).sum()) == n_drop > 0
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, filtering.iif_keep_mask(scores, 0.5))


def test_ppo_keeps_everything():
    assert filtering.keep_mask("ppo", torch.tensor([-1.0, 2.0]), 0.5).all()


@pytest.mark.parametrize("p", [0, -0.5, 1.5, float("nan"), "0.5"])
def test_bad_p(p):
    with pytest.raises(ValueError, match=r"p \(--p"):
        filtering.iif_keep_mask(torch.tensor([-1.0, 1.0]), p)


def test_bad_scores_and_method():
    with pytest.raises(ValueError, match="non-finite"):
        filtering.iif_keep_mask(torch.tensor([-1.0, float("nan")]), 0.5)
    with pytest.raises(ValueError, match="1-D"):
        filtering.iif_keep_mask(torch.zeros(2, 2), 0.5)
    with pytest.raises(ValueError, match="--method"):
        filtering.keep_mask("iff", torch.zeros(2), 0.5)
    with pytest.raises(ValueError, match="Generator"):
        filtering.keep_mask("random", torch.zeros(2), 0.5)


def test_apply_mask():
    batch = {"obs": torch.arange(8.0).reshape(4, 2), "adv": torch.tensor([1.0, -1.0, 2.0, -2.0])}
    out = filtering.apply_mask(batch, torch.tensor([True, False, True, False]))
    assert out["obs"].tolist() == [[0.0, 1.0], [4.0, 5.0]] and out["adv"].tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="records"):
        filtering.apply_mask(batch, torch.tensor([True, False]))
