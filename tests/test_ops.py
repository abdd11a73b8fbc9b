"""The C++ kernels (torch.ops.fastattr.*) against the float64 reference; skipped (not passed) when not built."""
import pytest
import torch

from fastattr import ops, reference
from fastattr.testing import error_vs_reference, make_layer, sample_inputs, within_tolerance

OPS = ["grad_dot", "grad_sim_reduce", "grad_norm"]


def kernel(op):
    if not ops.has_kernel(op, "cpu"):
        pytest.skip(f"fastattr CPU kernel for {op} is not built")
    return getattr(torch.ops.fastattr, op).default


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", OPS)
def test_kernel_matches_fp64_reference(op, dtype):
    k = kernel(op)
    for args in sample_inputs(op, "cpu", dtype):
        ours, torch_err, scale = error_vs_reference(op, args, k)
        assert within_tolerance(ours, torch_err, scale, dtype), (op, dtype, ours, torch_err, scale)
        out = k(*args)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("n,d_in,d_out", [(1, 1, 1), (7, 5, 3), (129, 64, 33), (4096 + 32, 64, 64)])
def test_grad_dot_shapes(n, d_in, d_out):
    k = kernel("grad_dot")
    x, g = make_layer(n, 1, d_in, d_out, torch.float32, flat=True, seed=n)
    target, bias = torch.randn(d_out, d_in), torch.randn(d_out)
    ours, torch_err, scale = error_vs_reference("grad_dot", (x, g, target, bias), k)
    assert within_tolerance(ours, torch_err, scale, torch.float32)


@pytest.mark.parametrize("n,t,d_in,d_out", [
    (5, 1, 8, 256), (1100, 1, 8, 64), (37, 3, 17, 40), (2100, 1, 40, 17), (70, 2, 64, 4), (3, 5, 16, 16),
])
@pytest.mark.parametrize("bias", [True, False])
def test_grad_dot_layer_shapes(n, t, d_in, d_out, bias):
    """Narrow and wide layers both ways round, T > 1, one block of records and several, with and without bias."""
    k = kernel("grad_dot")
    x, g = make_layer(n, t, d_in, d_out, torch.float64, flat=t == 1, seed=n)
    target = torch.randn(d_out, d_in, dtype=torch.float64)
    b = torch.randn(d_out, dtype=torch.float64) if bias else None
    torch.testing.assert_close(k(x, g, target, b), reference.grad_dot(x, g, target, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [9, 300, 2100])
def test_kernels_do_not_depend_on_the_thread_count(n):
    """Bit-identical on one and two threads, with one block of records (where MKL, left alone, splits some small
    GEMMs differently on two threads, e.g. [9, 16] x [16, 300]) and with several."""
    for op in OPS:
        kernel(op)
    x, g = make_layer(n, 1, 9, 16, flat=True, seed=1)
    y, h = make_layer(300, 1, 9, 16, flat=True, seed=2)
    u, v = make_layer(n, 2, 16, 5, seed=3)
    w, z = make_layer(40, 3, 16, 5, seed=4)
    calls = [lambda: torch.ops.fastattr.grad_dot(x, g, torch.randn(16, 9, generator=torch.Generator().manual_seed(0)),
                                                 None),
             lambda: torch.ops.fastattr.grad_sim_reduce([x, u], [g, v], [y[:40], w], [h[:40], z], "sum", 0.0),
             lambda: torch.ops.fastattr.grad_sim_reduce([x], [g], [y], [h], "none", 0.0),
             lambda: torch.ops.fastattr.grad_norm([x, u], [g, v])]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [f() for f in calls]
        torch.set_num_threads(2)
        two = [f() for f in calls]
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_grad_sim_reduce_matches_full_matrix_reduction():
    k = kernel("grad_sim_reduce")
    xa, ga = make_layer(300, 2, 8, 5, torch.float64, seed=3)
    xb, gb = make_layer(257, 3, 8, 5, torch.float64, seed=4)
    full = k([xa], [ga], [xb], [gb], "none", 0.0)
    assert full.shape == (300, 257)
    torch.testing.assert_close(k([xa], [ga], [xb], [gb], "max", 0.0), full.amax(1), rtol=0, atol=0)
    torch.testing.assert_close(k([xa], [ga], [xb], [gb], "mean", 0.0), full.mean(1), rtol=1e-12, atol=1e-12)
    assert torch.equal(k([xa], [ga], [xb], [gb], "count_gt", 0.1), (full > 0.1).sum(1).double())


def test_zero_records_and_zero_targets():
    for op in OPS:
        kernel(op)
    x, g = make_layer(0, 1, 4, 3, flat=True)
    assert torch.ops.fastattr.grad_dot(x, g, torch.randn(3, 4), None).shape == (0,)
    y, h = make_layer(5, 1, 4, 3, flat=True)
    assert torch.ops.fastattr.grad_sim_reduce([x], [g], [y], [h], "none", 0.0).shape == (0, 5)
    assert torch.ops.fastattr.grad_sim_reduce([y], [h], [x], [g], "none", 0.0).shape == (5, 0)
    assert torch.ops.fastattr.grad_sim_reduce([y], [h], [x], [g], "sum", 0.0).eq(0).all()
    with pytest.raises(RuntimeError, match="M=0"):
        torch.ops.fastattr.grad_sim_reduce([y], [h], [x], [g], "max", 0.0)
    with pytest.raises(RuntimeError, match="M=0"):  # as the reference, also with N = 0
        torch.ops.fastattr.grad_sim_reduce([x], [g], [x], [g], "mean", 0.0)
    assert torch.ops.fastattr.grad_norm([x], [g]).shape == (0,)


@pytest.mark.parametrize("t,s", [(0, 2), (3, 0), (0, 0)])
def test_grad_sim_reduce_layer_with_no_positions(t, s):
    """A layer with T = 0 (or S = 0) positions adds nothing; the other layer's Gram still counts."""
    k = kernel("grad_sim_reduce")
    xa0, ga0 = make_layer(6, t, 4, 3, torch.float64, seed=1)
    xb0, gb0 = make_layer(5, s, 4, 3, torch.float64, seed=2)
    xa1, ga1 = make_layer(6, 2, 3, 2, torch.float64, seed=3)
    xb1, gb1 = make_layer(5, 1, 3, 2, torch.float64, seed=4)
    for reduce in ("none", "sum", "max"):
        want = reference.grad_sim_reduce([xa0, xa1], [ga0, ga1], [xb0, xb1], [gb0, gb1], reduce)
        got = k([xa0, xa1], [ga0, ga1], [xb0, xb1], [gb0, gb1], reduce, 0.0)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_count_gt_compares_in_the_score_dtype():
    """float32 scores are compared with float32(threshold), as torch compares `sim > threshold`: 0.1f > 0.1 in double
    but not in float32."""
    k = kernel("grad_sim_reduce")
    one = torch.ones(1, 1)
    args = ([one], [torch.full((1, 1), 0.1)], [one], [one])
    assert k(*args, "count_gt", 0.1).item() == reference.grad_sim_reduce(*args, "count_gt", 0.1).item() == 0.0
    assert k(*args, "count_gt", 0.0999).item() == 1.0
    many = torch.zeros(2**24 + 1, 1)
    with pytest.raises(RuntimeError, match="2\\^24"):  # a float32 count is exact only up to 2^24
        k([one], [one], [many], [many], "count_gt", 0.0)
    assert k([one.double()], [one.double()], [many.double()], [many.double()], "count_gt", -1.0).item() == 2**24 + 1


def test_non_contiguous_inputs():
    k = kernel("grad_dot")
    x, g = make_layer(50, 3, 6, 4, torch.float64, seed=9)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous strides
    gt = g.transpose(0, 1).contiguous().transpose(0, 1)
    target = torch.randn(6, 4, dtype=torch.float64).t()  # non-contiguous [4, 6]
    assert not xt.is_contiguous() and not target.is_contiguous()
    torch.testing.assert_close(k(xt, gt, target, None), reference.grad_dot(x, g, target), rtol=1e-12, atol=1e-12)
    s = kernel("grad_sim_reduce")
    torch.testing.assert_close(s([xt], [gt], [xt[:7]], [gt[:7]], "none", 0.0),
                               reference.grad_sim([x], [g], [x[:7]], [g[:7]]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad,match", [
    (lambda x, g, t: (x[:3], g, t, None), "disagree on N"),
    (lambda x, g, t: (x, g, t.t(), None), "target must be"),
    (lambda x, g, t: (x, g, t, torch.randn(7)), "target_bias must be"),
    (lambda x, g, t: (x.double(), g, t, None), "dtype"),
    (lambda x, g, t: (x[0], g, t, None), r"\[N, d\] or \[N, T, d\]"),
    (lambda x, g, t: (x.long(), g.long(), t.long(), None), "floating point"),
])
def test_grad_dot_bad_shapes_raise(bad, match):
    kernel("grad_dot")
    x, g = make_layer(5, 1, 4, 3, flat=True)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastattr.grad_dot(*bad(x, g, torch.randn(3, 4)))


def test_grad_sim_reduce_bad_input_raises():
    kernel("grad_sim_reduce")
    x, g = make_layer(5, 1, 4, 3, flat=True)
    y, h = make_layer(6, 1, 4, 3, flat=True)
    with pytest.raises(RuntimeError, match="reduce must be one of"):
        torch.ops.fastattr.grad_sim_reduce([x], [g], [y], [h], "median", 0.0)
    with pytest.raises(RuntimeError, match="one entry per layer"):
        torch.ops.fastattr.grad_sim_reduce([x, x], [g], [y], [h], "sum", 0.0)
    with pytest.raises(RuntimeError, match="disagree on d_in"):
        torch.ops.fastattr.grad_sim_reduce([x], [g], [y[:, :3]], [h], "sum", 0.0)
    with pytest.raises(RuntimeError, match="layer 1: has N=4"):
        torch.ops.fastattr.grad_sim_reduce([x, x[:4]], [g, g[:4]], [y, y], [h, h], "sum", 0.0)


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    kernel(op)
    for args in sample_inputs(op, "cpu", torch.float32):  # forward-only ops: inputs that do not require grad
        torch.library.opcheck(getattr(torch.ops.fastattr, op).default, args)


@pytest.mark.filterwarnings("ignore:Error detected in GeneratedBackward")  # AOT autograd reports the raise too
@pytest.mark.parametrize("op", OPS)
def test_backward_through_an_op_is_a_clear_error_eager_and_compiled(op):
    """An input that requires grad: eager, the output requires grad and a backward through it stops with an error
    naming the op (instead of a silently missing gradient); compiled, AOT autograd meets that error when it traces
    the backward. Under no_grad both run."""
    kernel(op)
    fn = getattr(torch.ops.fastattr, op).default
    args = sample_inputs(op, "cpu", torch.float32)[1]
    first = args[0] if isinstance(args[0], torch.Tensor) else args[0][0]
    first.requires_grad_(True)
    out = fn(*args)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match=f"fastattr::{op} has no backward"):
        out.sum().backward()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=f"fastattr::{op} has no backward"):
        compiled(*args).sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), fn(*args))


def test_meta_tensors_mixed_with_real_ones_are_refused():
    kernel("grad_dot")
    meta = torch.empty(4, 6, device="meta")
    with pytest.raises(RuntimeError, match="different devices"):
        torch.ops.fastattr.grad_dot(torch.randn(4, 5), meta, torch.randn(6, 5), None)
    with pytest.raises(RuntimeError, match="different devices"):
        torch.ops.fastattr.grad_norm([torch.randn(4, 5)], [meta])
    with pytest.raises(RuntimeError, match="target_bias"):  # the fake kernel checks what the kernel checks
        torch.ops.fastattr.grad_dot(torch.empty(4, 5, device="meta"), meta, torch.empty(6, 5, device="meta"),
                                    torch.empty(7, device="meta"))
    out = torch.ops.fastattr.grad_dot(torch.empty(4, 5, device="meta"), meta, torch.empty(6, 5, device="meta"), None)
    assert out.device.type == "meta" and out.shape == (4,)


@pytest.mark.parametrize("op", OPS)
def test_public_wrappers_compile_without_graph_breaks(op):
    kernel(op)
    wrapper = getattr(ops, op)
    args = sample_inputs(op, "cpu", torch.float32)[1]
    if op == "grad_sim_reduce":
        args = args[:5]
    compiled = torch.compile(lambda *a: wrapper(*a) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), wrapper(*args) * 2)


@pytest.mark.parametrize("op", OPS)
def test_torch_compile_fullgraph(op):
    kernel(op)
    fn = getattr(torch.ops.fastattr, op).default
    compiled = torch.compile(lambda *a: fn(*a) * 2, fullgraph=True, backend="aot_eager")
    args = sample_inputs(op, "cpu", torch.float32)[1]
    torch.testing.assert_close(compiled(*args), fn(*args) * 2)


def test_wrapper_fallback_is_loud(monkeypatch):
    monkeypatch.delenv("FASTATTR_STRICT", raising=False)
    monkeypatch.setattr(ops, "choose", lambda *args: "kernel")  # auto picks the kernel, which is missing
    monkeypatch.setattr(ops, "has_kernel", lambda op, device: False)
    monkeypatch.setattr(ops, "_warned", set())
    x, g = make_layer(4, 1, 3, 2, flat=True)
    with pytest.warns(RuntimeWarning, match="pure-torch reference"):
        ops.grad_dot(x, g, torch.randn(2, 3))
    monkeypatch.setenv("FASTATTR_STRICT", "1")
    with pytest.raises(RuntimeError, match="FASTATTR_STRICT"):
        ops.grad_dot(x, g, torch.randn(2, 3))


def test_grad_dot_zero_width_input_keeps_the_bias_term():
    k = kernel("grad_dot")
    x, g = torch.randn(6, 3, 0), torch.randn(6, 3, 4)
    bias = torch.randn(4)
    torch.testing.assert_close(k(x, g, torch.randn(4, 0), bias), reference.grad_dot(x, g, torch.randn(4, 0), bias))


@pytest.mark.parametrize("reduce", ["max", "min"])
def test_grad_sim_reduce_max_min_propagate_nan(reduce):
    k = kernel("grad_sim_reduce")
    xa, ga = make_layer(4, 1, 3, 2, torch.float64, flat=True)
    xb, gb = make_layer(300, 1, 3, 2, torch.float64, flat=True, seed=2)
    xb[257, 0] = float("nan")  # in the second block of targets
    out = k([xa], [ga], [xb], [gb], reduce, 0.0)
    assert torch.isnan(out).all()
    torch.testing.assert_close(out, reference.grad_sim_reduce([xa], [ga], [xb], [gb], reduce), equal_nan=True)
