"""Bad input to fastattr.score gets a clear error naming the argument, never a silent wrong (or NaN) score."""
import pytest
import torch
from torch import nn

import fastattr
from fastattr import ScoringError


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


X = torch.randn(10, 4)


def rec(m):
    return m(X).pow(2).sum(1)


def tgt(m):
    return m(X[:2]).sum()


def test_record_loss_returning_a_scalar():
    with pytest.raises(ScoringError, match="record_loss must return a 1-D Tensor\\[N\\]"):
        fastattr.score(mlp(), lambda m: rec(m).mean(), tgt)


def test_record_loss_wrong_shape():
    with pytest.raises(ScoringError, match="record_loss must return a 1-D"):
        fastattr.score(mlp(), lambda m: m(X)[:, :, None], tgt)
    with pytest.raises(ScoringError, match="record_loss must return a Tensor"):
        fastattr.score(mlp(), lambda m: [1.0], tgt)


def test_fewer_losses_than_activation_rows_are_scored_by_the_general_path():
    """Five losses from ten rows: the fast path's row-per-record rule does not hold, the exact general path runs."""
    model = mlp().double()
    xd = X.double()

    def rec5(m):
        return m(xd).pow(2).sum(1)[:5]

    def tgt2(m):
        return m(xd[:2]).sum()

    got = fastattr.explain(model, rec5, tgt2)
    assert "leading dimension is not the N=5 records" in got.paths["0.weight"]
    exact = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(rec5(model)[i], model.parameters())])
                         for i in range(5)]) @ torch.cat([g.reshape(-1) for g in
                                                          torch.autograd.grad(tgt2(model), model.parameters())])
    assert torch.allclose(got.scores, exact, rtol=1e-10, atol=0)


def test_target_not_depending_on_selected_parameters():
    model = mlp()
    with pytest.raises(ScoringError, match="target_loss does not depend on any selected parameter"):
        fastattr.score(model, rec, lambda m: m[0](X).sum() * 0 + torch.tensor(1.0), params=["2"])
    with pytest.raises(ScoringError, match="target_loss does not depend"):
        fastattr.score(model, rec, lambda m: torch.tensor(3.0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_losses_raise(bad):
    with pytest.raises(ScoringError, match="record_loss returned 1 non-finite"):
        fastattr.score(mlp(), lambda m: rec(m) * torch.tensor([1.0] * 9 + [bad]), tgt)
    with pytest.raises(ScoringError, match="target_loss returned"):
        fastattr.score(mlp(), rec, lambda m: tgt(m) * bad)


def test_batchnorm_in_training_mode_is_rejected():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    with pytest.raises(ScoringError, match="'1' \\(BatchNorm1d\\) is in training mode"):
        fastattr.score(model, rec, tgt)
    model.eval()
    fastattr.score(model, rec, tgt)  # eval mode: records are independent again


def test_module_without_forward_mode_ad_names_the_module():
    class NoJvp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x * w

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            return g * w, (g * x).sum(0)

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return NoJvp.apply(x, self.scale)

    model = nn.Sequential(Custom(), nn.Linear(4, 3))
    with pytest.raises(ScoringError, match=r"module\(s\) \['0'\].*Exclude them with `params=`"):
        fastattr.score(model, rec, tgt)
    fastattr.score(model, rec, tgt, params=["1"])  # excluding it works


def test_mixed_devices():
    model = mlp()
    model[2].register_buffer("stat", torch.zeros(1, device="meta"))
    with pytest.raises(ScoringError, match="several devices"):
        fastattr.score(model, rec, tgt)


def test_bad_options():
    with pytest.raises(ScoringError, match="reduce must be one of"):
        fastattr.score(mlp(), rec, tgt, reduce="median")
    with pytest.raises(ScoringError, match="chunk_size must be a positive int"):
        fastattr.score(mlp(), rec, tgt, chunk_size=0)
    with pytest.raises(ScoringError, match="params: 'actor' matches no parameter"):
        fastattr.score(mlp(), rec, tgt, params=["actor"])
    with pytest.raises(ScoringError, match="model must be a torch.nn.Module"):
        fastattr.score(lambda x: x, rec, tgt)
    with pytest.raises(ScoringError, match="must return \\(record_losses, target\\)"):
        fastattr.score(mlp(), rec)
    with pytest.raises(ScoringError, match="target_loss must return a scalar or a 1-D"):
        fastattr.score(mlp(), rec, lambda m: m(X))


def test_requires_grad_is_restored_and_frozen_params_can_be_scored():
    model = mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    s = fastattr.score(model, rec, tgt, params=["0", "2"])
    assert s.shape == (10,) and torch.isfinite(s).all()
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())  # no .grad is ever formed


@pytest.mark.parametrize("kwargs,match", [({"scale_grad_by_freq": True}, "scale_grad_by_freq"),
                                          ({"max_norm": 1.0}, "max_norm")])
def test_embedding_options_that_mix_records_are_rejected(kwargs, match):
    model = nn.Sequential(nn.Embedding(5, 3, **kwargs), nn.Linear(3, 2))
    tokens = torch.randint(0, 5, (6,))
    with pytest.raises(ScoringError, match=f"Embedding '0' uses {match}"):
        fastattr.score(model, lambda m: m(tokens).sum(1), lambda m: m(tokens).sum())
    fastattr.score(model, lambda m: m(tokens).sum(1), lambda m: m(tokens).sum(), params=["1"])
