"""Sharded scoring: two gloo processes, each with its own records, equal one process over all records (float64).

The target is global: each rank returns its local sum divided by the global record count, and fastattr sums the
ranks' target gradients. Every case runs in the same two processes (start-up costs seconds)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastattr

N_TOTAL, SHARDS = 10, [6, 4]  # uneven shards on purpose


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_TOTAL, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N_TOTAL,), generator=g)
    probe = torch.randn(N_TOTAL, 4, generator=g, dtype=torch.float64)  # the target's records, sharded the same way
    return model, x, y, probe


def closures(x, y, probe):
    def rec(m):
        return -torch.log_softmax(m(x), -1).gather(1, y[:, None]).squeeze(1)

    def tgt(m):  # a global mean: the local sum over the global count
        return m(probe).pow(2).sum() / N_TOTAL

    def tgt_m(m):  # M = 3 targets, each a global mean
        return m(probe).pow(2).sum(0) / N_TOTAL

    def joint(m):
        return rec(m), tgt(m)

    return rec, tgt, tgt_m, joint


def all_cases(model, x, y, probe, pg=None, ddp=None):
    rec, tgt, tgt_m, joint = closures(x, y, probe)
    m = ddp if ddp is not None else model
    kw = {} if pg is None else {"process_group": pg}
    return {"aggregated": fastattr.score(m, rec, tgt, **kw),
            "joint": fastattr.score(m, joint, **kw),
            "m_targets": fastattr.score(m, rec, tgt_m, **kw),
            "m_targets_max": fastattr.score(m, rec, tgt_m, reduce="max", **kw),
            "check": fastattr.score(m, rec, tgt, check=True, **kw)}


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, x, y, probe = model_and_data()
        start = sum(SHARDS[:rank])
        part = slice(start, start + SHARDS[rank])
        pg = dist.group.WORLD
        results = all_cases(model, x[part], y[part], probe[part], pg)
        ddp = nn.parallel.DistributedDataParallel(model)
        results["ddp"] = all_cases(model, x[part], y[part], probe[part], pg, ddp=ddp)["aggregated"]
        # one rank's bad input: every rank raises instead of waiting in a collective
        bad = x[part].clone()
        if rank == 1:
            bad[0] = float("nan")
        rec_bad = closures(bad, y[part], probe[part])[0]
        try:
            fastattr.score(model, rec_bad, closures(x[part], y[part], probe[part])[1], process_group=pg)
            results["error"] = "none"
        except fastattr.ScoringError as e:
            results["error"] = str(e)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    mp.start_processes(_worker, args=(2, str(d / "init"), str(d)), nprocs=2, join=True, start_method="spawn")
    return [torch.load(d / f"rank{r}.pt") for r in range(2)]


def test_two_ranks_equal_one_process(sharded):
    model, x, y, probe = model_and_data()
    whole = all_cases(model, x, y, probe)
    for key, expect in whole.items():
        got = torch.cat([sharded[0][key], sharded[1][key]])
        assert got.shape == expect.shape, key
        assert torch.allclose(got, expect, rtol=1e-10, atol=1e-12), key
    assert torch.allclose(torch.cat([sharded[0]["ddp"], sharded[1]["ddp"]]), whole["aggregated"], rtol=1e-10)


def test_one_ranks_error_reaches_every_rank(sharded):
    assert "non-finite" in sharded[1]["error"]
    assert "failed on 1 other rank" in sharded[0]["error"]
