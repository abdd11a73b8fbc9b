"""Models and losses written the way other code writes them: fastattr.score is exact (against one autograd.grad per
record, in float64 and float32) or raises ScoringError, at default settings.

Each case was once silently wrong or refused: a TD loss bootstrapping from the next row, losses normalised over the
batch, a weight used through F.linear, batch statistics inside forward, a GPT-2-style position embedding called on
ids of shape [1, T], a critic called on cat([obs, next_obs]).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastattr
from fastattr.testing import brute_force_scores

N, D = 12, 5
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


def data(dtype, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)  # drawn in float64 and cast: the same values in every dtype
    return {"obs": torch.randn(n, D, generator=g, dtype=torch.float64).to(dtype),
            "next_obs": torch.randn(n, D, generator=g, dtype=torch.float64).to(dtype),
            "r": torch.randn(n, generator=g, dtype=torch.float64).to(dtype),
            "done": (torch.rand(n, generator=g) < 0.2).to(dtype), "act": torch.randint(0, 3, (n,), generator=g),
            "adv": torch.randn(n, generator=g, dtype=torch.float64).to(dtype),
            "probe": torch.randn(4, D, generator=g, dtype=torch.float64).to(dtype)}


def mlp(out=1, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, out))


# ---- the cases: (model, record_loss, target_loss) built in a given dtype ---------------------------------------------
def td_next_row(dtype):
    """TD(0) value loss whose bootstrap V(s') is the next row's value and is not detached: loss i depends on row i+1."""
    m, d = mlp().to(dtype), data(dtype)

    def rec(model):
        v = model(d["obs"]).squeeze(-1)
        v_next = torch.cat([v[1:], v[-1:]])
        return (d["r"] + 0.9 * (1 - d["done"]) * v_next - v) ** 2

    return m, rec, lambda model: model(d["probe"]).mean()


def td_two_calls(dtype):
    """The same loss with V(s') from a second call on next_obs: rows do not mix (fast path, exact)."""
    m, d = mlp().to(dtype), data(dtype)

    def rec(model):
        return (d["r"] + 0.9 * model(d["next_obs"]).squeeze(-1) - model(d["obs"]).squeeze(-1)) ** 2

    return m, rec, lambda model: model(d["probe"]).mean()


def td_concatenated(dtype):
    """V(s) and V(s') from one call on cat([obs, next_obs]): a leading dimension of 2N."""
    m, d = mlp().to(dtype), data(dtype)

    def rec(model):
        v = model(torch.cat([d["obs"], d["next_obs"]])).squeeze(-1)
        return (d["r"] + 0.9 * v[N:] - v[:N]) ** 2

    return m, rec, lambda model: model(d["probe"]).mean()


def normalised_by_sum(dtype):
    m, d = mlp(3).to(dtype), data(dtype)

    def rec(model):
        raw = -d["adv"] * torch.log_softmax(model(d["obs"]), -1).gather(1, d["act"][:, None]).squeeze(1)
        return raw / raw.abs().sum()

    return m, rec, lambda model: torch.log_softmax(model(d["probe"]), -1)[:, 0].sum()


def normalised_by_mean(dtype):
    m, d = mlp(3).to(dtype), data(dtype)

    def rec(model):
        raw = (model(d["obs"]) ** 2).sum(1)
        return raw / raw.mean()

    return m, rec, lambda model: model(d["probe"]).sum()


def functional_weight(dtype):
    """CleanRL-style code that reuses a layer's weight functionally."""
    m, d = mlp(3).to(dtype), data(dtype)

    def logits(model, x):
        h = torch.tanh(model[2](torch.tanh(model[0](x))))
        return F.linear(h, model[4].weight, model[4].bias)  # the head through F.linear, never called

    def rec(model):
        return -d["adv"] * torch.log_softmax(logits(model, d["obs"]), -1).gather(1, d["act"][:, None]).squeeze(1)

    return m, rec, lambda model: torch.log_softmax(logits(model, d["probe"]), -1)[:, 1].mean()


class BatchStatNet(nn.Module):
    """Normalises its hidden layer with statistics of the batch inside forward."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(D, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.l1(x)
        h = (h - h.mean(0)) / (h.std(0) + 1e-3)
        return self.l2(torch.tanh(h))


def batch_statistics(dtype):
    torch.manual_seed(0)
    m, d = BatchStatNet().to(dtype), data(dtype)
    return m, lambda model: model(d["obs"]).pow(2).sum(1), lambda model: model(d["probe"]).sum()


class TinyGPT(nn.Module):
    """GPT-2's shape: token + position embeddings (positions on ids of shape [1, T], broadcast over the batch),
    pre-LayerNorm causal attention and MLP, an LM head."""

    def __init__(self, vocab=11, width=8, tied=False):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(6, width)
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.wte.weight

    def forward(self, ids):
        t = ids.shape[1]
        pos = torch.arange(t, device=ids.device)[None]  # [1, T]
        h = self.wte(ids) + self.wpe(pos)
        q, k, v = self.qkv(self.ln1(h)).chunk(3, -1)
        att = (q @ k.transpose(1, 2)) / q.shape[-1] ** 0.5
        att = att.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf")).softmax(-1)
        h = h + self.proj(att @ v)
        h = h + self.out(F.gelu(self.fc(self.ln2(h))))
        return self.head(h)


def gpt_tokens(n=6, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 11, (n, t), generator=g), torch.randint(0, 11, (3, t), generator=g)


def token_nll(model, ids):
    """[N, T-1] next-token losses."""
    logits = model(ids)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none") \
        .reshape(ids.shape[0], -1)


def gpt_sequences(dtype, tied=False):
    torch.manual_seed(1)
    m, (ids, ids_t) = TinyGPT(tied=tied), gpt_tokens()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    m = m.to(dtype)
    return m, lambda model: token_nll(model, ids).sum(1), lambda model: token_nll(model, ids_t).mean()


class SquaredScale(nn.Module):
    """A norm-like module that is not affine in its weight (y = w^2 x): must leave the affine fast path."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 16))

    def forward(self, x):
        return self.weight ** 2 * x


def affine_modules(dtype):
    """PReLU (affine with a nonzero part at zero weight), GroupNorm, a BatchNorm in eval mode, and a squared scale."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(D, 16), nn.PReLU(16), nn.GroupNorm(4, 16), SquaredScale(), nn.BatchNorm1d(16),
                      nn.Tanh(), nn.Linear(16, 1)).eval()
    with torch.no_grad():  # drawn in float32 before the cast: the same model in every dtype
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
        m[4].running_mean.normal_(), m[4].running_var.uniform_(0.5, 2)
    m = m.to(dtype)
    d = data(dtype)
    return m, lambda model: model(d["obs"]).squeeze(-1) ** 2, lambda model: model(d["probe"]).sum()


class TransposedLinear(nn.Module):
    """A user's own GPT-style layer, y = x @ W + b with W stored [d_in, d_out]: not a class fastattr knows, so it takes
    the affine path, whose check must allow for the rounding of a wide float32 matmul."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(0.02 * torch.randn(d_in, d_out))  # GPT-2's initialisation
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)


def wide_transposed_linear(dtype):
    """Width 512 in float32: the affinity check's step along a random direction is far larger than the output."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(D, 512), nn.Tanh(), TransposedLinear(512, 512), nn.Tanh(), nn.Linear(512, 1)).to(dtype)
    d = data(dtype)
    return m, lambda model: model(d["obs"]).squeeze(-1) ** 2, lambda model: model(d["probe"]).sum()


CASES = {"td_next_row": td_next_row, "td_two_calls": td_two_calls, "td_concatenated": td_concatenated,
         "normalised_by_sum": normalised_by_sum, "normalised_by_mean": normalised_by_mean,
         "functional_weight": functional_weight, "batch_statistics": batch_statistics,
         "gpt_sequences": gpt_sequences, "gpt_tied_head": lambda dtype: gpt_sequences(dtype, tied=True),
         "affine_modules": affine_modules, "wide_transposed_linear": wide_transposed_linear}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_exact_against_brute_force(case, dtype):
    model, rec, tgt = CASES[case](dtype)
    m64, rec64, tgt64 = CASES[case](torch.float64)
    exact = brute_force_scores(m64, rec64, tgt64)
    got = fastattr.score(model, rec, tgt)
    assert got.shape == exact.shape
    assert rel_err(got, exact) < TOL[dtype], case


@pytest.mark.parametrize("case", list(CASES))
def test_joint_form_and_m_targets(case):
    """The same losses with records and a target from one forward, and against M targets (one per probe)."""
    model, rec, tgt = CASES[case](torch.float64)
    exact = brute_force_scores(model, rec, tgt)
    assert rel_err(fastattr.score(model, lambda m: (rec(m), tgt(m))), exact) < 1e-10

    def targets(m):  # M = 3 targets
        return torch.stack([tgt(m), 2 * tgt(m) ** 2, -tgt(m)])

    exact_m = brute_force_scores(model, rec, targets)
    assert rel_err(fastattr.score(model, rec, targets), exact_m) < 1e-10


def test_the_paths_taken_are_the_ones_expected():
    """The fast path stays where it is exact; only the layers that break its assumptions leave it."""
    paths = fastattr.explain(*td_two_calls(torch.float64)).paths
    assert all(not v.startswith("general") for v in paths.values())
    paths = fastattr.explain(*td_next_row(torch.float64)).paths
    assert all("mixes records" in v for v in paths.values())
    paths = fastattr.explain(*batch_statistics(torch.float64)).paths
    assert "mixes records" in paths["l1.weight"] and paths["l2.weight"] == "linear"  # after the statistics: local
    paths = fastattr.explain(*gpt_sequences(torch.float64)).paths
    assert paths["wpe.weight"] == "embedding" and paths["qkv.weight"] == "linear"  # the broadcast call is expanded
    assert paths["ln1.weight"] == "affine"
    paths = fastattr.explain(*affine_modules(torch.float64)).paths
    assert paths["1.weight"] == paths["2.weight"] == paths["4.weight"] == "affine"  # PReLU, GroupNorm, BatchNorm
    assert paths["3.weight"].startswith("general: is not affine")
    paths = fastattr.explain(*wide_transposed_linear(torch.float32)).paths
    assert paths["2.weight"] == paths["2.bias"] == "affine"
    paths = fastattr.explain(*td_concatenated(torch.float64)).paths
    assert "leading dimension is not the N=12 records" in paths["0.weight"]


def test_locality_check_off_is_fast_and_then_wrong_on_mixing_losses():
    """check_locality=False trusts the fast path: right on per-row losses, wrong (as documented) on mixing ones."""
    model, rec, tgt = td_two_calls(torch.float64)
    assert rel_err(fastattr.score(model, rec, tgt, check_locality=False), brute_force_scores(model, rec, tgt)) < 1e-10
    model, rec, tgt = normalised_by_sum(torch.float64)
    assert rel_err(fastattr.score(model, rec, tgt, check_locality=False), brute_force_scores(model, rec, tgt)) > 1e-3


def test_broadcast_call_whose_result_depends_on_its_batch_of_one():
    """Code that reads the broadcast dimension (here: divides by it) changes when expanded: first forward kept, the
    layer goes to the general path, the scores stay exact."""
    torch.manual_seed(0)
    emb, lin = nn.Embedding(5, 4).double(), nn.Linear(4, 1).double()
    model = nn.ModuleDict({"emb": emb, "lin": lin})
    ids = torch.randint(0, 5, (6, 3))

    def rec(m):
        pos = m["emb"](torch.arange(3)[None])
        pos = pos / pos.shape[0]
        return m["lin"](m["emb"](ids) + pos).pow(2).sum((1, 2))

    def tgt(m):
        return m["lin"](m["emb"](ids[:2])).sum()

    got = fastattr.explain(model, rec, tgt)
    assert "expanding it to the records changes the losses" in got.paths["emb.weight"]
    assert rel_err(got.scores, brute_force_scores(model, rec, tgt)) < 1e-10


def test_refusal_leaves_the_model_as_it_was():
    """A case with no exact path (rows mix, and a module without forward-mode AD) raises ScoringError naming why;
    hooks, requires_grad, training flags, threads, grad mode and the attention fast path are restored."""
    class NoJvp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.tanh()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (1 - x.tanh() ** 2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(D, 4), nn.Linear(4, 1)

        def forward(self, x):
            return self.l2(NoJvp.apply(self.l1(x)))

    torch.manual_seed(0)
    model = Net().double().train()
    model.l2.weight.requires_grad_(False)
    d = data(torch.float64)
    mha = torch.backends.mha.get_fastpath_enabled()
    threads = torch.get_num_threads()

    def rec(m):
        raw = m(d["obs"]).squeeze(-1) ** 2
        return raw / raw.sum()

    with pytest.raises(fastattr.ScoringError, match=r"module\(s\) \['l1', 'l2'\].*mixes records"):
        fastattr.score(model, rec, lambda m: m(d["probe"]).sum())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert model.training and not model.l2.weight.requires_grad and model.l1.weight.requires_grad
    assert torch.backends.mha.get_fastpath_enabled() == mha and torch.get_num_threads() == threads
    assert torch.is_grad_enabled() and all(p.grad is None for p in model.parameters())


# ---- record units --------------------------------------------------------------------------------------------------
def test_per_token_scores_and_units_on_a_sequence_model():
    """record_loss returns per-token losses [N, T]: scores per token; units sum them into sequences or groups."""
    model, (ids, ids_t) = TinyGPT().double(), gpt_tokens(n=6, t=5)

    def rec(m):
        return token_nll(m, ids)

    def tgt(m):
        return token_nll(m, ids_t).mean()

    exact = brute_force_scores(model, rec, tgt)  # [6, 4]
    per_token = fastattr.score(model, rec, tgt)
    assert per_token.shape == (6, 4) and rel_err(per_token, exact) < 1e-10
    seq = torch.arange(6)
    assert rel_err(fastattr.score(model, rec, tgt, units=seq), exact.sum(1)) < 1e-10
    groups = torch.tensor([0, 0, 1, 1, 2, 2])  # e.g. GRPO groups of 2 completions
    expect = torch.zeros(3, dtype=torch.float64).index_add_(0, groups, exact.sum(1))
    got = fastattr.explain(model, rec, tgt, units=groups)
    assert rel_err(got.scores, expect) < 1e-10 and got.paths["qkv.weight"] == "linear"  # record units: fast path
    halves = torch.tensor([[0, 0, 1, 1]] * 6) + 2 * torch.arange(6)[:, None]  # two units per sequence
    expect = torch.zeros(12, dtype=torch.float64).index_add_(0, halves.reshape(-1), exact.reshape(-1))
    assert rel_err(fastattr.score(model, rec, tgt, units=halves), expect) < 1e-10
    targets = lambda m: token_nll(m, ids_t).sum(1)  # noqa: E731  M = 3 targets, per token
    exact_m = brute_force_scores(model, rec, targets)
    assert rel_err(fastattr.score(model, rec, targets), exact_m) < 1e-10
    assert rel_err(fastattr.score(model, rec, targets, units=seq), exact_m.sum(1)) < 1e-10


def test_mixing_within_a_unit_keeps_the_fast_path():
    """Losses normalised within each group (GRPO-style) mix rows only inside a unit: unit scores are exact through the
    fast path; without units the same losses take the general path."""
    model, d = mlp(3).double(), data(torch.float64)
    groups = torch.arange(N) // 3

    def rec(m):
        raw = (m(d["obs"]) ** 2).sum(1)
        total = torch.zeros(4, dtype=raw.dtype).index_add(0, groups, raw)
        return raw / total[groups].sqrt()

    def tgt(m):
        return m(d["probe"]).sum()

    exact = brute_force_scores(model, rec, tgt)
    got = fastattr.explain(model, rec, tgt, units=groups)
    assert all(v == "linear" for v in got.paths.values())
    assert rel_err(got.scores, torch.zeros(4, dtype=torch.float64).index_add_(0, groups, exact)) < 1e-10
    assert all("mixes records" in v for v in fastattr.explain(model, rec, tgt).paths.values())


def test_units_errors():
    model, rec, tgt = td_two_calls(torch.float64)
    with pytest.raises(fastattr.ScoringError, match="units must have one entry per record"):
        fastattr.score(model, rec, tgt, units=torch.zeros(3, dtype=torch.long))
    with pytest.raises(fastattr.ScoringError, match="units must be an integer tensor"):
        fastattr.score(model, rec, tgt, units=torch.zeros(N))
    with pytest.raises(fastattr.ScoringError, match="units must be >= 0"):
        fastattr.score(model, rec, tgt, units=-torch.ones(N, dtype=torch.long))


def test_distributed_data_parallel_module_is_unwrapped(tmp_path):
    """A DDP-wrapped model (one gloo rank here) scores as its module, and training with it continues normally."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model, rec, tgt = td_two_calls(torch.float64)
        exact = brute_force_scores(model, rec, tgt)
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
        assert rel_err(fastattr.score(ddp, rec, tgt), exact) < 1e-10
        rec(ddp).sum().backward()  # DDP's reducer was not left half-armed by scoring
        rec(ddp).sum().backward()
    finally:
        dist.destroy_process_group()
