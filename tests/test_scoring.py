"""fastattr.score against brute-force per-sample gradients (torch.func.vmap(grad)) on random models."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import fastattr

# ---------------------------------------------------------------------------------------------------------------------
# Random models; each takes one batch of inputs and returns logits [B, C]
# ---------------------------------------------------------------------------------------------------------------------
C = 5


class MLP(nn.Module):
    def __init__(self, d=8, h=16):
        super().__init__()
        self.l1, self.l2, self.l3, self.l4 = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, C)

    def forward(self, x):
        return self.l4(F.softplus(self.l3(F.gelu(self.l2(torch.tanh(self.l1(x)))))))


class CNN(nn.Module):  # MiniGrid-sized: 7x7x3 observations
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 2)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, stride=2, bias=False)
        self.c3 = nn.Conv1d(8, 6, 2, padding=1, padding_mode="circular")
        self.fc = nn.Linear(6 * 10, C)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))  # [B, 8, 3, 3]
        h = torch.tanh(self.c3(h.flatten(2)))  # [B, 6, 10]
        return self.fc(h.flatten(1))


class SeqModel(nn.Module):  # Embedding + Linear over T positions, plus a Linear that sees [B, T, d] inputs
    def __init__(self, vocab=11, d=32, h=32):  # wide enough that the T>1 Gram (not materialisation) is cheaper
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.proj = nn.Linear(d, h)
        self.out = nn.Linear(h, C)

    def forward(self, tokens):
        return self.out(torch.tanh(self.proj(self.emb(tokens))).mean(1))


class NormModel(nn.Module):  # LayerNorm and a free-standing parameter go through the general (JVP) path
    def __init__(self, d=8, h=12):
        super().__init__()
        self.l1, self.ln, self.l2 = nn.Linear(d, h), nn.LayerNorm(h), nn.Linear(h, C)
        self.temperature = nn.Parameter(torch.tensor(1.3))

    def forward(self, x):
        return self.l2(torch.tanh(self.ln(self.l1(x)))) / self.temperature


def make_case(kind, n, m, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        model, x, xt = MLP(), torch.randn(n, 8, generator=g), torch.randn(m, 8, generator=g)
    elif kind == "cnn":
        model, x, xt = CNN(), torch.randn(n, 3, 7, 7, generator=g), torch.randn(m, 3, 7, 7, generator=g)
    elif kind == "seq":
        model = SeqModel()
        x, xt = torch.randint(0, 11, (n, 4), generator=g), torch.randint(0, 11, (m, 3), generator=g)
    else:
        model, x, xt = NormModel(), torch.randn(n, 8, generator=g), torch.randn(m, 8, generator=g)
    torch.manual_seed(seed)
    for p in model.parameters():  # non-trivial values everywhere (LayerNorm starts at 1/0)
        p.data = torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.dim() == 0 else 0.0)
    model = model.to(dtype)
    if x.is_floating_point():
        x, xt = x.to(dtype), xt.to(dtype)
    y = torch.randint(0, C, (n,), generator=g)
    yt = torch.randint(0, C, (m,), generator=g)
    adv = torch.randn(n, generator=g, dtype=dtype)
    return model, x, y, adv, xt, yt


def per_record_loss(logits, y, adv):  # PPO-style: -A_i log pi(a_i | s_i)
    return -adv * torch.log_softmax(logits, -1).gather(1, y[:, None]).squeeze(1)


def brute_force(model, x, y, adv, xt, yt, names, targets="mean"):
    """Per-sample gradients of every record and target with vmap(grad); their dot products over `names`."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def rec(p, xi, yi, ai):
        return per_record_loss(functional_call(model, p, (xi[None],)), yi[None], ai[None])[0]

    def tgt(p, xi, yi):
        return -torch.log_softmax(functional_call(model, p, (xi[None],)), -1).gather(1, yi.reshape(1, 1))[0, 0]

    gr = vmap(grad(rec), in_dims=(None, 0, 0, 0))(params, x, y, adv)
    gt = vmap(grad(tgt), in_dims=(None, 0, 0))(params, xt, yt)
    s = sum(gr[k].reshape(len(x), -1) @ gt[k].reshape(len(xt), -1).T for k in names)  # [N, M]
    return s.mean(1) if targets == "mean" else s


def closures(x, y, adv, xt, yt):
    def record_loss(model):
        return per_record_loss(model(x), y, adv)

    def target_mean(model):
        return (-torch.log_softmax(model(xt), -1).gather(1, yt[:, None]).squeeze(1)).mean()

    def target_each(model):
        return -torch.log_softmax(model(xt), -1).gather(1, yt[:, None]).squeeze(1)

    return record_loss, target_mean, target_each


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
KINDS = ["mlp", "cnn", "seq", "norm"]


# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 37])
def test_aggregated_target_matches_vmap(kind, n, dtype):
    model, x, y, adv, xt, yt = make_case(kind, n, 9, dtype)
    record_loss, target_mean, _ = closures(x, y, adv, xt, yt)
    exact = brute_force(model.double(), x.double() if x.is_floating_point() else x, y, adv.double(),
                        xt.double() if xt.is_floating_point() else xt, yt,
                        [k for k, _ in model.named_parameters()])
    model = model.to(dtype)
    got = fastattr.score(model, record_loss, target_mean, chunk_size=16)
    assert got.shape == (n,)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(got, exact) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_m_targets_match_vmap(kind, dtype):
    n, m = 37, 6
    model, x, y, adv, xt, yt = make_case(kind, n, m, dtype, seed=1)
    record_loss, _, target_each = closures(x, y, adv, xt, yt)
    names = [k for k, _ in model.named_parameters()]
    exact = brute_force(model.double(), x.double() if x.is_floating_point() else x, y, adv.double(),
                        xt.double() if xt.is_floating_point() else xt, yt, names, targets="each")
    model = model.to(dtype)
    got = fastattr.score(model, record_loss, target_each, chunk_size=16)
    assert got.shape == (n, m)
    assert rel_err(got, exact) < TOL[dtype]
    for reduce, ref in [("mean", exact.mean(1)), ("sum", exact.sum(1)), ("max", exact.amax(1)),
                        ("min", exact.amin(1))]:
        assert rel_err(fastattr.score(model, record_loss, target_each, reduce=reduce), ref) < TOL[dtype], reduce


@pytest.mark.parametrize("kind,params", [
    ("mlp", ["l1", "l3.bias"]),           # a module prefix and a single bias
    ("cnn", ["c1.weight", "c3", "fc.bias"]),
    ("seq", ["emb"]),
    ("norm", ["ln", "temperature"]),      # only general-path parameters
])
def test_parameter_subsets(kind, params):
    model, x, y, adv, xt, yt = make_case(kind, 23, 5, torch.float64, seed=2)
    record_loss, target_mean, target_each = closures(x, y, adv, xt, yt)
    names = [k for k, _ in model.named_parameters() if any(k == p or k.startswith(p + ".") for p in params)]
    exact_m = brute_force(model, x, y, adv, xt, yt, names, targets="each")
    assert rel_err(fastattr.score(model, record_loss, target_mean, params=params), exact_m.mean(1)) < 1e-10
    assert rel_err(fastattr.score(model, record_loss, target_each, params=params), exact_m) < 1e-10
    pred = fastattr.score(model, record_loss, target_mean, params=lambda k: k in names)
    assert rel_err(pred, exact_m.mean(1)) < 1e-10


def test_joint_forward_equals_separate():
    """record_loss returning (records, target) from one forward gives the same scores (the PPO form)."""
    model, x, y, adv, _, _ = make_case("mlp", 41, 1, torch.float64)

    def both(m):
        logp = torch.log_softmax(m(x), -1).gather(1, y[:, None]).squeeze(1)
        return -adv * logp, -(adv * logp).mean()

    sep = fastattr.score(model, lambda m: both(m)[0], lambda m: both(m)[1])
    joint = fastattr.score(model, both)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def rec(p, xi, yi, ai):
        return -ai * torch.log_softmax(functional_call(model, p, (xi[None],)), -1).gather(1, yi.reshape(1, 1))[0, 0]

    gr = vmap(grad(rec), in_dims=(None, 0, 0, 0))(params, x, y, adv)
    gt = grad(lambda p: -(adv * torch.log_softmax(functional_call(model, p, (x,)), -1)
                          .gather(1, y[:, None]).squeeze(1)).mean())(params)
    exact = sum(gr[k].flatten(1) @ gt[k].flatten() for k in params)
    assert rel_err(joint, exact) < 1e-10
    assert rel_err(sep, exact) < 1e-10


def test_shared_module_called_twice_and_sequence_linear():
    """A Linear applied twice per record (weight sharing) and to [N, T, d] inputs: calls add up as positions."""
    lin, head = nn.Linear(4, 4).double(), nn.Linear(4, 3).double()
    model = nn.ModuleDict({"lin": lin, "head": head})
    x = torch.randn(13, 5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (13,))

    def fwd(p, xb):
        h = torch.tanh(functional_call(model["lin"], {"weight": p["lin.weight"], "bias": p["lin.bias"]}, (xb,)))
        h = functional_call(model["lin"], {"weight": p["lin.weight"], "bias": p["lin.bias"]}, (h,))
        return functional_call(model["head"], {"weight": p["head.weight"], "bias": p["head.bias"]}, (h.mean(1),))

    def loss(p, xb, yb):
        return F.cross_entropy(fwd(p, xb), yb, reduction="none")

    params = {k: v.detach() for k, v in model.named_parameters()}
    gr = vmap(grad(lambda p, xi, yi: loss(p, xi[None], yi[None])[0]), in_dims=(None, 0, 0))(params, x, y)
    gt = grad(lambda p: loss(p, x[:3], y[:3]).sum())(params)
    exact = sum(gr[k].flatten(1) @ gt[k].flatten() for k in params)

    def record_loss(m):
        h = m["lin"](torch.tanh(m["lin"](x)))
        return F.cross_entropy(m["head"](h.mean(1)), y, reduction="none")

    def target(m):
        h = m["lin"](torch.tanh(m["lin"](x[:3])))
        return F.cross_entropy(m["head"](h.mean(1)), y[:3], reduction="none").sum()

    assert rel_err(fastattr.score(model, record_loss, target), exact) < 1e-10


def test_large_n_chunks_and_materialised_layer():
    """N > chunk size; a conv layer with many positions and few weights takes the T^2-rule materialisation."""
    model, x, y, adv, xt, yt = make_case("cnn", 70, 4, torch.float64, seed=3)
    record_loss, _, target_each = closures(x, y, adv, xt, yt)
    exact = brute_force(model, x, y, adv, xt, yt, [k for k, _ in model.named_parameters()], targets="each")
    for chunk in (1, 8, 4096):
        assert rel_err(fastattr.score(model, record_loss, target_each, chunk_size=chunk), exact) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_non_aligned_targets_use_per_target_gradients(kind, dtype):
    """M targets that are each a mean over several states (not one row per target) are still exact."""
    model, x, y, adv, xt, yt = make_case(kind, 19, 12, dtype, seed=4)
    record_loss = closures(x, y, adv, xt, yt)[0]

    def grouped(m):
        l_ = -torch.log_softmax(m(xt), -1).gather(1, yt[:, None]).squeeze(1)
        return l_.view(3, 4).mean(1)  # M = 3 targets over 12 states

    names = [k for k, _ in model.named_parameters()]
    exact_each = brute_force(model.double(), x.double() if x.is_floating_point() else x, y, adv.double(),
                             xt.double() if xt.is_floating_point() else xt, yt, names, targets="each")
    exact = exact_each.view(19, 3, 4).mean(2)
    model = model.to(dtype)
    for reduce, ref in [("none", exact), ("max", exact.amax(1)), ("min", exact.amin(1))]:
        assert rel_err(fastattr.score(model, record_loss, grouped, reduce=reduce), ref) < TOL[dtype], reduce


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_targets_that_mix_rows_are_not_taken_for_one_row_per_target(dtype):
    """M targets over M rows where target m also depends on row m-1: same shapes as the Gram path's case, but each
    target's gradient is not its own row's, so the per-target path must be used (it was silently wrong before)."""
    model, x, y, adv, xt, yt = make_case("mlp", 15, 6, dtype, seed=8)
    record_loss = closures(x, y, adv, xt, yt)[0]

    def mixed(m):
        l_ = -torch.log_softmax(m(xt), -1).gather(1, yt[:, None]).squeeze(1)
        return l_ + 0.5 * l_.roll(1)

    exact = brute_force(model.double(), x.double(), y, adv.double(), xt.double(), yt,
                        [k for k, _ in model.named_parameters()], targets="each")
    exact = exact + 0.5 * exact.roll(1, 1)
    model = model.to(dtype)
    assert rel_err(fastattr.score(model, record_loss, mixed), exact) < TOL[dtype]
    assert rel_err(fastattr.score(model, record_loss, mixed, reduce="max"), exact.amax(1)) < TOL[dtype]


class GroupedConvModel(nn.Module):  # convs the Gram path cannot pair (groups > 1, Conv3d) go through the JVP path
    def __init__(self):
        super().__init__()
        self.g = nn.Conv2d(4, 6, 2, groups=2)
        self.c3 = nn.Conv3d(1, 2, 2)
        self.fc = nn.Linear(6 * 4 + 2 * 3 * 2 * 2, C)

    def forward(self, x):  # x: [B, 4, 3, 3]
        a = torch.tanh(self.g(x)).flatten(1)
        b = torch.tanh(self.c3(x[:, None])).flatten(1)
        return self.fc(torch.cat([a, b], 1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("params", [None, ["g.bias"], ["c3.bias", "fc"], ["g.weight", "c3"]])
def test_convs_without_a_gram_form_are_exact(params, dtype):
    g = torch.Generator().manual_seed(9)
    model = GroupedConvModel().double()
    x, xt = torch.randn(11, 4, 3, 3, generator=g, dtype=torch.float64), torch.randn(5, 4, 3, 3, generator=g,
                                                                                      dtype=torch.float64)
    y, yt, adv = torch.randint(0, C, (11,), generator=g), torch.randint(0, C, (5,), generator=g), torch.randn(
        11, generator=g, dtype=torch.float64)
    names = [k for k, _ in model.named_parameters()
             if params is None or any(k == p or k.startswith(p + ".") for p in params)]
    exact = brute_force(model, x, y, adv, xt, yt, names, targets="each")
    model, x, xt, adv = model.to(dtype), x.to(dtype), xt.to(dtype), adv.to(dtype)
    record_loss, target_mean, target_each = closures(x, y, adv, xt, yt)
    assert rel_err(fastattr.score(model, record_loss, target_each, params=params), exact) < TOL[dtype]
    assert rel_err(fastattr.score(model, record_loss, target_mean, params=params), exact.mean(1)) < TOL[dtype]


class TiedModel(nn.Module):  # an output head sharing the embedding's table (tied weights)
    def __init__(self, vocab=C, d=6):
        super().__init__()
        self.emb, self.mid = nn.Embedding(vocab, d), nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mid(self.emb(tokens))))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tied_weights_count_every_use(dtype):
    """A Parameter held by two modules is scored through both uses (no module hook sees the other's use)."""
    g = torch.Generator().manual_seed(10)
    model = TiedModel().double()
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=torch.float64)
    x, xt = torch.randint(0, C, (13,), generator=g), torch.randint(0, C, (4,), generator=g)
    y, yt, adv = torch.randint(0, C, (13,), generator=g), torch.randint(0, C, (4,), generator=g), torch.randn(
        13, generator=g, dtype=torch.float64)
    names = [k for k, _ in model.named_parameters()]
    exact = brute_force(model, x, y, adv, xt, yt, names, targets="each")
    model, adv = model.to(dtype), adv.to(dtype)
    record_loss, target_mean, target_each = closures(x, y, adv, xt, yt)
    assert rel_err(fastattr.score(model, record_loss, target_mean), exact.mean(1)) < TOL[dtype]
    assert rel_err(fastattr.score(model, record_loss, target_each), exact) < TOL[dtype]
    assert rel_err(fastattr.score(model, record_loss, target_each, params=["emb"]), brute_force(
        model.double(), x, y, adv.double(), xt, yt, ["emb.weight"], targets="each")) < TOL[dtype]


def test_dtype_option_runs_contractions_in_float64():
    """float32 model, float64 contractions: float64 scores, as exact as the float32 passes allow."""
    model, x, y, adv, xt, yt = make_case("mlp", 17, 5, torch.float32, seed=5)
    record_loss, target_mean, target_each = closures(x, y, adv, xt, yt)
    names = [k for k, _ in model.named_parameters()]
    exact = brute_force(model.double(), x.double(), y, adv.double(), xt.double(), yt, names, targets="each")
    model = model.float()
    got = fastattr.score(model, record_loss, target_mean, dtype=torch.float64)
    assert got.dtype == torch.float64
    assert rel_err(got, exact.mean(1)) < TOL[torch.float32]
    got_m = fastattr.score(model, record_loss, target_each, dtype=torch.float64)
    assert got_m.dtype == torch.float64 and rel_err(got_m, exact) < TOL[torch.float32]


def test_weight_used_outside_its_module_is_scored_exactly():
    """F.linear(x, layer.weight) bypasses the Linear's capture: the autograd graph shows the use, and the weight is
    scored by the general path instead (it was once silently dropped)."""
    lin = nn.Linear(3, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)

    def record_loss(m):
        return (m(x) + F.linear(x, m.weight)).pow(2).sum(1)

    def target(m):
        return (m(x) + F.linear(x, m.weight)).sum()

    assert rel_err(fastattr.score(lin, record_loss, target, check=True), loop_oracle(lin, record_loss, target)) < 1e-10
    paths = fastattr.explain(lin, record_loss, target).paths
    assert paths["weight"].startswith("general: has a parameter used outside") and paths["bias"] == "linear"


def test_check_catches_a_result_that_changes_between_forwards():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)

    def noisy(m):  # fresh noise in every forward: the scores describe one draw, a fresh forward another
        return (m(x) + torch.randn(5, 2, dtype=torch.float64)).pow(2).sum(1)

    with pytest.raises(fastattr.ScoringError, match="check failed"):
        fastattr.score(lin, noisy, lambda m: m(x).sum(), check=True)


def test_check_passes_on_a_correct_model():
    model, x, y, adv, xt, yt = make_case("norm", 11, 4, torch.float64)
    record_loss, target_mean, target_each = closures(x, y, adv, xt, yt)
    fastattr.score(model, record_loss, target_mean, check=True)
    fastattr.score(model, record_loss, target_each, check=True)


def test_check_in_the_joint_form():
    """check=True with (records, target) from one forward (the PPO form): passes on a correct model, and still
    catches a weight used outside its module."""
    model, x, y, adv, _, _ = make_case("mlp", 21, 1, torch.float64, seed=7)

    def both(m):
        logp = torch.log_softmax(m(x), -1).gather(1, y[:, None]).squeeze(1)
        return -adv * logp, -(adv * logp).mean()

    assert rel_err(fastattr.score(model, both, check=True), fastattr.score(model, both)) == 0.0

    def outside(m):
        logits = m(x) + F.linear(torch.tanh(m.l3(F.gelu(m.l2(torch.tanh(m.l1(x)))))), m.l4.weight)
        logp = torch.log_softmax(logits, -1).gather(1, y[:, None]).squeeze(1)
        return -adv * logp, -(adv * logp).mean()

    def rec(m):
        return outside(m)[0]

    def tgt(m):
        return outside(m)[1]

    assert rel_err(fastattr.score(model, outside, check=True), loop_oracle(model, rec, tgt)) < 1e-10


def test_topk_and_select():
    s = torch.tensor([0.5, -2.0, 3.0, -0.1, 1.0])
    v, i = fastattr.topk(s, 2)
    assert i.tolist() == [2, 4] and v.tolist() == [3.0, 1.0]
    assert fastattr.topk(s, 2, largest=False)[1].tolist() == [1, 3]
    assert fastattr.select(s, below=0).tolist() == [1, 3]
    assert fastattr.select(s, above=0.2, below=2.0).tolist() == [0, 4]
    with pytest.raises(ValueError, match="k must be"):
        fastattr.topk(s, 6)


def test_deterministic_across_thread_counts():
    model, x, y, adv, xt, yt = make_case("mlp", 300, 40, torch.float32, seed=6)
    record_loss, target_mean, target_each = closures(x, y, adv, xt, yt)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = fastattr.score(model, record_loss, target_mean), fastattr.score(model, record_loss, target_each)
        torch.set_num_threads(2)
        b = fastattr.score(model, record_loss, target_mean), fastattr.score(model, record_loss, target_each)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------------------------------------------------------------
# Legitimate PyTorch that once went wrong (found by an adversarial audit): oracle = one autograd.grad per record
# ---------------------------------------------------------------------------------------------------------------------
def loop_oracle(model, record_loss, target_loss):
    """[N] (scalar target) or [N, M]: per-record gradients against per-target gradients, one backward each."""
    ps = [p for p in model.parameters() if p.requires_grad]

    def flat(out):
        gs = torch.autograd.grad(out, ps, retain_graph=True, allow_unused=True)
        gs = [torch.zeros_like(p) if g is None else g.to_dense() if g.is_sparse else g for g, p in zip(gs, ps)]
        return torch.cat([g.reshape(-1) for g in gs])

    losses, target = record_loss(model), target_loss(model)
    r = torch.stack([flat(losses[i]) for i in range(len(losses))]).double()
    t = flat(target)[None] if target.dim() == 0 else torch.stack([flat(target[m]) for m in range(len(target))])
    s = r @ t.double().T
    return s[:, 0] if target.dim() == 0 else s


def test_inplace_ops_on_a_scored_layers_output():
    """ReLU(inplace=True) / mul_ on a Linear's or a conv's output move the captured output in the graph: the forward
    is captured again with copies, and the scores stay exact."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).double()
    x, xt = torch.randn(6, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)

    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.Conv2d(2, 3, 2), nn.Linear(12, 3)

        def forward(self, z):
            h = self.c(z)
            h.mul_(0.5).relu_()
            return self.fc(h.flatten(1))

    conv = Conv().double()
    z, zt = torch.randn(6, 2, 3, 3, dtype=torch.float64), torch.randn(3, 2, 3, 3, dtype=torch.float64)
    for model, a, b in ((mlp, x, xt), (conv, z, zt)):
        def record_loss(m):
            return m(a).pow(2).sum(1)

        for target in (lambda m: m(b).sum(), lambda m: m(b)[:, 0]):
            assert rel_err(fastattr.score(model, record_loss, target), loop_oracle(model, record_loss, target)) < 1e-10


def test_no_grad_pass_inside_record_loss():
    """A baseline computed under torch.no_grad() inside record_loss carries no gradient. Ghost path: exact. JVP path
    (forward mode ignores no_grad): a clear error instead of scores off by a factor, and .detach() works."""
    torch.manual_seed(1)
    x, xt = torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    lin = nn.Linear(4, 2).double()

    def record_loss(m):
        with torch.no_grad():
            old = m(x)
        return ((m(x) - 0.5 * old + 1) ** 2).sum(1)

    def target(m):
        return m(xt).sum()

    assert rel_err(fastattr.score(lin, record_loss, target), loop_oracle(lin, record_loss, target)) < 1e-10
    norm = nn.LayerNorm(4).double()  # an affine fast path: exact too
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    assert rel_err(fastattr.score(norm, record_loss, target), loop_oracle(norm, record_loss, target)) < 1e-10

    class Temperature(nn.Module):  # not affine in its parameter: the general path
        def __init__(self):
            super().__init__()
            self.t = nn.Parameter(torch.tensor([1.3, 0.7, 2.0, 1.1], dtype=torch.float64))

        def forward(self, z):
            return torch.tanh(z / self.t)

    norm = Temperature()
    with pytest.raises(fastattr.ScoringError, match="no_grad"):
        fastattr.score(norm, record_loss, target)
    with pytest.raises(fastattr.ScoringError, match="no_grad"):
        fastattr.score(norm, record_loss, lambda m: m(xt)[:, 0])

    def detached(m):
        return ((m(x) - 0.5 * m(x).detach() + 1) ** 2).sum(1)

    assert rel_err(fastattr.score(norm, detached, target), loop_oracle(norm, detached, target)) < 1e-10


def test_layer_called_with_a_keyword_input():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 2)

        def forward(self, z):
            return self.l(input=z)

    model = KW().double()
    x, xt = torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)

    def record_loss(m):
        return m(x).pow(2).sum(1)

    def target(m):
        return m(xt).sum(1)

    assert rel_err(fastattr.score(model, record_loss, target), loop_oracle(model, record_loss, target)) < 1e-10


def test_targets_mixing_rows_at_very_different_scales():
    """Target 1 depends on row 0, whose own target is 1e5 times larger: a tolerance relative to the row would miss
    it; the exact check (zero off the own row) does not."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    x, xt = torch.randn(6, 4), torch.randn(3, 4)

    def record_loss(m):
        return m(x.to(m[0].weight.dtype))[:, 0] ** 2

    def target(m):
        y = m(xt.to(m[0].weight.dtype))[:, 0]
        return torch.stack([1e5 * y[0], y[1] + y[0], y[2]])

    exact = loop_oracle(model.double(), record_loss, target)
    assert rel_err(fastattr.score(model.float(), record_loss, target)[:, 1], exact[:, 1]) < 1e-4


def test_sparse_embedding_and_attention_in_eval_mode():
    torch.manual_seed(3)
    emb = nn.Sequential(nn.Embedding(7, 4, sparse=True), nn.Flatten(), nn.Linear(8, 2)).double()
    tok, tok_t = torch.randint(0, 7, (5, 2)), torch.randint(0, 7, (3, 2))

    def record_loss(m):
        return m(tok).pow(2).sum(1)

    def target(m):
        return m(tok_t).sum()

    assert rel_err(fastattr.score(emb, record_loss, target), loop_oracle(emb, record_loss, target)) < 1e-10
    mha = nn.MultiheadAttention(4, 2, batch_first=True).double().eval()  # eval: torch's fast path, no forward AD
    q, qt = torch.randn(5, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)

    def attn_loss(m):
        return m(q, q, q, need_weights=False)[0].pow(2).sum((1, 2))

    def attn_target(m):
        return m(qt, qt, qt, need_weights=False)[0].sum()

    assert rel_err(fastattr.score(mha, attn_loss, attn_target), loop_oracle(mha, attn_loss, attn_target)) < 1e-10


def test_check_with_max_and_min_still_checks():
    lin = nn.Linear(3, 2).double()
    x, xt = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)

    def record_loss(m):
        return (m(x) + F.linear(x, m.weight)).pow(2).sum(1)

    def target(m):
        return (m(xt) + F.linear(xt, m.weight)).sum(1)

    exact = loop_oracle(lin, record_loss, target)
    for reduce, ref in (("max", exact.amax(1)), ("min", exact.amin(1))):
        assert rel_err(fastattr.score(lin, record_loss, target, reduce=reduce, check=True), ref) < 1e-10


def test_dropout_in_training_mode_on_the_jvp_path_is_an_error():
    """The JVP pass runs the forward again and draws new dropout masks: caught by the reverse-mode cross-check."""
    class Temperature(nn.Module):  # not affine in its parameter: the general path
        def __init__(self):
            super().__init__()
            self.t = nn.Parameter(torch.full((6,), 1.3))

        def forward(self, z):
            return torch.tanh(z / self.t)

    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), Temperature(), nn.Dropout(0.3), nn.Linear(6, 2)).double().train()
    x, xt = torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)

    def record_loss(m):
        return m(x).pow(2).sum(1)

    def target(m):
        return m(xt).sum()

    with pytest.raises(fastattr.ScoringError, match="dropout"):
        fastattr.score(model, record_loss, target)
    model.eval()
    assert rel_err(fastattr.score(model, record_loss, target), loop_oracle(model, record_loss, target)) < 1e-10
