"""fastattr.rlhf.experiment.run_rlhf: metrics.jsonl has the documented fields every round; a run stopped and resumed
gives the same metrics, records and parameters as an uninterrupted one, for both trainers; records.jsonl holds each
round's highest- and lowest-scoring records with their scores; a checkpoint that was never committed is not resumed
from; a run directory is not overwritten by accident."""
import json

import pytest
import torch
from _rlhf_tiny import TINY_EXPERIMENT, tiny_task

pytest.importorskip("trl")
from safetensors.torch import load_file

from fastattr.integrations.trl import IIFGRPOTrainer
from fastattr.rlhf.experiment import SHOWN_RECORDS, run_rlhf
from fastattr.rlhf.ppo import SequencePPO

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
    records = [(tmp_path / d / "records.jsonl").read_text() for d in ("a", "b")]
    assert records[0] == records[1] and len(records[0].splitlines()) == 2
    a, b = parameters(trainer, tmp_path / "a"), parameters(trainer, tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _capture_rounds(monkeypatch, trainer) -> list[tuple]:
    """(scores, records, keep, rewards or None) of every round the run trains, as the trainer computed them."""
    seen = []
    if trainer == "ppo":
        original = SequencePPO.round

        def round_(self):
            rnd = original(self)
            seen.append((rnd.scores, rnd.records, rnd.keep, rnd.rewards))
            return rnd

        monkeypatch.setattr(SequencePPO, "round", round_)
    else:
        original = IIFGRPOTrainer._filter

        def filter_(self, output):
            original(self, output)
            seen.append((self.last_scores, self.last_records, self.last_keep, None))

        monkeypatch.setattr(IIFGRPOTrainer, "_filter", filter_)
    return seen


@pytest.mark.parametrize("trainer", ["ppo", "grpo"])
def test_records_are_each_rounds_highest_and_lowest_scores(tmp_path, monkeypatch, trainer):
    seen = _capture_rounds(monkeypatch, trainer)
    run(trainer, tmp_path, rounds=2, method="random")
    task, _ = tiny_task()
    lines = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2] and len(seen) == 2  # one line per trained round
    for line, (scores, records, keep, rewards) in zip(lines, seen):
        assert line["records"] == len(scores) and len(line["top"]) == len(line["bottom"]) == SHOWN_RECORDS
        ranked = sorted(scores.tolist())
        assert [r["score"] for r in line["top"]] == ranked[::-1][:SHOWN_RECORDS]
        assert [r["score"] for r in line["bottom"]] == ranked[:SHOWN_RECORDS]
        for r in line["top"] + line["bottom"]:
            i = r["index"]
            assert r["score"] == scores[i].item() and r["kept"] == bool(keep[i])
            assert r["prompt"] == task.language.decode(records.prompt_ids[i][records.prompt_mask[i].bool()].tolist())
            assert r["completion"] == task.language.decode(
                records.completion_ids[i][records.completion_mask[i].bool()].tolist())
            assert r["completion"] and (rewards is None or r["reward"] == rewards[i].item())


def test_methods_that_do_not_score_write_no_records(tmp_path):
    run("ppo", tmp_path, rounds=1, method="ppo")
    assert not (tmp_path / "records.jsonl").exists()


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
