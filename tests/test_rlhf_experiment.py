"""fastattr.rlhf.experiment.run_rlhf: metrics.jsonl has the documented fields every round; a run stopped and resumed
gives the same metrics and parameters as an uninterrupted one, for both trainers; a checkpoint that was never
committed is not resumed from; a run directory is not overwritten by accident."""
import json

import pytest
import torch
from _rlhf_tiny import TINY_EXPERIMENT, tiny_task

pytest.importorskip("trl")
from safetensors.torch import load_file

from fastattr.rlhf.experiment import run_rlhf

FIELDS = ("round", "reward", "toxicity", "length", "kept_fraction", "attr_seconds", "rollout_seconds",
          "update_seconds", "round_seconds", "wall_seconds", "train_reward", "method", "trainer", "seed")
TIMINGS = ("attr_seconds", "rollout_seconds", "update_seconds", "round_seconds", "wall_seconds")


def quiet(message):
    pass


def run(trainer, run_dir, rounds, method="iif", resume=False):
    _, cache = tiny_task()
    return run_rlhf(method, trainer, seed=0, rounds=rounds, run_dir=run_dir, resume=resume, config=TINY_EXPERIMENT,
                    cache_dir=cache, log=quiet)


def without_timings(rows):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def parameters(trainer, run_dir):
    if trainer == "ppo":
        return torch.load(run_dir / "checkpoint.pt", weights_only=False)["ppo"]["policy"]
    last = max(run_dir.glob("trl/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return load_file(last / "adapter_model.safetensors")


@pytest.mark.parametrize("trainer", ["ppo", "grpo"])
def test_resume_is_bit_identical(tmp_path, trainer):
    straight = run(trainer, tmp_path / "a", rounds=2)
    assert [r["round"] for r in straight] == [0, 1, 2]
    for r in straight:
        assert set(FIELDS) <= set(r) and 0.0 <= r["toxicity"] <= 1.0
    for r in straight[1:]:
        assert 0.0 < r["kept_fraction"] <= 1.0 and r["attr_seconds"] > 0 and r["update_seconds"] > 0
        assert r["wall_seconds"] >= r["round_seconds"] > 0
    assert straight[0]["kept_fraction"] is None  # round 0: the pretrained policy
    run(trainer, tmp_path / "b", rounds=1)
    resumed = run(trainer, tmp_path / "b", rounds=2, resume=True)
    assert without_timings(resumed) == without_timings(straight)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [0, 1, 2]
    a, b = parameters(trainer, tmp_path / "a"), parameters(trainer, tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_uncommitted_grpo_checkpoint_is_not_resumed(tmp_path):
    straight = run("grpo", tmp_path / "a", rounds=2, method="random")
    last = max((tmp_path / "a").glob("trl/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    (last / "COMMITTED").unlink()  # as if the process died while TRL was writing it
    resumed = run("grpo", tmp_path / "a", rounds=2, method="random", resume=True)
    assert without_timings(resumed) == without_timings(straight)
    assert (last / "COMMITTED").exists()


def test_run_directory_is_protected(tmp_path):
    run("ppo", tmp_path, rounds=1, method="ppo")
    with pytest.raises(FileExistsError, match="resume=True"):
        run("ppo", tmp_path, rounds=1, method="ppo")
    with pytest.raises(ValueError, match="other settings"):
        run("ppo", tmp_path, rounds=1, method="iif", resume=True)
    rows = run("ppo", tmp_path, rounds=1, method="ppo", resume=True)  # already done: nothing to train
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["attr_seconds"] == 0.0
    with pytest.raises(ValueError, match="method must be one of"):
        run_rlhf("grpo-iif", "grpo", run_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="trainer must be one of"):
        run_rlhf("iif", "sft", run_dir=tmp_path / "x")
