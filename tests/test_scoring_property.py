"""Property: for any small architecture, record loss and target, fastattr.score is exact (against one autograd.grad per
record, float64) or raises ScoringError. Hypothesis draws the architecture: Linear, Conv, Embedding, LayerNorm and
attention blocks, with and without row mixing (batch statistics in forward, losses normalised over the batch, a loss
taken from the next row) and functional weight use (F.linear on a layer's weight, a weight tied to two modules)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fastattr
from fastattr.testing import brute_force_scores

W = 6  # width of every block


class Block(nn.Module):
    """One [N, T, W] -> [N, T, W] block of a given kind."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        if kind in ("linear", "functional", "batchstat"):
            self.lin = nn.Linear(W, W)
        elif kind == "layernorm":
            self.norm = nn.LayerNorm(W)
        elif kind == "attention":
            self.attn = nn.MultiheadAttention(W, 2, batch_first=True)
        elif kind == "conv":
            self.conv = nn.Conv1d(W, W, 3, padding=1)

    def forward(self, h):
        if self.kind == "linear":
            return torch.tanh(self.lin(h))
        if self.kind == "functional":  # the weight used outside the module, the module also called
            return torch.tanh(self.lin(h) + F.linear(h, self.lin.weight))
        if self.kind == "batchstat":  # statistics of the whole batch inside forward: rows mix
            z = self.lin(h)
            return torch.tanh((z - z.mean((0, 1))) / (z.std((0, 1)) + 0.5))
        if self.kind == "layernorm":
            return self.norm(h)
        if self.kind == "attention":
            return h + self.attn(h, h, h, need_weights=False)[0]
        return torch.tanh(self.conv(h.transpose(1, 2)).transpose(1, 2))  # conv over positions


class Net(nn.Module):
    def __init__(self, inputs: str, blocks: list[str], tied: bool):
        super().__init__()
        self.inputs = inputs
        self.emb = nn.Embedding(7, W) if inputs == "tokens" else nn.Linear(3, W)
        self.pos = nn.Embedding(4, W)  # a GPT-2-style position table, called on ids of shape [1, T]
        self.blocks = nn.ModuleList(Block(k) for k in blocks)
        self.head = nn.Linear(W, 7 if tied else 3)
        if tied and inputs == "tokens":
            self.head.weight = self.emb.weight

    def forward(self, x):
        h = self.emb(x) + self.pos(torch.arange(x.shape[1])[None])
        for block in self.blocks:
            h = block(h)
        return self.head(h)  # [N, T, C]


@st.composite
def cases(draw):
    inputs = draw(st.sampled_from(["tokens", "vectors"]))
    blocks = draw(st.lists(st.sampled_from(["linear", "functional", "batchstat", "layernorm", "attention", "conv"]),
                           min_size=0, max_size=3))
    tied = draw(st.booleans())
    loss = draw(st.sampled_from(["plain", "normalised", "next_row", "per_position"]))
    target = draw(st.sampled_from(["scalar", "m_targets", "joint"]))
    n = draw(st.integers(2, 5))
    seed = draw(st.integers(0, 2**16))
    return inputs, blocks, tied, loss, target, n, seed


def build(inputs, blocks, tied, loss, target, n, seed):
    torch.manual_seed(seed)
    model = Net(inputs, blocks, tied).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed)
    if inputs == "tokens":
        x, xt = torch.randint(0, 7, (n, 4), generator=g), torch.randint(0, 7, (3, 4), generator=g)
    else:
        x, xt = torch.randn(n, 4, 3, generator=g, dtype=torch.float64), torch.randn(3, 4, 3, generator=g,
                                                                                    dtype=torch.float64)

    def per_position(m, inp):
        return m(inp).pow(2).mean(-1)  # [N, T]

    def rec(m):
        pos = per_position(m, x)
        if loss == "per_position":
            return pos
        raw = pos.sum(1)
        if loss == "normalised":
            return raw / raw.sum()
        if loss == "next_row":
            return raw + 0.5 * torch.roll(raw, -1)
        return raw

    def tgt(m):
        t = per_position(m, xt).sum(1)
        return t if target == "m_targets" else t.mean()

    if target == "joint":
        return model, lambda m: (rec(m), tgt(m)), None, rec, tgt
    return model, rec, tgt, rec, tgt


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_exact_or_scoring_error(case):
    model, record_loss, target_loss, rec, tgt = build(*case)
    exact = brute_force_scores(model, rec, tgt)
    try:
        got = fastattr.score(model, record_loss, target_loss)
    except fastattr.ScoringError:
        return  # a refusal is allowed; a wrong number is not
    assert got.shape == exact.shape
    err = ((got - exact).abs().max() / exact.abs().max().clamp_min(1e-300)).item()
    assert err < 1e-8, (case, err)


@pytest.mark.parametrize("blocks", [["linear", "batchstat"], ["functional", "attention"], ["conv", "layernorm"]])
def test_a_few_fixed_architectures_are_scored_not_refused(blocks):
    """The property allows refusals; these cases must not need one (every op here has forward-mode AD)."""
    for loss in ("plain", "normalised", "next_row", "per_position"):
        model, record_loss, target_loss, rec, tgt = build("tokens", blocks, True, loss, "scalar", 4, 3)
        got = fastattr.score(model, record_loss, target_loss)
        exact = brute_force_scores(model, rec, tgt)
        assert ((got - exact).abs().max() / exact.abs().max()).item() < 1e-8, loss


def locality_verdicts(model, record_loss, target_loss):
    """(what the graph proves, what the numeric check finds) about the losses mixing rows of the scored layers."""
    from fastattr import scoring

    plan = scoring._plan(model, None)
    job = scoring._Job(model, plan, record_loss, target_loss, reduce="none", units=None, chunk=4096,
                       dtype=torch.float64, check_locality=True, process_group=None)
    with torch.enable_grad(), scoring._RequireGrad(plan.params.values()):
        job.capture()
        job.route()
        calls = [c for layer in plan.layers for c in layer.calls if c.y.requires_grad]
        if not calls or job.losses.shape[0] < 2:
            return None, None
        grads = torch.autograd.grad(job.losses.sum(), [c.y for c in calls], allow_unused=True, retain_graph=True)
        grad_of = {id(c): g for c, g in zip(calls, grads)}
        pairs = [(layer, c, grad_of[id(c)]) for layer in plan.layers for c in layer.calls
                 if c.y.requires_grad and grad_of[id(c)] is not None]
        proven = scoring._rows_local_by_structure(job.losses, [c for _, c, _ in pairs])
        weights = scoring._record_weights(job.losses.shape[0], None, job.losses.dtype, job.losses.device)
        local = not scoring._mixing(job.losses, pairs, weights)
    return proven, local


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_the_graph_never_proves_locality_that_the_numeric_check_refutes(case):
    """The structural proof saves the numeric check's backward: it may say 'not proven' often, 'local' only when
    the numeric check agrees."""
    model, record_loss, target_loss, _, _ = build(*case)
    try:
        proven, local = locality_verdicts(model, record_loss, target_loss)
    except fastattr.ScoringError:
        return
    if proven:
        assert local, case


def test_the_graph_proves_the_usual_rl_losses_local():
    """PPO surrogates of MLP, CNN (conv + flatten) and Gaussian policies: proven, so no extra backward runs."""
    import gymnasium as gym

    from fastattr.rl.agent import Agent

    for obs_space, act_space, x in [
        (gym.spaces.Box(-1, 1, (8,)), gym.spaces.Discrete(4), torch.randn(32, 8)),
        (gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-1, 1, (2,)), torch.randn(32, 3)),
        (gym.spaces.Box(0, 255, (7, 7, 3), dtype=np.uint8), gym.spaces.Discrete(3),
         torch.randint(0, 255, (32, 7, 7, 3)).to(torch.uint8)),
    ]:
        agent = Agent(obs_space, act_space)
        a = torch.as_tensor(np.stack([act_space.sample() for _ in range(32)]))
        adv = torch.randn(32)

        def rec(m):
            return -adv * m.log_prob(x, a)

        proven, local = locality_verdicts(agent, rec, lambda m: rec(m).mean())
        assert proven and local, (obs_space, act_space)
    ex = fastattr.explain(agent, rec, lambda m: rec(m).mean())
    assert all(v in ("linear", "conv") for v in ex.paths.values() if not v.startswith("general: not a"))


class FlatNet(nn.Module):
    """[N, W] activations through blocks that keep rows apart or mix them in the ways a graph could hide."""

    def __init__(self, blocks: list[str]):
        super().__init__()
        self.blocks = blocks
        self.lins = nn.ModuleList(nn.Linear(W, W) for _ in blocks)
        self.norm = nn.LayerNorm(W)

    def forward(self, h):
        for kind, lin in zip(self.blocks, self.lins):
            h = lin(h)
            if kind == "tanh":
                h = torch.tanh(h)
            elif kind == "layernorm":
                h = self.norm(h)
            elif kind == "rowmean":  # every row gets the batch mean
                h = h + h.mean(0, keepdim=True)
            elif kind == "cat_shift":  # row i takes row i + 1
                h = torch.cat([h[1:], h[:1]])
            elif kind == "flip":
                h = torch.flip(h, [0])
            elif kind == "softmax0":  # normalised over the records
                h = torch.softmax(h, 0)
            elif kind == "reshape":  # a view with more rows per record, and back: rows stay with their record
                h = torch.tanh(h.reshape(h.shape[0] * 2, W // 2)).reshape(h.shape[0], W)
            elif kind == "expand_first":  # every row gets row 0
                h = h + h[:1].expand_as(h)
        return h


@st.composite
def flat_cases(draw):
    blocks = draw(st.lists(st.sampled_from(["tanh", "layernorm", "rowmean", "cat_shift", "flip", "softmax0",
                                            "reshape", "expand_first"]), min_size=1, max_size=3))
    loss = draw(st.sampled_from(["plain", "normalised", "square"]))
    return blocks, loss, draw(st.integers(2, 5)), draw(st.integers(0, 2**16))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flat_cases())
def test_graph_proofs_on_flat_models_with_hidden_mixing(case):
    """Locality proven only where the numeric check agrees, and the scores exact either way."""
    blocks, loss, n, seed = case
    torch.manual_seed(seed)
    model = FlatNet(blocks).double()
    x, xt = torch.randn(n, W, dtype=torch.float64), torch.randn(3, W, dtype=torch.float64)

    def rec(m):
        raw = m(x).pow(2).sum(1) if loss != "square" else m(x).sum(1) ** 2
        return raw / raw.sum() if loss == "normalised" else raw

    def tgt(m):
        return m(xt).sum()

    proven, local = locality_verdicts(model, rec, tgt)
    if proven:
        assert local, case
    got, exact = fastattr.score(model, rec, tgt), brute_force_scores(model, rec, tgt)
    assert ((got - exact).abs().max() / exact.abs().max().clamp_min(1e-300)).item() < 1e-8, case
