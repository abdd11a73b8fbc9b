"""Scoring one PPO buffer: fastattr vs the alternatives, as ratios to the plain passes that scoring needs.

Plain passes (= 1.0): one forward+backward of the summed record losses plus one forward+backward of the target, the
work any gradient-based scorer must at least do. Rows, all on the same actor and buffer, timed side by side in one run:
  fastattr            fastattr.score(model, record_loss, target_loss) with the C++ kernels, default settings (with the
                      checks that keep it exact: the graph walk for uses outside a module, and the row-locality
                      backward)
  fastattr-no-locality  the same with check_locality=False (what the row-locality backward costs)
  fastattr+check      the same with check=True (the optional sum identity on a fresh forward)
  fastattr-joint      records and target from one forward (what the PPO loop uses), default settings
  fastattr-joint-no-locality  the joint form with check_locality=False
  fastattr-reference  fastattr.score with the pure-torch reference ops instead of the kernels
  fastattr-kernel-no-locality  backend="kernel" (the compiled kernels, whatever fastattr.ops.choose would pick),
                      check_locality=False
  fastattr-eager-no-locality   backend="eager" (one GEMM and a row-dot per layer in eager torch), check_locality=False
  vmap                torch.func.vmap(grad) per-sample gradients flattened to [N, P], then a GEMV (TRAK / dattri)
  vmap-per-param      the same gradients dotted parameter by parameter (no [N, P] concatenation)
  materialise         the paper's official method, re-implemented from its description (docs/method.md): hooks
                      keep each Linear's input and output gradient, then per-sample weight gradients [N, d_out, d_in]
                      per layer are dotted with the summed target gradient
Peak memory is measured per method in a fresh subprocess (ru_maxrss above the set-up high-water mark). fastattr runs
with deterministic=False here, so its passes use --threads like every other row (the default pins them to one).

    python benchmarks/bench_scoring.py                 # both paper shapes, 1 thread
    python benchmarks/bench_scoring.py --quick         # small shapes (smoke test)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.benchmark import Timer

import fastattr
from fastattr import ops
from fastattr.info import provenance

METHODS = ["plain", "fastattr", "fastattr-no-locality", "fastattr+check", "fastattr-joint", "fastattr-joint-no-locality",
           "fastattr-reference", "fastattr-kernel-no-locality", "fastattr-eager-no-locality", "materialise", "vmap",
           "vmap-per-param"]


def make_case(hidden: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    actor = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 4))
    obs = torch.randn(n, 8, generator=g)
    act = torch.randint(0, 4, (n,), generator=g)
    adv = torch.randn(n, generator=g)
    adv_n = (adv - adv.mean()) / (adv.std() + 1e-8)
    return actor, obs, act, adv, adv_n


def logp(model, obs, act):
    return torch.log_softmax(model(obs), -1).gather(1, act[:, None]).squeeze(1)


def methods(actor, obs, act, adv, adv_n):
    params = list(actor.parameters())

    def record_loss(m):
        return -adv_n * logp(m, obs, act)

    def target_loss(m):
        return -(adv * logp(m, obs, act)).mean()

    def joint(m):
        lp = logp(m, obs, act)
        return -adv_n * lp, -(adv * lp).mean()

    def plain():
        torch.autograd.grad(record_loss(actor).sum(), params)
        torch.autograd.grad(target_loss(actor), params)

    def fast():
        return fastattr.score(actor, record_loss, target_loss, deterministic=False)

    def fast_no_locality():
        return fastattr.score(actor, record_loss, target_loss, deterministic=False, check_locality=False)

    def fast_check():
        return fastattr.score(actor, record_loss, target_loss, deterministic=False, check=True)

    def fast_joint():
        return fastattr.score(actor, joint, deterministic=False)

    def fast_joint_no_locality():
        return fastattr.score(actor, joint, deterministic=False, check_locality=False)

    def fast_reference():
        saved = ops._use_kernel
        ops._use_kernel = lambda op, device: False
        try:
            return fastattr.score(actor, record_loss, target_loss, deterministic=False)
        finally:
            ops._use_kernel = saved

    def fast_backend(backend):
        return lambda: fastattr.score(actor, record_loss, target_loss, deterministic=False, check_locality=False,
                                      backend=backend)

    def one(p, o, a, w):
        return -w * torch.log_softmax(functional_call(actor, p, (o[None],)), -1).gather(1, a.reshape(1, 1))[0, 0]

    def via_vmap():  # what TRAK / dattri do: per-sample gradients flattened into one [N, P] matrix, then a GEMV
        p = {k: v.detach() for k, v in actor.named_parameters()}
        per = vmap(grad(one), in_dims=(None, 0, 0, 0))(p, obs, act, adv_n)
        gt = torch.autograd.grad(target_loss(actor), params)
        return torch.cat([per[k].flatten(1) for k in p], 1) @ torch.cat([t.flatten() for t in gt])

    def via_vmap_per_param():  # the cheaper variant: one dot per parameter, no [N, P] concatenation
        p = {k: v.detach() for k, v in actor.named_parameters()}
        per = vmap(grad(one), in_dims=(None, 0, 0, 0))(p, obs, act, adv_n)
        gt = torch.autograd.grad(target_loss(actor), params)
        return sum(per[k].flatten(1) @ t.flatten() for k, t in zip(p, gt))

    def materialise():
        lins = [m for m in actor if isinstance(m, nn.Linear)]
        store = {"x": [], "y": []}

        def keep(mod, a, y):
            store["x"].append(a[0].detach())
            store["y"].append(y)

        hs = [m.register_forward_hook(keep) for m in lins]
        try:
            tl = target_loss(actor)
            x_v, y_v = store["x"][:], store["y"][:]
            store["x"].clear(), store["y"].clear()
            rl = record_loss(actor)
            x_t, y_t = store["x"][:], store["y"][:]
        finally:
            for h in hs:
                h.remove()
        g_v = torch.autograd.grad(tl, y_v)
        g_t = torch.autograd.grad(rl.sum(), y_t)
        score = torch.zeros(len(obs))
        for xv, gv, xt, gt in zip(x_v, g_v, x_t, g_t):
            P = gv.T @ xv                                  # summed target gradient of the weight [d_out, d_in]
            Q = gt[:, :, None] * xt[:, None, :]            # per-sample weight gradients [N, d_out, d_in]
            score += (Q * P).sum((1, 2)) + gt @ gv.sum(0)  # + bias term
        return score

    return {"plain": plain, "fastattr": fast, "fastattr-no-locality": fast_no_locality, "fastattr+check": fast_check,
            "fastattr-joint": fast_joint, "fastattr-joint-no-locality": fast_joint_no_locality,
            "fastattr-reference": fast_reference, "fastattr-kernel-no-locality": fast_backend("kernel"),
            "fastattr-eager-no-locality": fast_backend("eager"),
            "vmap": via_vmap, "vmap-per-param": via_vmap_per_param, "materialise": materialise}


def vm_hwm_kb() -> int:
    """Peak resident set of this process (VmHWM). Unlike ru_maxrss it is per address space, so a child does not
    inherit its parent's high-water mark across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def peak_memory_mb(method: str, hidden: int, n: int, threads: int) -> float:
    """Runs one method in a fresh process; returns its peak RSS above the set-up high-water mark (MiB). A call on 8
    records first pays one-time costs (lazy initialisation in torch, e.g. ~30 MiB on the first backward with explicit
    grad_outputs), which are not memory per record."""
    code = (
        "import torch, sys; sys.path.insert(0, %r); import bench_scoring as b;"
        "torch.set_num_threads(%d); b.methods(*b.make_case(%d, 8))[%r](); c = b.make_case(%d, %d);"
        "fns = b.methods(*c); base = b.vm_hwm_kb(); fns[%r](); print((b.vm_hwm_kb() - base) / 1024)"
    ) % (str(Path(__file__).parent.resolve()), threads, hidden, method, hidden, n, method)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench(hidden: int, n: int, threads: int, min_run_time: float, rounds: int) -> list[dict]:
    torch.set_num_threads(threads)
    case = make_case(hidden, n)
    fns = methods(*case)
    # correctness before timing: every method gives the same scores
    ref = fns["fastattr-reference"]().double()
    for name in METHODS[1:]:
        if name == "fastattr-reference":
            continue
        err = ((fns[name]().double() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-4, f"{name} disagrees with the reference: rel err {err:.2e}"
    # Interleaved timing: each round times every method back to back, and a method's ratio is the median over rounds
    # of (its time / plain's time in the same round), so load drifting on a shared machine cancels out.
    reps = {}
    for name in METHODS:
        once = Timer("f()", globals={"f": fns[name]}, num_threads=threads).timeit(1).median
        reps[name] = max(1, int(min_run_time / max(once, 1e-6)))
    times = {name: [] for name in METHODS}
    for _ in range(rounds):
        for name in METHODS:
            times[name].append(Timer("f()", globals={"f": fns[name]}, num_threads=threads).timeit(reps[name]).median)
    rows = []
    for name in METHODS:
        ratios = sorted(a / b for a, b in zip(times[name], times["plain"]))
        rows.append({"method": name, "median_ms": statistics.median(times[name]) * 1e3,
                     "time_ratio": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1],
                     "peak_mb": peak_memory_mb(name, hidden, n, threads)})
    base_mb = max(rows[0]["peak_mb"], 0.01)
    for r in rows:
        r["mem_ratio"] = r["peak_mb"] / base_mb
        r.update(hidden=hidden, n=n, threads=threads)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes only (smoke test)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-run-time", type=float, default=0.3, help="seconds per method per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_scoring.jsonl"))
    args = p.parse_args()
    os.environ["FASTATTR_STRICT"] = "1"  # never time the fallback as if it were the kernel
    shapes = [(64, 256)] if args.quick else [(64, 2048), (256, 16384)]
    meta = provenance(packages=("numpy",))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    print(f"# bench_scoring  torch {meta['torch']}  commit {meta['commit']}  threads {args.threads}  {meta['machine']}")
    print(f"{'shape':<18}{'method':<28}{'median ms':>11}{'x plain':>9}{'min-max':>13}{'peak MiB':>10}{'x plain':>9}")
    with open(args.out, "a") as f:
        for hidden, n in shapes:
            for r in bench(hidden, n, args.threads, args.min_run_time, args.rounds):
                r.update(meta)
                f.write(json.dumps(r) + "\n")
                print(f"{f'{hidden}-{hidden} N={n}':<18}{r['method']:<20}{r['median_ms']:>11.2f}"
                      f"{r['time_ratio']:>9.2f}{r['ratio_min']:>7.2f}-{r['ratio_max']:<5.2f}"
                      f"{r['peak_mb']:>10.1f}{r['mem_ratio']:>9.2f}")


if __name__ == "__main__":
    main()
