"""backend= of the ops and of fastattr.score: every path (kernel, eager, reference, auto) gives the same scores, the
auto rule reads the committed crossover table, and bad values are refused clearly."""
import sys
from pathlib import Path

import pytest
import torch
from test_scoring import brute_force, closures, make_case, rel_err

import fastattr
from fastattr import crossovers, ops, reference
from fastattr.scoring import ScoringError
from fastattr.testing import error_vs_reference, make_layer, sample_inputs, within_tolerance

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_ops  # noqa: E402  (derive_rule: the committed table must follow from its own measurements)


def needs_kernels():
    if not all(ops.has_kernel(op, "cpu") for op in ops.OPS):
        pytest.skip("fastattr CPU kernels are not built")


# ---------------------------------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ops.OPS)
def test_every_backend_matches_the_float64_reference(op):
    needs_kernels()
    for args in sample_inputs(op, "cpu", torch.float64):
        want = getattr(reference, op)(*args)
        for backend in ops.BACKENDS:
            got = getattr(ops, op)(*args, backend=backend)
            assert got.dtype == torch.float64 and got.shape == want.shape, (op, backend)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"{op} backend={backend}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["grad_dot", "grad_sim_reduce"])
def test_eager_path_is_as_accurate_as_torch(op, dtype):
    for args in sample_inputs(op, "cpu", dtype):
        ours, torch_err, scale = error_vs_reference(op, args, lambda *a: getattr(ops, op)(*a, backend="eager"))
        assert within_tolerance(ours, torch_err, scale, dtype), (op, dtype, ours, torch_err)


@pytest.mark.parametrize("reduce", reference.REDUCTIONS)
def test_eager_grad_sim_reduce_in_chunks(monkeypatch, reduce):
    """Tiles of a few records (several chunks over N), positions T, S > 1 and a layer with no positions."""
    monkeypatch.setattr(ops, "EAGER_TILE_VALUES", 7 * 3 * 40)  # 7 records per chunk of [T * rows, M * S]
    xa0, ga0 = make_layer(30, 3, 5, 4, torch.float64, seed=1)
    xb0, gb0 = make_layer(40, 1, 5, 4, torch.float64, seed=2, flat=True)
    xa1, ga1 = make_layer(30, 0, 3, 2, torch.float64, seed=3)
    xb1, gb1 = make_layer(40, 2, 3, 2, torch.float64, seed=4)
    args = ([xa0, xa1], [ga0, ga1], [xb0, xb1], [gb0, gb1], reduce, 0.01)
    torch.testing.assert_close(ops.grad_sim_reduce(*args, backend="eager"), reference.grad_sim_reduce(*args),
                               rtol=1e-12, atol=1e-12)


def test_eager_edge_cases_match_the_kernel():
    needs_kernels()
    x, g = make_layer(0, 1, 4, 3, torch.float64, flat=True)
    y, h = make_layer(5, 1, 4, 3, torch.float64, flat=True)
    for backend in ("kernel", "eager"):
        assert ops.grad_sim_reduce([x], [g], [y], [h], "none", backend=backend).shape == (0, 5)
        assert ops.grad_sim_reduce([y], [h], [x], [g], "sum", backend=backend).eq(0).all()
        for reduce in ("max", "mean"):  # over M = 0 targets: an error, also with N = 0 records
            with pytest.raises(RuntimeError, match="M=0"):
                ops.grad_sim_reduce([x], [g], [x], [g], reduce, backend=backend)
        bias = torch.randn(4, dtype=torch.float64)
        x0, g0 = torch.randn(6, 3, 0, dtype=torch.float64), torch.randn(6, 3, 4, dtype=torch.float64)
        torch.testing.assert_close(ops.grad_dot(x0, g0, torch.randn(4, 0, dtype=torch.float64), bias, backend=backend),
                                   reference.grad_dot(x0, g0, torch.randn(4, 0, dtype=torch.float64), bias))


def test_bad_backend_values_are_refused(monkeypatch):
    x, g = make_layer(4, 1, 3, 2, flat=True)
    with pytest.raises(ValueError, match="backend must be one of auto, kernel, eager, reference"):
        ops.grad_dot(x, g, torch.randn(2, 3), backend="cuda")
    monkeypatch.setitem(ops._KERNELS, ("grad_dot", "cpu"), False)
    with pytest.raises(RuntimeError, match="backend='kernel' but no cpu kernel for grad_dot is built"):
        ops.grad_dot(x, g, torch.randn(2, 3), backend="kernel")


# ---------------------------------------------------------------------------------------------------------------------
# The auto rule
# ---------------------------------------------------------------------------------------------------------------------
MLP_BIG = ((1, 1, 8, 256), (1, 1, 256, 256), (1, 1, 256, 4))


@pytest.fixture
def tf32():
    """Sets torch.backends.cuda.matmul.allow_tf32 (a property, not a plain attribute) and restores it."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    yield lambda on: setattr(matmul, "allow_tf32", on)
    matmul.allow_tf32 = saved


def test_cuda_rules_follow_the_h200_measurements(tf32):
    """Pairwise: eager Gram GEMMs for fp32 and TF32 (the kernel measured 0.40x / 0.51x eager), the kernel for bf16
    (1.9x); every other CUDA op and dtype takes the kernel."""
    shape = (65536, 2048, MLP_BIG)
    tf32(False)
    assert ops.choose("grad_sim_reduce", "cuda", torch.float32, shape) == "eager"
    assert ops.choose("grad_sim_reduce", "cuda", torch.bfloat16, shape) == "kernel"
    assert ops.choose("grad_sim_reduce", "cuda", torch.float16, shape) == "kernel"  # not measured: the kernel
    assert ops.choose("grad_dot", "cuda", torch.float32, (65536, 1, 256, 256)) == "kernel"
    tf32(True)
    assert ops.precision("cuda", torch.float32) == "tf32" and ops.precision("cpu", torch.float32) == "fp32"
    assert ops.choose("grad_sim_reduce", "cuda", torch.float32, shape) == "eager"
    # the eager path needs one record's [T, M * S] tile to fit: otherwise the kernel, whatever the table says
    assert ops.choose("grad_sim_reduce", "cuda", torch.float32, (8, 2**20, ((32, 32, 64, 64),))) == "kernel"


def test_a_combination_without_a_rule_takes_the_kernel(monkeypatch):
    monkeypatch.setattr(ops, "_RULES", {})
    assert ops.choose("grad_sim_reduce", "cuda", torch.float32, (65536, 2048, MLP_BIG)) == "kernel"


def test_threshold_rules(monkeypatch):
    rule = {"op": "grad_dot", "device": "cpu", "precision": "fp32", "below": "eager", "above": "kernel",
            "threshold_flops": 1e6}
    monkeypatch.setitem(ops._RULES, ("grad_dot", "cpu", "fp32"), rule)
    assert ops.flops("grad_dot", (1000, 1, 8, 64)) == 1_024_000
    assert ops.choose("grad_dot", "cpu", torch.float32, (1000, 1, 8, 64)) == "kernel"
    assert ops.choose("grad_dot", "cpu", torch.float32, (900, 1, 8, 64)) == "eager"


def test_the_committed_table_is_valid_and_follows_from_its_measurements():
    seen = set()
    for rule in crossovers.RULES:
        key = (rule["op"], rule["device"], rule["precision"])
        assert key not in seen, key
        seen.add(key)
        assert rule["op"] in ops.OPS and rule["below"] in ops.PATHS and rule["above"] in ops.PATHS, key
        assert rule["threshold_flops"] is None or rule["threshold_flops"] > 0, key
        assert rule["source"]["machine"] and rule["source"]["date"] and rule["points"], key
        if "note" in rule:  # decided by hand from the measurements (the CUDA rules): says how
            continue
        points = [{"flops": flops, "us": dict(zip(ops.PATHS, us))} for _, flops, *us in rule["points"]]
        paths = bench_ops.sweep_paths(rule["op"], rule["points"][0][0])
        assert bench_ops.derive_rule(points, paths) == (rule["below"], rule["above"], rule["threshold_flops"]), key


# ---------------------------------------------------------------------------------------------------------------------
# fastattr.score
# ---------------------------------------------------------------------------------------------------------------------
BACKENDS = ["auto", "kernel", "eager", "reference"]


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
def test_score_is_the_same_with_every_backend(kind):
    """float64: the aggregated target and M targets with every reduce, on an MLP, a conv net and an embedding +
    sequence model, against vmap(grad) and across backends."""
    needs_kernels()
    n, m = 29, 7
    model, x, y, adv, xt, yt = make_case(kind, n, m, torch.float64, seed=3)
    record_loss, target_mean, target_each = closures(x, y, adv, xt, yt)
    exact = brute_force(model, x, y, adv, xt, yt, [k for k, _ in model.named_parameters()], targets="each")
    wants = {"mean": exact.mean(1), "sum": exact.sum(1), "max": exact.amax(1), "min": exact.amin(1), "none": exact}
    got = {b: fastattr.score(model, record_loss, target_mean, backend=b, chunk_size=16) for b in BACKENDS}
    for b in BACKENDS:
        assert rel_err(got[b], exact.mean(1)) < 1e-10, b
        assert rel_err(got[b], got["reference"]) < 1e-12, b
    for reduce, want in wants.items():
        each = {b: fastattr.score(model, record_loss, target_each, reduce=reduce, backend=b, chunk_size=16)
                for b in BACKENDS}
        for b in BACKENDS:
            assert rel_err(each[b], want) < 1e-10, (reduce, b)
            assert rel_err(each[b], each["reference"]) < 1e-12, (reduce, b)


def test_score_backend_is_validated(monkeypatch):
    model, x, y, adv, xt, yt = make_case("mlp", 5, 2, torch.float64)
    record_loss, target_mean, _ = closures(x, y, adv, xt, yt)
    with pytest.raises(ScoringError, match="backend must be one of"):
        fastattr.score(model, record_loss, target_mean, backend="fast")
    monkeypatch.setattr(ops, "has_kernel", lambda op, device: False)
    with pytest.raises(ScoringError, match="backend='kernel'.*no cpu kernel"):
        fastattr.score(model, record_loss, target_mean, backend="kernel")


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_is_deterministic_across_thread_counts(backend):
    """Scores bit-identical with one and two threads, with a record count (9) at which MKL splits a GEMM
    differently on two threads."""
    needs_kernels()
    model, x, y, adv, xt, yt = make_case("mlp", 9, 40, torch.float32, seed=6)
    record_loss, target_mean, target_each = closures(x, y, adv, xt, yt)
    old = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append([fastattr.score(model, record_loss, target, backend=backend)
                         for target in (target_mean, target_each)])
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ops.OPS)
def test_every_backend_on_cuda(op, dtype):
    """On a GPU: every path against the float64 reference (the auto rule sends fp32 pairwise to the eager path)."""
    if not ops.has_kernel(op, "cuda"):
        pytest.skip("fastattr CUDA kernels are not built")
    for args in sample_inputs(op, "cuda", dtype):
        for backend in ops.BACKENDS:
            ours, torch_err, scale = error_vs_reference(op, args, lambda *a: getattr(ops, op)(*a, backend=backend))
            assert within_tolerance(ours, torch_err, scale, dtype), (op, dtype, backend, ours, torch_err)
