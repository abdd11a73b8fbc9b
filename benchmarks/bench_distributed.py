"""Sharded scoring: one process vs two gloo ranks on the same records (each rank scores its half).

The 256-256 actor of bench_scoring, N records, the return target as a global mean; every rank runs on one thread.
Each world size runs in its own processes, several times interleaved; the row is the median wall time of one
fastattr.score call (the slowest rank, after a barrier), and the ratio is one process's time over two ranks'.

    python benchmarks/bench_distributed.py                  # N = 16,384
    python benchmarks/bench_distributed.py --n 2048 --reps 3   # quick
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import bench_scoring  # noqa: E402

from fastattr.info import provenance  # noqa: E402


def _worker(rank: int, world: int, init: str, n: int, hidden: int, reps: int, out: str):
    import fastattr

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        actor, obs, act, adv, adv_n = bench_scoring.make_case(hidden, n)
        part = slice(rank * n // world, (rank + 1) * n // world)
        obs, act, adv, adv_n = obs[part], act[part], adv[part], adv_n[part]

        def joint(m):
            lp = bench_scoring.logp(m, obs, act)
            return -adv_n * lp, -(adv * lp).sum() / n  # global mean: local sum over the global count

        pg = dist.group.WORLD if world > 1 else None
        fastattr.score(actor, joint, process_group=pg)  # warm-up
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            fastattr.score(actor, joint, process_group=pg)
            dist.barrier()
            times.append(time.perf_counter() - t0)
        if rank == 0:
            Path(out).write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()


def run(world: int, n: int, hidden: int, reps: int) -> list[float]:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "times.json")
        mp.start_processes(_worker, args=(world, os.path.join(d, "init"), n, hidden, reps, out), nprocs=world,
                           join=True, start_method="spawn")
        return json.loads(Path(out).read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--reps", type=int, default=5, help="timed calls per launch")
    p.add_argument("--rounds", type=int, default=3, help="interleaved launches per world size")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_distributed.jsonl"))
    args = p.parse_args()
    os.environ["FASTATTR_STRICT"] = "1"
    meta = provenance(packages=("numpy",))
    print(f"# bench_distributed  torch {meta['torch']}  commit {meta['commit']}  {meta['machine']}  gloo, 1 thread/rank")
    times = {1: [], 2: []}
    for _ in range(args.rounds):
        for world in (1, 2):
            times[world] += run(world, args.n, args.hidden, args.reps)
    med = {w: statistics.median(t) for w, t in times.items()}
    rows = [{"world": w, "median_ms": med[w] * 1e3, "speedup": med[1] / med[w], "n": args.n, "hidden": args.hidden,
             **meta} for w in (1, 2)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"{'shape':<20}{'ranks':>6}{'median ms':>12}{'speed-up':>10}")
    for r in rows:
        print(f"{f'{args.hidden}-{args.hidden} N={args.n}':<20}{r['world']:>6}{r['median_ms']:>12.1f}"
              f"{r['speedup']:>10.2f}")


if __name__ == "__main__":
    main()
