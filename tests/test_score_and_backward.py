"""fastattr.score_and_backward: a filtered step's scores and backward from the step's own passes.

Against brute force on every model of test_foreign_models (rows that mix, weights used through F.linear, batch
statistics, GPT-style broadcasts, tied heads, affine modules, transposed linears), in float64 and float32, and over
hypothesis' random architectures:
  * the scores are <grad l_i, grad sum_j l_j> (one autograd.grad per record);
  * each parameter's .grad afterwards is what (losses * keep).sum().backward() leaves, added to an existing .grad;
and the joint form of fastattr.score with the target losses.sum() or losses.mean() (which shares the records'
backward) is exact on the same models.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from test_foreign_models import CASES, TOL, rel_err
from test_scoring_property import build, cases

import fastattr
from fastattr.testing import brute_force_scores


def keep_above_median(scores):
    """Drops the lower half (ties broken by position: some losses have a constant sum, so every score is 0)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[torch.argsort(scores, stable=True)[: len(scores) // 2]] = False
    return keep


def close(scores, exact, tol, model, rec) -> bool:
    """Relative error below tol. The losses normalised by their mean sum to a constant: the target gradient is 0, the
    scores (and the brute force's) are rounding; so the error is relative to at least 0.1 of the records' |g_i|^2."""
    floor = 0.1 * float(brute_force_scores(model, rec, rec).diagonal().abs().max())
    return float((scores.double() - exact).abs().max()) < tol * max(float(exact.abs().max()), floor)


def kept_backward(model, rec, keep):
    for p in model.parameters():
        p.grad = None
    (rec(model) * keep.to(next(model.parameters()).dtype)).sum().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_scores_and_kept_gradient_against_brute_force(case, dtype):
    model, rec, _ = CASES[case](dtype)
    m64, rec64, _ = CASES[case](torch.float64)
    exact = brute_force_scores(m64, lambda m: (rec64(m), rec64(m).sum()))
    for p in model.parameters():
        p.grad = None
    scores, keep, losses = fastattr.score_and_backward(model, rec, keep_above_median)
    assert scores.shape == exact.shape
    assert close(scores, exact, TOL[dtype], m64, rec64), case
    assert keep.dtype == torch.bool and keep.equal(keep_above_median(scores)) and 0 < int(keep.sum()) < len(keep)
    assert torch.equal(losses, rec(model).detach())
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    want = kept_backward(m64, rec64, keep)
    assert got.keys() == want.keys(), case
    scale = max(float(g.abs().max()) for g in want.values())  # a bias before a batch norm has a zero gradient
    for k in want:
        assert float((got[k].double() - want[k]).abs().max()) < TOL[dtype] * 10 * scale, (case, k)


@pytest.mark.parametrize("case", ["td_two_calls", "gpt_tied_head", "affine_modules"])
def test_gradient_adds_to_an_existing_grad_and_keep_all_is_the_plain_backward(case):
    model, rec, _ = CASES[case](torch.float64)
    want = kept_backward(model, rec, torch.ones(12, dtype=torch.bool) if case != "gpt_tied_head" else
                         torch.ones(rec(model).shape[0], dtype=torch.bool))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    fastattr.score_and_backward(model, rec, lambda s: torch.ones_like(s, dtype=torch.bool))
    for k, p in model.named_parameters():
        assert rel_err(p.grad - 1, want[k]) < 1e-12, k


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_joint_target_that_is_the_sum_of_the_record_losses(case, reduction):
    model, rec, _ = CASES[case](torch.float64)

    def joint(m):
        losses = rec(m)
        return losses, getattr(losses, reduction)()

    assert close(fastattr.score(model, joint), brute_force_scores(model, joint), 1e-10, model, rec), case


def test_errors_name_the_argument():
    model, rec, _ = CASES["td_two_calls"](torch.float64)
    with pytest.raises(fastattr.ScoringError, match="keep"):
        fastattr.score_and_backward(model, rec, lambda s: (s > 0).float())
    with pytest.raises(fastattr.ScoringError, match="one loss per record"):
        fastattr.score_and_backward(model, lambda m: rec(m)[:, None].expand(-1, 3), keep_above_median)
    assert all(p.grad is None for p in model.parameters())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_property_exact_or_scoring_error(case):
    """Over hypothesis' random architectures (test_scoring_property): the scores against the summed losses and the
    kept records' gradient are exact, or ScoringError; never a wrong number, and .grad untouched on a refusal."""
    inputs, blocks, tied, loss, _, n, seed = case
    if loss == "per_position":
        loss = "plain"
    model, _, _, rec, _ = build(inputs, blocks, tied, loss, "scalar", n, seed)
    exact = brute_force_scores(model, lambda m: (rec(m), rec(m).sum()))
    keep = keep_above_median
    try:
        scores, kept, _ = fastattr.score_and_backward(model, rec, keep)
    except fastattr.ScoringError:
        assert all(p.grad is None for p in model.parameters())
        return
    assert close(scores, exact, 1e-8, model, rec), case
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    want = kept_backward(model, rec, kept)
    scale = max(float(g.abs().max()) for g in want.values())
    for k in want:
        assert float((got[k] - want[k]).abs().max()) <= 1e-10 * max(scale, 1e-300), (case, k)
