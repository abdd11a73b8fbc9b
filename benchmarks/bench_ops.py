"""Per-op benchmark of the fastattr kernels against eager torch, a copy floor and a FLOP floor; and the crossovers
between the kernel, eager and reference paths that fastattr.ops.choose (backend="auto") reads.

Cases (GPU shapes; CPU shapes in brackets; --quick: small shapes on either device):
  aggregated  grad_dot over the layers of an MLP 8-256-256-4, N = 65,536 [65,536]: the aggregated-target scorer
  pairwise    grad_sim_reduce of the same MLP against M = 2,048 [2,048] targets, reduce="max", then a top-k over N
              (1% of N), N = 65,536 [16,384]
  norm        grad_norm of the same layers (ghost norms, for cosine similarity)
  latency     MLP 8-64-64-4, N = 2,048: one plain forward+backward vs scoring (forward, output gradients, grad_dot
              per layer), eager and as one CUDA-graph replay
Rows per case: `kernel` (torch.ops.fastattr), `eager` (fastattr.ops with backend="eager": one GEMM and a row-dot per
layer for grad_dot, per-layer Gram GEMMs chunked over N for grad_sim_reduce), `reference` (fastattr.reference, eager
torch as written: grad_sim_reduce forms the whole [N, M] matrix; it computes in float32 for bf16 inputs, so a bf16
speedup_vs_reference is against fp32 eager, casts included), `copy` (clone of the inputs: the memory floor) and
`floor`: on a GPU the roofline max(FLOP / peak, bytes / HBM bandwidth) from the spec-sheet peaks (PEAKS below); on
CPU FLOP / the GEMM rate of this machine, measured in the same run (a 2,048^3 torch.mm on the same thread count, in
the accumulation dtype). The implementations of a case are timed interleaved: every round times each once (a rep
count fixed up front), medians over rounds, and every ratio is the median of the per-round ratios, so load drifting
on a shared machine cancels out. Every kernel and eager cell is first checked against the float64 reference on a
slice of rows (error <= 2x torch's own error, fastattr.testing.within_tolerance). FASTATTR_STRICT=1 is set, so a
missing kernel fails instead of timing the pure-torch fallback.
dtypes: fp32 (CUDA cores), tf32 (fp32 inputs with torch.backends.cuda.matmul.allow_tf32), bf16 (tensor cores); on
CPU fp32 and bf16 (computed in float32), fp64 on request.

    python benchmarks/bench_ops.py                      # everything, on cuda when available
    python benchmarks/bench_ops.py --device cpu --case pairwise
    python benchmarks/bench_ops.py --device cpu --quick  # smoke test of the script on CPU
    python benchmarks/bench_ops.py --case pairwise --dtype bf16
    python benchmarks/bench_ops.py --record-crossovers [--device cpu|cuda] [--threads 1]  # fastattr/crossovers.py
Output: a table on stdout and JSON lines appended to $OUT/bench_ops.jsonl (device machine) or
benchmarks/results/bench_ops.jsonl. --record-crossovers times the three paths of every op over a grid of shapes
(SWEEP below) for each precision of the device, derives one rule per (op, device, precision) (derive_rule) and
rewrites fastattr/crossovers.py, replacing that device's rules and keeping the others'; a copy goes to the output
folder (so a device machine's run can be brought back).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pprint
import statistics
import sys
from pathlib import Path

os.environ["FASTATTR_STRICT"] = "1"

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.benchmark import Timer  # noqa: E402

from fastattr import crossovers, ops, reference  # noqa: E402
from fastattr.info import cpu_model, provenance  # noqa: E402
from fastattr.testing import make_layer, within_tolerance  # noqa: E402

# Dense spec-sheet peaks: TFLOP/s for fp32 (CUDA cores), tf32 and bf16 (tensor cores), and HBM TB/s.
PEAKS = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "hbm": 4.8},
    "H100 SXM": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "hbm": 3.35},
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "hbm": 2.0},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "hbm": 3.35},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "hbm": 2.0},
}
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
CASES = ("aggregated", "pairwise", "norm", "latency")
CROSSOVERS_FILE = Path(crossovers.__file__)


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
def gemm_probe(device: torch.device, dtype: torch.dtype, size: int = 2048):
    """A large torch.mm in the accumulation dtype: its FLOP rate is the CPU floor's denominator. Returns (fn, flops)."""
    acc = reference.score_dtype(dtype)
    a = torch.randn(size, size, device=device, dtype=acc)
    b = torch.randn(size, size, device=device, dtype=acc)
    return (lambda: torch.mm(a, b)), 2 * size**3


def interleaved(fns: dict, threads: int, min_run_time: float, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of every fn, `rounds` rounds, each timing every fn once back to back with a rep count fixed
    up front (about min_run_time / rounds seconds per fn per round). {name: [seconds per round]}."""
    reps = {}
    for name, fn in fns.items():
        fn()  # warm-up (lazy initialisation, allocator, the first CUDA launch)
        once = Timer("fn()", globals={"fn": fn}, num_threads=threads).timeit(1).median
        reps[name] = max(1, int(min_run_time / rounds / max(once, 1e-7)))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(Timer("fn()", globals={"fn": fn}, num_threads=threads).timeit(reps[name]).median)
    return times


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[i] / b[i]."""
    return statistics.median(x / y for x, y in zip(a, b))


class Bench:
    def __init__(self, device: torch.device, min_run_time: float, rounds: int, out_path: Path, run_id: str):
        self.device, self.min_run_time, self.rounds = device, min_run_time, rounds
        self.out_path, self.run_id = out_path, run_id
        self.peaks = peaks_for(device)
        self.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
        self.threads = torch.get_num_threads()  # every cell is timed on this many threads (Timer's default is 1)
        self.meta = {**provenance(packages=("numpy",)), "device": self.device_name, "run": run_id,
                     "threads": self.threads}

    def times(self, fns: dict) -> dict[str, list[float]]:
        return interleaved(fns, self.threads, self.min_run_time, self.rounds)

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
        parts = [f"{row['case']:<10} {row['dtype']:<5} {row['impl']:<10} {row['median_us']:>12.1f} us"]
        for key in ("x_floor", "x_copy", "speedup_vs_eager", "speedup_vs_reference", "x_fwd_bwd", "peak_extra_mb"):
            if row.get(key) is not None:
                parts.append(f"{key}={row[key]:.2f}")
        print("  ".join(parts), flush=True)


class CorrectnessError(AssertionError):
    pass


def check_rows(name: str, out: torch.Tensor, ref_fn, rows: slice, dtype) -> None:
    """out[rows] against the float64 reference of those rows, with torch's own error as the yardstick (2x, as in
    the tests; 3x under TF32, where both round their inputs and only the rounding mode may differ)."""
    exact = ref_fn(rows, torch.float64).double()
    torch_err = (ref_fn(rows, None).double() - exact).abs().max().item()
    ours = (out[rows].double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and out.is_cuda
    ok = ours <= 3 * torch_err + 1e-6 * max(scale, 1.0) if tf32 else within_tolerance(ours, torch_err, scale, dtype)
    if not ok:
        raise CorrectnessError(f"{name}: error {ours:.3e} vs torch's {torch_err:.3e} (scale {scale:.3e})")


def cast(ts, dtype):
    return [t if dtype is None else t.to(dtype) for t in ts]


# ------------------------------------------------------------------------------------------------ cases
def case_aggregated(b: Bench, n: int, widths, tag: str):
    dtype = DTYPES[tag]
    xs, gs = mlp_layers(n, widths, dtype, b.device, seed=0)
    gen = torch.Generator(device=b.device).manual_seed(1)
    targets = [torch.randn(o, i, device=b.device, generator=gen).to(dtype) for i, o in zip(widths[:-1], widths[1:])]
    biases = [torch.randn(o, device=b.device, generator=gen).to(dtype) for o in widths[1:]]
    layers = list(zip(xs, gs, targets, biases))

    def path(backend):
        return lambda: sum(ops.grad_dot(x, g, t, bb, backend=backend) for x, g, t, bb in layers)

    def ref_rows(rows, dt):
        return sum(reference.grad_dot(*cast([x[rows], g[rows], t, bb], dt)) for x, g, t, bb in layers)

    shape = f"N={n} MLP {'-'.join(map(str, widths))}"
    with TF32(tag == "tf32"):
        for backend in ("kernel", "eager"):
            check_rows(f"aggregated {tag} {backend}", path(backend)(), ref_rows, slice(0, min(n, 4096)), dtype)
        flops = sum(2 * n * i * o + 2 * n * o for i, o in zip(widths[:-1], widths[1:]))
        nbytes = layer_bytes(xs, gs) + 4 * n
        run_rows(b, "aggregated", shape, tag, path("kernel"), path("eager"), path("reference"),
                 lambda: [t.clone() for t in xs + gs], flops, nbytes)


def case_pairwise(b: Bench, n: int, m: int, widths, tag: str, k_top: int):
    dtype = DTYPES[tag]
    xa, ga = mlp_layers(n, widths, dtype, b.device, seed=2)
    xb, gb = mlp_layers(m, widths, dtype, b.device, seed=3)

    def path(backend):
        return lambda: torch.topk(ops.grad_sim_reduce(xa, ga, xb, gb, "max", backend=backend), k_top).indices

    def ref_rows(rows, dt):
        return reference.grad_sim_reduce(cast([x[rows] for x in xa], dt), cast([g[rows] for g in ga], dt),
                                         cast(xb, dt), cast(gb, dt), "max")

    shape = f"N={n} M={m} MLP {'-'.join(map(str, widths))} max+top{k_top}"
    with TF32(tag == "tf32"):
        for backend in ("kernel", "eager"):
            check_rows(f"pairwise {tag} {backend}", ops.grad_sim_reduce(xa, ga, xb, gb, "max", backend=backend),
                       ref_rows, slice(0, min(n, 2048)), dtype)
        d_sum = sum(i + o for i, o in zip(widths[:-1], widths[1:]))
        flops = 2 * n * m * d_sum + 3 * n * m * (len(widths) - 1)
        nbytes = layer_bytes(xa, ga) + layer_bytes(xb, gb) + 4 * n
        run_rows(b, "pairwise", shape, tag, path("kernel"), path("eager"), path("reference"),
                 lambda: [t.clone() for t in xa + ga + xb + gb], flops, nbytes)


def case_norm(b: Bench, n: int, widths, tag: str):
    dtype = DTYPES[tag]
    xs, gs = mlp_layers(n, widths, dtype, b.device, seed=4)

    def ref_rows(rows, dt):
        return reference.grad_norm(cast([x[rows] for x in xs], dt), cast([g[rows] for g in gs], dt))

    shape = f"N={n} MLP {'-'.join(map(str, widths))}"
    check_rows(f"norm {tag}", ops.grad_norm(xs, gs, backend="kernel"), ref_rows, slice(0, min(n, 4096)), dtype)
    flops = 2 * n * sum(i + o for i, o in zip(widths[:-1], widths[1:]))
    run_rows(b, "norm", shape, tag, lambda: ops.grad_norm(xs, gs, backend="kernel"), None,
             lambda: reference.grad_norm(xs, gs), lambda: [t.clone() for t in xs + gs], flops,
             layer_bytes(xs, gs) + 4 * n)


def run_rows(b: Bench, case: str, shape: str, tag: str, kernel, eager, ref, copy, flops: float, nbytes: float):
    """Times kernel / eager (None: no separate eager form) / reference / copy interleaved, plus on CPU the GEMM
    probe whose rate gives the FLOP floor of each round."""
    fns = {"kernel": kernel, "eager": eager, "reference": ref, "copy": copy}
    fns = {k: f for k, f in fns.items() if f is not None}
    cpu = b.device.type == "cpu"
    if cpu:
        probe, probe_flops = gemm_probe(b.device, DTYPES[tag])
        fns["gemm"] = probe
    t = b.times(fns)
    if cpu:  # FLOP / this round's GEMM rate
        gemm = t.pop("gemm")
        floor = [flops * g / probe_flops for g in gemm]
        gemm_gflops = statistics.median(probe_flops / g for g in gemm) / 1e9
    else:
        roof = b.roofline_us(flops, nbytes, tag)
        floor = None if roof is None else [roof * 1e-6] * b.rounds
        gemm_gflops = None
    common = {"case": case, "shape": shape, "dtype": tag, "flops": flops, "bytes": nbytes, "rounds": b.rounds,
              "floor_kind": "measured GEMM rate" if cpu else "roofline", "gemm_gflops": gemm_gflops,
              "floor_us": None if floor is None else statistics.median(floor) * 1e6,
              "copy_us": statistics.median(t["copy"]) * 1e6}
    for impl, times in t.items():
        row = dict(common, impl=impl, median_us=statistics.median(times) * 1e6,
                   min_us=min(times) * 1e6, max_us=max(times) * 1e6)
        if impl != "copy":
            row["x_floor"] = None if floor is None else median_ratio(times, floor)
            row["x_copy"] = median_ratio(times, t["copy"])
        if impl == "kernel":
            row["speedup_vs_reference"] = median_ratio(t["reference"], times)
            row["speedup_vs_eager"] = median_ratio(t["eager"], times) if "eager" in t else None
            row["peak_extra_mb"] = b.peak_extra_mb(kernel)
            row["reference_computes_in"] = {"bf16": "float32 (upcast)", "tf32": "tf32"}.get(tag, "float32")
        elif impl == "eager":
            row["speedup_vs_reference"] = median_ratio(t["reference"], times)
            row["peak_extra_mb"] = b.peak_extra_mb(eager)
        elif impl == "reference":
            row["peak_extra_mb"] = b.peak_extra_mb(ref)
        b.record(**row)
    if floor is not None:
        b.record(**common, impl="floor", median_us=statistics.median(floor) * 1e6)


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
    rows = {"fwd+bwd": fwd_bwd, "score": score}
    if dev.type == "cuda":
        rows.update({"fwd+bwd graph": graphed(fwd_bwd), "score graph": graphed(score)})
    t = b.times(rows)
    for impl, times in t.items():  # eager rows over the eager fwd+bwd, graph rows over the graphed fwd+bwd
        base = t["fwd+bwd graph" if impl.endswith("graph") else "fwd+bwd"]
        b.record(case="latency", shape=shape, dtype="fp32", impl=impl, median_us=statistics.median(times) * 1e6,
                 x_fwd_bwd=median_ratio(times, base))


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


# ------------------------------------------------------------------------------------------------ crossovers
# Shapes per op, as ops.choose takes them: the layers of the scoring benchmarks' MLPs and a sequence layer, from a
# handful of records to the benchmark shapes, so that every threshold falls inside the measured range.
MLP_SMALL, MLP_BIG = ((8, 64), (64, 64), (64, 4)), ((8, 256), (256, 256), (256, 4))
SWEEP = {
    "grad_dot": [(n, 1, i, o) for n in (1, 64, 1024, 16384) for i, o in MLP_SMALL + MLP_BIG]
    + [(n, 16, 64, 64) for n in (4, 256)],
    "grad_sim_reduce": [(n, m, tuple((1, 1, i, o) for i, o in mlp)) for mlp in (MLP_SMALL, MLP_BIG)
                        for n, m in ((1, 1), (64, 16), (256, 256), (2048, 256), (1024, 2048), (4096, 2048))]
    + [(n, m, ((8, 8, 64, 64),)) for n, m in ((16, 16), (256, 64))],
    "grad_norm": [(n, tuple((1, i, o) for i, o in mlp)) for mlp in (MLP_SMALL, MLP_BIG) for n in (64, 4096, 65536)]
    + [(n, ((16, 64, 64),)) for n in (64, 2048)],
}
SWEEP_GPU = {  # the benchmark shapes a GPU is for, on top of SWEEP
    "grad_dot": [(n, 1, i, o) for n in (65536, 262144) for i, o in MLP_BIG],
    "grad_sim_reduce": [(n, 2048, tuple((1, 1, i, o) for i, o in MLP_BIG)) for n in (16384, 65536)],
    "grad_norm": [(n, tuple((1, i, o) for i, o in MLP_BIG)) for n in (262144,)],
}
REFERENCE_MAX_VALUES = 2**28  # the reference grad_sim_reduce forms [N*T, M*S] Grams: timed up to 1 GB of float32
SWITCH_MARGIN = 1.05
"""A path other than the kernel is charged this factor on its time when rules are derived: it must win by more
than the noise of a shared machine to be chosen (the kernels are also the thread-count-independent paths)."""


def sweep_inputs(op: str, shape: tuple, dtype, device) -> tuple:
    """Arguments of the op at `shape` (a T = 1 side is passed 2-D, as scoring passes MLP layers)."""
    if op == "grad_dot":
        n, t, d_in, d_out = shape
        x, g = make_layer(n, t, d_in, d_out, dtype, device, seed=n, flat=t == 1)
        gen = torch.Generator().manual_seed(1)
        return x, g, torch.randn(d_out, d_in, generator=gen).to(device, dtype), torch.randn(d_out, generator=gen).to(
            device, dtype)
    if op == "grad_sim_reduce":
        n, m, layers = shape
        xa, ga, xb, gb = [], [], [], []
        for i, (t, s, d_in, d_out) in enumerate(layers):
            x, g = make_layer(n, t, d_in, d_out, dtype, device, seed=2 * i, flat=t == 1)
            y, h = make_layer(m, s, d_in, d_out, dtype, device, seed=2 * i + 1, flat=s == 1)
            xa.append(x), ga.append(g), xb.append(y), gb.append(h)
        return xa, ga, xb, gb, "max"
    n, layers = shape
    pairs = [make_layer(n, t, d_in, d_out, dtype, device, seed=i, flat=t == 1) for i, (t, d_in, d_out) in
             enumerate(layers)]
    return [x for x, _ in pairs], [g for _, g in pairs]


def sweep_paths(op: str, shape: tuple) -> tuple[str, ...]:
    if op == "grad_norm":
        return "kernel", "reference"  # grad_norm's eager form is its reference
    if op == "grad_sim_reduce":
        n, m, layers = shape
        if max(n * t * m * s for t, s, _, _ in layers) > REFERENCE_MAX_VALUES:
            return "kernel", "eager"
    return "kernel", "eager", "reference"


def derive_rule(points: list[dict], paths: tuple[str, ...]) -> tuple[str, str, float | None]:
    """(below, above, threshold_flops) minimising the summed excess time (time of the chosen path / time of the
    fastest - 1) over the measured points, a non-kernel path charged SWITCH_MARGIN x its time; ties go to one path
    for all shapes, then to the kernel. A path not timed at a point cannot be chosen there."""
    def excess(path: str, point: dict) -> float:
        t = point["us"].get(path)
        if t is None:
            return math.inf
        return t * (1.0 if path == "kernel" else SWITCH_MARGIN) / min(v for v in point["us"].values() if v) - 1

    flops = sorted({p["flops"] for p in points})
    cuts = [float(f"{math.sqrt(a * b):.3g}") for a, b in zip(flops, flops[1:])]  # geometric midpoints
    candidates = [(p, p, None) for p in paths] + [(lo, hi, c) for lo in paths for hi in paths if lo != hi
                                                   for c in cuts]

    def total(rule):
        lo, hi, cut = rule
        return sum(excess(hi if cut is None or p["flops"] >= cut else lo, p) for p in points)

    return min(candidates, key=lambda r: (round(total(r), 6), r[2] is not None, r[1] != "kernel", r[0] != "kernel"))


def record_crossovers(device: torch.device, tags: list[str], threads: int, out_dir: Path) -> None:
    meta = provenance(packages=())
    source = {"machine": cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device),
              "threads": threads, "torch": meta["torch"], "commit": meta["commit"], "date": meta["date"],
              "command": "python benchmarks/bench_ops.py --record-crossovers "
                         f"--device {device.type} --threads {threads}"}
    sweep = {op: SWEEP[op] + (SWEEP_GPU[op] if device.type == "cuda" else []) for op in SWEEP}
    rules = []
    for tag in tags:
        with TF32(tag == "tf32"):
            for op, shapes in sweep.items():
                points = []
                for shape in shapes:
                    args = sweep_inputs(op, shape, DTYPES[tag], device)
                    fn = getattr(ops, op)
                    paths = sweep_paths(op, shape)
                    times = interleaved({p: (lambda p=p: fn(*args, backend=p)) for p in paths}, threads, 0.3, 5)
                    us = {p: statistics.median(times[p]) * 1e6 if p in times else None for p in ops.PATHS}
                    points.append({"shape": shape, "flops": ops.flops(op, shape), "us": us})
                    print(f"  {op:<16}{tag:<5}{str(shape):<62}" + "".join(
                        f"{p}={v:>11.1f} us  " if v is not None else f"{p}={'-':>11}     " for p, v in us.items()),
                        flush=True)
                below, above, threshold = derive_rule(points, sweep_paths(op, shapes[0]))
                print(f"{op} {device.type} {tag}: " + (f"{above} everywhere" if threshold is None else
                      f"{below} below {threshold:.3g} FLOP, {above} from there"), flush=True)
                rules.append({"op": op, "device": device.type, "precision": tag, "below": below, "above": above,
                              "threshold_flops": threshold, "source": source,
                              "points": [[p["shape"], p["flops"]] + [None if p["us"][k] is None else
                                                                     round(p["us"][k], 1) for k in ops.PATHS]
                                         for p in points]})
    measured = {(r["op"], r["precision"]) for r in rules}
    kept = [r for r in crossovers.RULES if r["device"] != device.type or (r["op"], r["precision"]) not in measured]
    table = sorted(kept + rules, key=lambda r: (r["device"], r["op"], r["precision"]))
    rows = ["    " + pprint.pformat(rule, width=116, sort_dicts=False).replace("\n", "\n    ") + "," for rule in table]
    text = f'"""{crossovers.__doc__}"""\n\nRULES = [\n' + "\n".join(rows) + "\n]\n"
    CROSSOVERS_FILE.write_text(text)
    (out_dir / "crossovers.py").write_text(text)
    print(f"wrote {CROSSOVERS_FILE} (and a copy in {out_dir})", flush=True)


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--case", choices=CASES, action="append", help="repeatable; default: all")
    p.add_argument("--dtype", choices=list(DTYPES), action="append",
                   help="repeatable; default: fp32 tf32 bf16 on a GPU, fp32 bf16 on CPU (crossovers: + fp64)")
    p.add_argument("--quick", action="store_true", help="small shapes and short timings (smoke test)")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per implementation, all rounds")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--record-crossovers", action="store_true",
                   help="time the kernel / eager / reference paths over SWEEP and rewrite fastattr/crossovers.py")
    p.add_argument("--out", default=os.getenv("OUT") or str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    for op in ops.OPS:
        if not ops.has_kernel(op, device):
            sys.exit(f"bench_ops: no {device.type} kernel for {op} is built; build fastattr._C first "
                     f"(FASTATTR_FORCE_CUDA=1 for the CUDA kernels)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.record_crossovers:
        tags = args.dtype or (["fp32", "tf32", "bf16"] if gpu else ["fp32", "fp64", "bf16"])
        record_crossovers(device, tags, torch.get_num_threads(), out_dir)
        return
    tags = args.dtype or (["fp32", "tf32", "bf16"] if gpu else ["fp32", "bf16"])
    if args.quick:
        n_agg, n_pair, m = 4_096, 1_024, 256
    else:
        n_agg, n_pair, m = 65_536, 65_536 if gpu else 16_384, 2_048
    k_top = n_pair // 100
    widths = (8, 256, 256, 4)
    min_run_time = args.min_run_time or (0.1 if args.quick else 1.5)
    run_id = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    b = Bench(device, min_run_time, 2 if args.quick else args.rounds, out_dir / "bench_ops.jsonl", run_id)
    print(f"bench_ops on {b.device_name} ({device}), {b.threads} threads, torch {torch.__version__}, commit "
          f"{b.meta['commit']}, peaks {b.peaks}, results -> {b.out_path}", flush=True)

    failures = []
    for case in args.case or CASES:
        for tag in tags if case != "latency" else ["fp32"]:
            try:  # a cell that fails its correctness check is reported and not timed; the others still run
                if case == "aggregated":
                    case_aggregated(b, n_agg, widths, tag)
                elif case == "pairwise":
                    case_pairwise(b, n_pair, m, widths, tag, k_top)
                elif case == "norm" and tag != "tf32":
                    case_norm(b, n_agg, widths, tag)
                elif case == "latency":
                    case_latency(b, 2_048, 64)
            except (CorrectnessError, AssertionError) as e:
                failures.append(f"{case} {tag}: {e}")
                print(f"CORRECTNESS FAILURE {case} {tag}: {e}", flush=True)
                row = {**b.meta, "case": case, "dtype": tag, "impl": "kernel", "error": str(e)}
                with open(b.out_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
    if failures:
        sys.exit(f"bench_ops: {len(failures)} cell(s) failed their correctness check:\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
