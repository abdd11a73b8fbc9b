"""Per-op benchmark of the fastattr kernels against eager torch, a device-to-device copy floor and a roofline estimate.

Cases (GPU shapes; --device cpu or no GPU uses the small shapes in brackets):
  aggregated  grad_dot over the layers of an MLP 8-256-256-4, N = 65,536 [4,096]: the aggregated-target scorer
  pairwise    grad_sim_reduce of the same MLP against M = 2,048 [256] targets, reduce="max", then a top-k over N
  norm        grad_norm of the same layers (ghost norms, for cosine similarity)
  latency     MLP 8-64-64-4, N = 2,048: one plain forward+backward vs scoring (forward, output gradients, grad_dot
              per layer), eager and as one CUDA-graph replay
Rows per case: `kernel` (torch.ops.fastattr), `reference` (fastattr.reference, eager torch; it computes in float32
for bf16 inputs, so a bf16 speedup_vs_reference is against fp32 eager, casts included), `copy` (clone of the
inputs: the memory floor, fast-hadamard style) and the `roofline` estimate max(FLOP / peak, bytes / HBM bandwidth)
from the spec-sheet peaks of the GPU (PEAKS below; none on CPU). Every kernel cell is first checked against the
float64 reference on a slice of rows (error <= 2x torch's own error, fastattr.testing.within_tolerance).
FASTATTR_STRICT=1 is set, so a missing kernel fails instead of timing the pure-torch fallback.
dtypes: fp32 (CUDA cores), tf32 (fp32 inputs with torch.backends.cuda.matmul.allow_tf32), bf16 (tensor cores).

    python benchmarks/bench_ops.py                      # everything, on cuda when available
    python benchmarks/bench_ops.py --device cpu --quick  # smoke test of the script on CPU
    python benchmarks/bench_ops.py --case pairwise --dtype bf16
Output: a table on stdout and JSON lines appended to $OUT/bench_ops.jsonl (device machine) or
benchmarks/results/bench_ops.jsonl.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

os.environ["FASTATTR_STRICT"] = "1"

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.benchmark import Compare, Timer  # noqa: E402

from fastattr import ops, reference  # noqa: E402
from fastattr.info import cpu_model, provenance  # noqa: E402
from fastattr.testing import within_tolerance  # noqa: E402

# Dense spec-sheet peaks: TFLOP/s for fp32 (CUDA cores), tf32 and bf16 (tensor cores), and HBM TB/s.
PEAKS = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "hbm": 4.8},
    "H100 SXM": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "hbm": 3.35},
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "hbm": 2.0},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "hbm": 3.35},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "hbm": 2.0},
}
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}
CASES = ("aggregated", "pairwise", "norm", "latency")


def peaks_for(device: torch.device) -> dict | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAKS.items():  # most specific first
        if all(word in name for word in key.split()):
            return peaks
    return None


class TF32:
    """Context manager: fp32 matmuls (torch's and fastattr's) may use TF32 tensor cores."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.old


# ------------------------------------------------------------------------------------------------ inputs
def mlp_layers(n: int, widths: tuple[int, ...], dtype, device, seed: int):
    """Per Linear layer: x [n, d_in] (activations of tanh-like spread) and g [n, d_out] (small output gradients)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    xs, gs = [], []
    for d_in, d_out in zip(widths[:-1], widths[1:]):
        xs.append(torch.randn(n, d_in, device=device, generator=gen).tanh().to(dtype))
        gs.append((0.1 * torch.randn(n, d_out, device=device, generator=gen)).to(dtype))
    return xs, gs


def layer_bytes(xs, gs) -> int:
    return sum(t.numel() * t.element_size() for t in xs + gs)


# ------------------------------------------------------------------------------------------------ measurement
class Bench:
    def __init__(self, device: torch.device, min_run_time: float, out_path: Path, run_id: str):
        self.device, self.min_run_time, self.out_path, self.run_id = device, min_run_time, out_path, run_id
        self.results = []
        self.peaks = peaks_for(device)
        self.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
        self.threads = torch.get_num_threads()  # every cell is timed on this many threads (Timer's default is 1)
        self.meta = {**provenance(packages=("numpy",)), "device": self.device_name, "run": run_id,
                     "threads": self.threads}

    def time(self, fn, label: str, sub_label: str, impl: str):
        m = Timer("fn()", globals={"fn": fn}, label=label, sub_label=sub_label, description=impl,
                  num_threads=self.threads).blocked_autorange(min_run_time=self.min_run_time)
        self.results.append(m)
        return m

    def peak_extra_mb(self, fn) -> float | None:
        """Memory the call allocates on top of what is live (CUDA only): shows that nothing O(N * M) or O(N * P)
        is formed."""
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        out = fn()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated(self.device) - base
        del out
        return extra / 2**20

    def roofline_us(self, flops: float, nbytes: float, precision: str) -> float | None:
        if self.peaks is None:
            return None
        return max(flops / (self.peaks[precision] * 1e12), nbytes / (self.peaks["hbm"] * 1e12)) * 1e6

    def record(self, **row):
        row = {**self.meta, **row}
        with open(self.out_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        parts = [f"{row['case']:<10} {row['dtype']:<5} {row['impl']:<14} {row['median_us']:>11.1f} us"]
        for key in ("x_roofline", "x_copy", "speedup_vs_reference", "x_fwd_bwd", "peak_extra_mb"):
            if row.get(key) is not None:
                parts.append(f"{key}={row[key]:.2f}")
        print("  ".join(parts), flush=True)


class CorrectnessError(AssertionError):
    pass


def check_rows(name: str, kernel_out: torch.Tensor, ref_fn, rows: slice, dtype) -> None:
    """kernel_out[rows] against the float64 reference of those rows, with torch's own error as the yardstick
    (2x, as in the tests; 3x under TF32, where both round their inputs and only the rounding mode may differ)."""
    exact = ref_fn(rows, torch.float64).double()
    torch_err = (ref_fn(rows, None).double() - exact).abs().max().item()
    ours = (kernel_out[rows].double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and kernel_out.is_cuda
    ok = ours <= 3 * torch_err + 1e-6 * max(scale, 1.0) if tf32 else within_tolerance(ours, torch_err, scale, dtype)
    if not ok:
        raise CorrectnessError(f"{name}: kernel error {ours:.3e} vs torch's {torch_err:.3e} (scale {scale:.3e})")


def cast(ts, dtype):
    return [t if dtype is None else t.to(dtype) for t in ts]


# ------------------------------------------------------------------------------------------------ cases
def case_aggregated(b: Bench, n: int, widths, tag: str):
    dtype = DTYPES[tag]
    xs, gs = mlp_layers(n, widths, dtype, b.device, seed=0)
    gen = torch.Generator(device=b.device).manual_seed(1)
    targets = [torch.randn(o, i, device=b.device, generator=gen).to(dtype) for i, o in zip(widths[:-1], widths[1:])]
    biases = [torch.randn(o, device=b.device, generator=gen).to(dtype) for o in widths[1:]]
    k = torch.ops.fastattr.grad_dot.default

    def kernel():
        return sum(k(x, g, t, bb) for x, g, t, bb in zip(xs, gs, targets, biases))

    def ref():
        return sum(reference.grad_dot(x, g, t, bb) for x, g, t, bb in zip(xs, gs, targets, biases))

    def copy():
        return [t.clone() for t in xs + gs]

    def ref_rows(rows, dt):
        return sum(reference.grad_dot(*cast([x[rows], g[rows], t, bb], dt)) for x, g, t, bb in
                   zip(xs, gs, targets, biases))

    shape = f"N={n} MLP {'-'.join(map(str, widths))}"
    with TF32(tag == "tf32"):
        check_rows(f"aggregated {tag}", kernel(), ref_rows, slice(0, min(n, 4096)), dtype)
        flops = sum(2 * n * i * o + 2 * n * o for i, o in zip(widths[:-1], widths[1:]))
        nbytes = layer_bytes(xs, gs) + 4 * n
        run_rows(b, "aggregated", shape, tag, kernel, ref, copy, flops, nbytes)


def case_pairwise(b: Bench, n: int, m: int, widths, tag: str, k_top: int):
    dtype = DTYPES[tag]
    xa, ga = mlp_layers(n, widths, dtype, b.device, seed=2)
    xb, gb = mlp_layers(m, widths, dtype, b.device, seed=3)
    sim = torch.ops.fastattr.grad_sim_reduce.default

    def kernel():
        s = sim(xa, ga, xb, gb, "max", 0.0)
        return torch.topk(s, k_top).indices

    def ref():
        s = reference.grad_sim_reduce(xa, ga, xb, gb, "max")
        return torch.topk(s, k_top).indices

    def copy():
        return [t.clone() for t in xa + ga + xb + gb]

    def ref_rows(rows, dt):
        return reference.grad_sim_reduce(cast([x[rows] for x in xa], dt), cast([g[rows] for g in ga], dt),
                                         cast(xb, dt), cast(gb, dt), "max")

    shape = f"N={n} M={m} MLP {'-'.join(map(str, widths))} max+top{k_top}"
    with TF32(tag == "tf32"):
        check_rows(f"pairwise {tag}", sim(xa, ga, xb, gb, "max", 0.0), ref_rows, slice(0, min(n, 2048)), dtype)
        d_sum = sum(i + o for i, o in zip(widths[:-1], widths[1:]))
        flops = 2 * n * m * d_sum + 3 * n * m * (len(widths) - 1)
        nbytes = layer_bytes(xa, ga) + layer_bytes(xb, gb) + 4 * n
        run_rows(b, "pairwise", shape, tag, kernel, ref, copy, flops, nbytes)


def case_norm(b: Bench, n: int, widths, tag: str):
    dtype = DTYPES[tag]
    xs, gs = mlp_layers(n, widths, dtype, b.device, seed=4)
    norm = torch.ops.fastattr.grad_norm.default

    def ref_rows(rows, dt):
        return reference.grad_norm(cast([x[rows] for x in xs], dt), cast([g[rows] for g in gs], dt))

    shape = f"N={n} MLP {'-'.join(map(str, widths))}"
    check_rows(f"norm {tag}", norm(xs, gs), ref_rows, slice(0, min(n, 4096)), dtype)
    flops = 2 * n * sum(i + o for i, o in zip(widths[:-1], widths[1:]))
    run_rows(b, "norm", shape, tag, lambda: norm(xs, gs), lambda: reference.grad_norm(xs, gs),
             lambda: [t.clone() for t in xs + gs], flops, layer_bytes(xs, gs) + 4 * n)


def run_rows(b: Bench, case: str, shape: str, tag: str, kernel, ref, copy, flops: float, nbytes: float):
    tk = b.time(kernel, case, f"{shape} {tag}", "kernel")
    tr = b.time(ref, case, f"{shape} {tag}", "reference")
    tc = b.time(copy, case, f"{shape} {tag}", "copy")
    roof = b.roofline_us(flops, nbytes, tag)
    common = {"case": case, "shape": shape, "dtype": tag, "flops": flops, "bytes": nbytes, "roofline_us": roof,
              "copy_us": tc.median * 1e6}
    b.record(**common, impl="kernel", median_us=tk.median * 1e6, iqr_us=tk.iqr * 1e6,
             x_roofline=None if roof is None else tk.median * 1e6 / roof, x_copy=tk.median / tc.median,
             speedup_vs_reference=tr.median / tk.median, peak_extra_mb=b.peak_extra_mb(kernel),
             reference_computes_in={"bf16": "float32 (upcast)", "tf32": "tf32"}.get(tag, "float32"))
    b.record(**common, impl="reference", median_us=tr.median * 1e6, iqr_us=tr.iqr * 1e6,
             x_roofline=None if roof is None else tr.median * 1e6 / roof, x_copy=tr.median / tc.median,
             peak_extra_mb=b.peak_extra_mb(ref))
    b.record(**common, impl="copy", median_us=tc.median * 1e6, iqr_us=tc.iqr * 1e6)
    if roof is not None:
        b.record(**common, impl="roofline", median_us=roof)


def case_latency(b: Bench, n: int, hidden: int):
    """Scoring a small buffer end to end, against one plain forward+backward of the actor."""
    dev = b.device
    torch.manual_seed(0)
    actor = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                          nn.Linear(hidden, 4)).to(dev)
    linears = [m for m in actor if isinstance(m, nn.Linear)]
    params = list(actor.parameters())
    gen = torch.Generator(device=dev).manual_seed(5)
    obs = torch.randn(n, 8, device=dev, generator=gen)
    act = torch.randint(0, 4, (n,), device=dev, generator=gen)
    adv = torch.randn(n, device=dev, generator=gen)

    def logp(logits, a=act):
        return torch.log_softmax(logits, -1).gather(1, a[:, None]).squeeze(1)

    # The aggregated target (gradient of the mean advantage-weighted log-likelihood), computed once.
    target = torch.autograd.grad(-(adv * logp(actor(obs))).mean(), params)
    t_w, t_b = target[0::2], target[1::2]
    grad_dot = torch.ops.fastattr.grad_dot.default

    def fwd_bwd():
        return torch.autograd.grad(-(adv * logp(actor(obs))).sum(), params)

    def score():
        xs, zs, h = [], [], obs
        for i, lin in enumerate(linears):
            xs.append(h)
            z = lin(h)
            zs.append(z)
            h = torch.tanh(z) if i + 1 < len(linears) else z
        gs = torch.autograd.grad(-(adv * logp(h)).sum(), zs)  # per-record output gradients (rows independent)
        return sum(grad_dot(x.detach(), g, w, bb) for x, g, w, bb in zip(xs, gs, t_w, t_b))

    # correctness: per-record gradient dot products by brute force on a few records
    got = score()
    for i in (0, n // 2, n - 1):
        gi = torch.autograd.grad(-(adv[i] * logp(actor(obs[i:i + 1]), act[i:i + 1])).sum(), params)
        want = sum((a * t).sum() for a, t in zip(gi, target)).item()
        assert abs(got[i].item() - want) <= 1e-4 * max(1.0, abs(want)), (i, got[i].item(), want)

    shape = f"N={n} MLP 8-{hidden}-{hidden}-4"
    rows = [("fwd+bwd", fwd_bwd), ("score", score)]
    if dev.type == "cuda":
        rows += [("fwd+bwd graph", graphed(fwd_bwd)), ("score graph", graphed(score))]
    base = {}  # eager rows over the eager fwd+bwd, graph rows over the graphed fwd+bwd
    for impl, fn in rows:
        t = b.time(fn, "latency", shape, impl)
        mode = "graph" if impl.endswith("graph") else "eager"
        base.setdefault(mode, t.median)
        b.record(case="latency", shape=shape, dtype="fp32", impl=impl, median_us=t.median * 1e6, iqr_us=t.iqr * 1e6,
                 x_fwd_bwd=t.median / base[mode])


def graphed(fn):
    """fn captured in a CUDA graph; calling the result replays it (one launch)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn()
    ref = fn()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(static_out if isinstance(static_out, (tuple, list)) else [static_out],
                    ref if isinstance(ref, (tuple, list)) else [ref]):
        torch.testing.assert_close(a, b)
    return graph.replay


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--case", choices=CASES, action="append", help="repeatable; default: all")
    p.add_argument("--dtype", choices=list(DTYPES), action="append", help="repeatable; default: fp32 tf32 bf16")
    p.add_argument("--quick", action="store_true", help="small shapes and short timings (smoke test)")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per measurement")
    p.add_argument("--out", default=os.getenv("OUT") or str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    for op in ops.OPS:
        if not ops.has_kernel(op, device):
            sys.exit(f"bench_ops: no {device.type} kernel for {op} is built; build fastattr._C first "
                     f"(FASTATTR_FORCE_CUDA=1 for the CUDA kernels)")
    tags = args.dtype or (["fp32", "tf32", "bf16"] if gpu else ["fp32", "bf16"])
    big = gpu and not args.quick
    n, m, k_top = (65_536, 2_048, 655) if big else (4_096, 256, 41)
    widths = (8, 256, 256, 4)
    min_run_time = args.min_run_time or (0.3 if big else 0.1)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_id = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    b = Bench(device, min_run_time, out_dir / "bench_ops.jsonl", run_id)
    print(f"bench_ops on {b.device_name} ({device}), torch {torch.__version__}, peaks {b.peaks}, "
          f"results -> {b.out_path}", flush=True)

    failures = []
    for case in args.case or CASES:
        for tag in tags if case != "latency" else ["fp32"]:
            try:  # a cell that fails its correctness check is reported and not timed; the others still run
                if case == "aggregated":
                    case_aggregated(b, n, widths, tag)
                elif case == "pairwise":
                    case_pairwise(b, n if big else 1024, m, widths, tag, k_top)
                elif case == "norm" and tag != "tf32":
                    case_norm(b, n, widths, tag)
                elif case == "latency":
                    case_latency(b, 2_048, 64)
            except (CorrectnessError, AssertionError) as e:
                failures.append(f"{case} {tag}: {e}")
                print(f"CORRECTNESS FAILURE {case} {tag}: {e}", flush=True)
                with open(b.out_path, "a") as f:
                    f.write(json.dumps({**b.meta, "case": case, "dtype": tag, "impl": "kernel", "error": str(e)}) + "\n")
    if b.results:
        Compare(b.results).print()
    if failures:
        sys.exit(f"bench_ops: {len(failures)} cell(s) failed their correctness check:\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
