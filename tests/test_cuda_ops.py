"""The CUDA kernels (torch.ops.fastattr.* on CUDA tensors) against the float64 reference, torch's own error, the CPU
kernels, opcheck, torch.compile, streams and CUDA graphs.

Every test here is marked `cuda` and skipped (never passed) unless a GPU is visible *and* fastattr._C has the CUDA
kernels registered. Run on a GPU machine with `pytest -m cuda tests/test_cuda_ops.py` (benchmarks/gpu_check.sh does).
Engines: "auto" is what users get (tensor cores for fp16/bf16, CUDA cores for fp32/fp64); "simt" sets
FASTATTR_CUDA_SIMT=1 so the CUDA-core engine (the pre-sm_80 path) is covered too; FASTATTR_CUDA_TILED=1 forces the
tiled grad_dot kernel where the rowwise one would run. No gymnasium import anywhere on this path.
"""
import pytest
import torch

from fastattr import ops, reference
from fastattr.testing import error_vs_reference, make_layer, sample_inputs, within_tolerance

OPS = ["grad_dot", "grad_sim_reduce", "grad_norm"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _cuda_kernels_built() -> bool:
    return torch.cuda.is_available() and all(ops.has_kernel(op, "cuda") for op in OPS)


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _cuda_kernels_built(), reason="needs a GPU and fastattr._C built with its CUDA kernels"),
]


def kernel(op):
    return getattr(torch.ops.fastattr, op).default


@pytest.fixture(params=["auto", "simt"])
def engine(request, monkeypatch):
    if request.param == "simt":
        monkeypatch.setenv("FASTATTR_CUDA_SIMT", "1")
    else:
        monkeypatch.delenv("FASTATTR_CUDA_SIMT", raising=False)
    return request.param


def mlp_layers(n, widths, dtype, device="cuda", seed=0):
    """(x, g) per Linear layer of an MLP with the given widths, e.g. (8, 256, 256, 4)."""
    xs, gs = [], []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        x, g = make_layer(n, 1, d_in, d_out, dtype, device, seed=seed + i, flat=True)
        xs.append(x)
        gs.append(g)
    return xs, gs


# ---------------------------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_kernel_matches_fp64_reference(op, dtype, engine):
    for args in sample_inputs(op, "cuda", dtype):
        ours, torch_err, scale = error_vs_reference(op, args, kernel(op))
        assert within_tolerance(ours, torch_err, scale, dtype), (op, dtype, engine, ours, torch_err, scale)
        assert kernel(op)(*args).dtype == reference.score_dtype(dtype)


@pytest.mark.parametrize("path", ["auto", "tiled"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,t,d_in,d_out", [
    (1, 1, 8, 256), (129, 1, 256, 256), (4096 + 32, 1, 256, 4), (257, 3, 64, 65), (63, 2, 0, 5), (1000, 1, 33, 31),
])
def test_grad_dot_shapes(n, t, d_in, d_out, dtype, path, engine, monkeypatch):
    if path == "tiled":
        monkeypatch.setenv("FASTATTR_CUDA_TILED", "1")
    x, g = make_layer(n, t, d_in, d_out, dtype, "cuda", seed=n, flat=t == 1)
    target = torch.randn(d_out, d_in, device="cuda").to(dtype)
    bias = torch.randn(d_out, device="cuda").to(dtype)
    ours, torch_err, scale = error_vs_reference("grad_dot", (x, g, target, bias), kernel("grad_dot"))
    assert within_tolerance(ours, torch_err, scale, dtype), (ours, torch_err, scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", reference.REDUCTIONS)
def test_grad_sim_reduce_mlp_shapes(reduce, dtype, engine):
    # MLP 8-256-256-4 with ragged N (not a multiple of 128) and M (not a multiple of 64), several target splits.
    xa, ga = mlp_layers(1000, (8, 256, 256, 4), dtype, seed=1)
    xb, gb = mlp_layers(300, (8, 256, 256, 4), dtype, seed=11)
    threshold = 0.0 if reduce != "count_gt" else 0.05
    args = (xa, ga, xb, gb, reduce, threshold)
    ours, torch_err, scale = error_vs_reference("grad_sim_reduce", args, kernel("grad_sim_reduce"))
    if reduce == "count_gt":  # a count moves by whole units when a value sits next to the threshold
        full = kernel("grad_sim_reduce")(xa, ga, xb, gb, "none", 0.0)
        assert torch.equal(kernel("grad_sim_reduce")(*args), (full > threshold).sum(1).to(full.dtype))
    else:
        assert within_tolerance(ours, torch_err, scale, dtype), (reduce, dtype, engine, ours, torch_err, scale)


def test_grad_sim_reduce_epilogue_matches_full_matrix(engine):
    k = kernel("grad_sim_reduce")
    xa, ga = make_layer(1300, 2, 33, 20, torch.float64, "cuda", seed=3)
    xb, gb = make_layer(700, 3, 33, 20, torch.float64, "cuda", seed=4)
    full = k([xa], [ga], [xb], [gb], "none", 0.0)
    assert full.shape == (1300, 700)
    assert torch.equal(k([xa], [ga], [xb], [gb], "max", 0.0), full.amax(1))
    assert torch.equal(k([xa], [ga], [xb], [gb], "min", 0.0), full.amin(1))
    torch.testing.assert_close(k([xa], [ga], [xb], [gb], "mean", 0.0), full.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k([xa], [ga], [xb], [gb], "sum", 0.0), full.sum(1), rtol=1e-12, atol=1e-12)
    assert torch.equal(k([xa], [ga], [xb], [gb], "count_gt", 0.1), (full > 0.1).sum(1).double())


@pytest.mark.parametrize("op", ["grad_dot", "grad_sim_reduce"])
def test_tf32_follows_torch_matmul_precision(op, monkeypatch):
    """fp32 uses TF32 tensor cores only when torch allows TF32 matmuls; its error then stays near torch's TF32 error."""
    monkeypatch.delenv("FASTATTR_CUDA_SIMT", raising=False)
    monkeypatch.setenv("FASTATTR_CUDA_TILED", "1")
    xa, ga = mlp_layers(700, (8, 256, 256, 4), torch.float32, seed=5)
    xb, gb = mlp_layers(200, (8, 256, 256, 4), torch.float32, seed=6)
    args = (xa[1], ga[1], torch.randn(256, 256, device="cuda"), None) if op == "grad_dot" else (xa, ga, xb, gb,
                                                                                                 "max", 0.0)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        exact_path = kernel(op)(*args)
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32_path = kernel(op)(*args)
        ours, torch_err, scale = error_vs_reference(op, args, kernel(op))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert not torch.equal(exact_path, tf32_path), "allow_tf32 did not switch grad kernels to TF32"
    assert ours <= 3 * torch_err + 1e-6 * scale, (ours, torch_err, scale)


def test_more_layers_than_one_launch_takes():
    k = kernel("grad_sim_reduce")
    xa, ga = mlp_layers(100, [6] * 21, torch.float64, seed=7)  # 20 layers > kMaxLayers = 16
    xb, gb = mlp_layers(40, [6] * 21, torch.float64, seed=8)
    for reduce in ("none", "sum", "mean"):
        torch.testing.assert_close(k(xa, ga, xb, gb, reduce, 0.0), reference.grad_sim_reduce(xa, ga, xb, gb, reduce),
                                   rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="at most 16 layers"):
        k(xa, ga, xb, gb, "max", 0.0)
    torch.testing.assert_close(kernel("grad_norm")(xa, ga), reference.grad_norm(xa, ga), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- determinism, devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic(dtype):
    xa, ga = mlp_layers(3000, (8, 256, 256, 4), dtype, seed=9)
    xb, gb = mlp_layers(2048, (8, 256, 256, 4), dtype, seed=10)
    for reduce in ("sum", "max", "count_gt"):
        first = kernel("grad_sim_reduce")(xa, ga, xb, gb, reduce, 0.0)
        assert torch.equal(first, kernel("grad_sim_reduce")(xa, ga, xb, gb, reduce, 0.0))
    target = torch.randn(256, 256, device="cuda").to(dtype)
    first = kernel("grad_dot")(xa[1], ga[1], target, None)
    assert torch.equal(first, kernel("grad_dot")(xa[1], ga[1], target, None))


@pytest.mark.parametrize("op", OPS)
def test_cuda_matches_cpu_kernel(op):
    for args in sample_inputs(op, "cpu", torch.float64):
        on_gpu = tuple(
            a.cuda() if isinstance(a, torch.Tensor) else [b.cuda() for b in a] if isinstance(a, list) else a
            for a in args)
        cpu, gpu = kernel(op)(*args), kernel(op)(*on_gpu)
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu():
    x, g = make_layer(300, 1, 64, 48, torch.float32, "cuda:1", flat=True)
    target = torch.randn(48, 64, device="cuda:1")
    out = kernel("grad_dot")(x, g, target, None)
    assert out.device == torch.device("cuda:1")
    torch.testing.assert_close(out, reference.grad_dot(x.double(), g.double(), target.double()).float(),
                               rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- streams and graphs
def _map(fn, args):
    """fn applied to every tensor of an op's argument tuple (tensors and lists of tensors)."""
    return tuple(fn(a) if isinstance(a, torch.Tensor) else [fn(b) for b in a] if isinstance(a, list) else a
                 for a in args)


@pytest.mark.parametrize("op", OPS)
def test_runs_on_the_current_stream(op):
    """Inputs written on a side stream after a ~50 ms spin: a kernel launched on any other stream reads NaNs."""
    args = sample_inputs(op, "cuda", torch.float32)[-1]
    expected = kernel(op)(*args)
    delayed = _map(lambda a: torch.full_like(a, float("nan")), args)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        for dst, src in zip(_flat(delayed), _flat(args)):
            dst.copy_(src)
        out = kernel(op)(*delayed)
    side.synchronize()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def _flat(args):
    return [t for a in args for t in (a if isinstance(a, list) else [a] if isinstance(a, torch.Tensor) else [])]


@pytest.mark.parametrize("op", OPS)
def test_cuda_graph_capture_and_replay(op):
    """The 2,048-record latency path captures the ops in a CUDA graph: capture must work and replay must read the
    captured buffers' new contents."""
    args = sample_inputs(op, "cuda", torch.float32)[-1]
    static = _map(torch.clone, args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        kernel(op)(*static)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernel(op)(*static)
    for dst, src in zip(_flat(static), _flat(args)):
        dst.copy_(src * 0.5)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, kernel(op)(*_map(lambda a: a * 0.5, args)), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- op contract
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    for args in sample_inputs(op, "cuda", torch.float32):
        torch.library.opcheck(kernel(op), args)  # forward-only ops (a backward is an error, tests/test_ops.py)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("op", OPS)
def test_torch_compile_fullgraph(op, backend):
    if backend == "inductor" and op != "grad_dot":
        pytest.skip("one inductor case is enough (compile time)")
    fn = kernel(op)
    compiled = torch.compile(lambda *a: fn(*a) * 2, fullgraph=True, backend=backend)
    args = sample_inputs(op, "cuda", torch.float32)[-1]
    torch.testing.assert_close(compiled(*args), fn(*args) * 2)


def test_wrapper_uses_the_cuda_kernel(monkeypatch):
    monkeypatch.setenv("FASTATTR_STRICT", "1")  # a fallback to the reference would raise
    x, g = make_layer(10, 1, 4, 3, device="cuda", flat=True)
    assert ops.grad_dot(x, g, torch.randn(3, 4, device="cuda")).device.type == "cuda"
    assert ops.grad_norm([x], [g]).shape == (10,)
    assert ops.grad_sim_reduce([x], [g], [x], [g], "max").shape == (10,)


# ---------------------------------------------------------------------------------------------- edge cases
def test_zero_records_and_zero_targets():
    x, g = make_layer(0, 1, 4, 3, device="cuda", flat=True)
    y, h = make_layer(5, 1, 4, 3, device="cuda", flat=True)
    assert kernel("grad_dot")(x, g, torch.randn(3, 4, device="cuda"), None).shape == (0,)
    assert kernel("grad_sim_reduce")([x], [g], [y], [h], "none", 0.0).shape == (0, 5)
    assert kernel("grad_sim_reduce")([y], [h], [x], [g], "none", 0.0).shape == (5, 0)
    assert kernel("grad_sim_reduce")([y], [h], [x], [g], "sum", 0.0).eq(0).all()
    assert kernel("grad_sim_reduce")([y], [h], [x], [g], "count_gt", 0.0).eq(0).all()
    with pytest.raises(RuntimeError, match="M=0"):
        kernel("grad_sim_reduce")([y], [h], [x], [g], "max", 0.0)
    assert kernel("grad_norm")([x], [g]).shape == (0,)
    # zero positions / zero widths: exact zeros (or the bias term), no launch failure
    x0, g0 = make_layer(6, 0, 4, 3, device="cuda")
    assert kernel("grad_dot")(x0, g0, torch.randn(3, 4, device="cuda"), None).eq(0).all()
    xe, ge = make_layer(6, 1, 0, 3, torch.float64, device="cuda", flat=True)
    b = torch.randn(3, device="cuda", dtype=torch.float64)
    torch.testing.assert_close(kernel("grad_dot")(xe, ge, torch.zeros(3, 0, device="cuda", dtype=torch.float64), b),
                               ge @ b)


def test_non_contiguous_inputs():
    x, g = make_layer(500, 3, 40, 36, torch.float64, "cuda", seed=9)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous strides
    gt = g.transpose(0, 1).contiguous().transpose(0, 1)
    target = torch.randn(40, 36, dtype=torch.float64, device="cuda").t()  # non-contiguous [36, 40]
    assert not xt.is_contiguous() and not target.is_contiguous()
    torch.testing.assert_close(kernel("grad_dot")(xt, gt, target, None), reference.grad_dot(x, g, target),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kernel("grad_sim_reduce")([xt], [gt], [xt[:70]], [gt[:70]], "none", 0.0),
                               reference.grad_sim([x], [g], [x[:70]], [g[:70]]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kernel("grad_norm")([xt], [gt]), reference.grad_norm([x], [g]), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("bad,match", [
    (lambda x, g, t: (x[:3], g, t, None), "disagree on N"),
    (lambda x, g, t: (x, g, t.t(), None), "target must be"),
    (lambda x, g, t: (x, g, t, torch.randn(7, device="cuda")), "target_bias must be"),
    (lambda x, g, t: (x.double(), g, t, None), "dtype"),
    (lambda x, g, t: (x[0], g, t, None), r"\[N, d\] or \[N, T, d\]"),
    (lambda x, g, t: (x, g, t.cpu(), None), "different devices"),
])
def test_grad_dot_bad_shapes_raise(bad, match):
    x, g = make_layer(5, 1, 4, 3, device="cuda", flat=True)
    with pytest.raises(RuntimeError, match=match):
        kernel("grad_dot")(*bad(x, g, torch.randn(3, 4, device="cuda")))


def test_grad_sim_reduce_bad_input_raises():
    k = kernel("grad_sim_reduce")
    x, g = make_layer(5, 1, 4, 3, device="cuda", flat=True)
    y, h = make_layer(6, 1, 4, 3, device="cuda", flat=True)
    with pytest.raises(RuntimeError, match="reduce must be one of"):
        k([x], [g], [y], [h], "median", 0.0)
    with pytest.raises(RuntimeError, match="one entry per layer"):
        k([x, x], [g], [y], [h], "sum", 0.0)
    with pytest.raises(RuntimeError, match="disagree on d_in"):
        k([x], [g], [y[:, :3]], [h], "sum", 0.0)
    with pytest.raises(RuntimeError, match="a and b sides differ"):
        k([x], [g], [y.cpu()], [h.cpu()], "sum", 0.0)


# ---------------------------------------------------------------------------------------------- 64-bit indexing
@pytest.mark.parametrize("op", OPS + ["grad_dot_rowwise"])
def test_int64_indexing(op):
    """N * d_in > 2^31 elements: offsets must be computed in 64 bits (TRAK's 32-bit trap)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    n, d_in = 2**22 + 3, 512  # 2^31 + 1536 elements of x
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d_in, device="cuda", dtype=torch.bfloat16, generator=gen)
    g = torch.randn(n, 40, device="cuda", dtype=torch.bfloat16, generator=gen)
    if op == "grad_dot_rowwise":  # d_out = 4: one warp per record
        g = g[:, :4].contiguous()
    if op.startswith("grad_dot"):
        target = torch.randn(g.shape[1], d_in, device="cuda", dtype=torch.bfloat16, generator=gen)
        out = kernel("grad_dot")(x, g, target, None)
        ref = lambda s: reference.grad_dot(x[s].double(), g[s].double(), target.double())  # noqa: E731
    elif op == "grad_norm":
        out = kernel(op)([x], [g])
        ref = lambda s: reference.grad_norm([x[s].double()], [g[s].double()])  # noqa: E731
    else:
        xb, gb = x[-37:].clone(), g[-37:].clone()
        out = kernel(op)([x], [g], [xb], [gb], "max", 0.0)
        ref = lambda s: reference.grad_sim_reduce([x[s].double()], [g[s].double()], [xb.double()],  # noqa: E731
                                                  [gb.double()], "max")
    for s in (slice(0, 1024), slice(n - 1024, n)):  # the first rows and the rows past 2^31 elements
        want = ref(s)
        torch.testing.assert_close(out[s].double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
