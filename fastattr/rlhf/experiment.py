"""One run of the small-scale RLHF detoxification experiment: `run_rlhf(method, trainer, seed, rounds, run_dir)`.

    method   ppo (no attribution, every record trains) | iif (keep the records whose score on the D_val sequence
             target is >= 0: the paper's RLHF setting, p = 1) | random (drop as many records at random: the control)
    trainer  ppo (fastattr.rlhf.ppo.SequencePPO: mini-batch 1, 4 epochs, Adam) | grpo (TRL's GRPOTrainer, or
             fastattr.integrations.trl.IIFGRPOTrainer for iif / random: 4 completions per prompt, 4 iterations)

Both train LoRA adapters (r = 8, every Linear of the task's GPT-Neo) as the paper does. A round is one batch of
generations and its update (GRPO: one generation batch, `steps_per_generation * num_iterations` optimizer steps).
Every round the policy is evaluated on the test prompts (the same sampling seed each round, two completions per
prompt) and a line goes to `<run_dir>/metrics.jsonl`:

    round, reward (mean neutral logit), toxicity (rate in [0, 1], the lexicon rule), length (tokens),
    kept_fraction, attr_seconds, rollout_seconds (generation + reward), update_seconds, round_seconds (the three),
    wall_seconds (since the run started, resumptions included), train_reward, method, trainer, seed

(round 0 is the pretrained policy; its training fields are null). For the methods that score (iif, random) every
trained round also appends to `<run_dir>/records.jsonl` its `SHOWN_RECORDS` highest- and lowest-scoring records
(`shown_records`: score, reward, kept by the filter or not, prompt and completion as text); writing it reads the
round's scores and records and changes nothing in training. Checkpoints are written after every round and
committed atomically (PPO: checkpoint.pt replaced by os.replace; GRPO: TRL's checkpoint-<step> folder, committed by a
COMMITTED file written last); `resume=True` continues from the last committed round, drops metric lines written
after it (and records.jsonl's lines), and gives the same parameters and metrics (timings aside) as an
uninterrupted run. `run.json` holds the run's method, trainer, seed and configuration; `check_run_dir` refuses a
directory that holds another run.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import scores
from ..analysis import top_bottom
from ..seeds import derived_seed
from ..store import read_jsonl
from .ppo import PPOConfig, SequencePPO
from .sequences import Sequences, pad_rows
from .task import EOS, PAD, Task, TaskConfig, build_task

METHODS = ("ppo", "iif", "random")
TRAINERS = ("grpo", "ppo")
FILTER_OF = {"ppo": "none", "iif": "iif", "random": "random"}
TRAINING_FIELDS = ("kept_fraction", "attr_seconds", "rollout_seconds", "update_seconds", "round_seconds",
                   "train_reward")
SHOWN_RECORDS = 3  # records.jsonl: the round's 3 highest- and 3 lowest-scoring records


@dataclass(frozen=True)
class GRPOSettings:
    prompts: int = 8  # prompts per generation batch
    generations: int = 4  # completions per prompt
    steps_per_generation: int = 2  # optimizer steps per pass over a generation batch
    iterations: int = 4  # passes over each generation batch (TRL's num_iterations, the PPO epochs)
    lr: float = 3e-4


@dataclass(frozen=True)
class ExperimentConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    lora_r: int = 8
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(batch_size=32, epochs=4, minibatch_size=1, lr=5e-5))
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    eval_samples: int = 2
    eval_seed: int = 1234
    target_policy: str = "reference"  # who generates D_val's target completions: the reference, or the policy


def config_from_dict(values: dict) -> ExperimentConfig:
    """The ExperimentConfig whose fields `values` (its `asdict` form, or any part of it: nested sections as dicts) sets
    over the defaults. An unknown field, or a value of another type than the field's default, is a ValueError."""
    return _merged(ExperimentConfig(), values, "config")


def _merged(base, values, where: str):
    """`base` (a config dataclass) with the fields in `values` replaced, nested dataclasses merged the same way."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a JSON object, got {values!r}")  # noqa: TRY004  (a bad --config)
    known = asdict(base)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(known)}")
    changes = {}
    for key, value in values.items():
        default = getattr(base, key)
        if is_dataclass(default):
            changes[key] = _merged(default, value, f"{where}.{key}")
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            changes[key] = float(value)
        elif type(value) is not type(default):
            raise ValueError(f"{where}.{key} must be a {type(default).__name__} like its default {default!r}, "
                             f"got {value!r}")
        else:
            changes[key] = value
    return replace(base, **changes)


def run_meta(method: str, trainer: str, seed: int, config: ExperimentConfig) -> dict:
    """What `<run_dir>/run.json` holds for a run (as it reads back from JSON)."""
    return json.loads(json.dumps({"method": method, "trainer": trainer, "seed": seed, "config": asdict(config)}))


def check_run_dir(run_dir: str | os.PathLike, meta: dict, resume: bool) -> None:
    """Refuses a run directory that is a file, holds a run while `resume` is off (FileExistsError: nothing is
    overwritten by accident), or holds a run with other settings than `meta` (ValueError)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{run_dir} is a file, not a run directory; choose another run directory")
    path = run_dir / "run.json"
    if not path.exists():
        return
    if not resume:
        raise FileExistsError(f"{run_dir} already holds a run ({path}); pass resume=True to continue it, or another "
                              "run directory")
    try:
        saved = json.loads(path.read_text())
        what = f"{saved['method']}/{saved['trainer']}, seed {saved['seed']}"
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}); use another run directory") from None
    if saved != meta:
        other = ", another config" if saved.get("config") != meta["config"] else ""
        raise ValueError(f"{path} holds a run with other settings ({what}{other}); resume it with those, or use "
                         "another run directory")


def completed_rounds(run_dir: str | os.PathLike) -> int:
    """The last round in `<run_dir>/metrics.jsonl` (-1 when there is none)."""
    return max((row["round"] for row in read_jsonl(Path(run_dir) / "metrics.jsonl")), default=-1)


def _check(method: str, trainer: str, rounds: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if trainer not in TRAINERS:
        raise ValueError(f"trainer must be one of {', '.join(TRAINERS)}, got {trainer!r}")
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")


class _RoundLines:
    """A file of one JSON line per round (metrics.jsonl, records.jsonl), each flushed and fsynced; `truncate(n)` keeps
    rounds < n."""

    def __init__(self, path: Path, base: dict):
        self.path, self.base = path, base

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate(self, n_rounds: int) -> None:
        if not self.path.exists():
            return
        keep = [r for r in self.rows() if r["round"] < n_rounds]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)

    def write(self, row: dict) -> dict:
        row = {**row, **self.base}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return row


def shown_records(task: Task, round_index: int, records: Sequences, scores_: Tensor, rewards: Tensor, keep: Tensor,
                  k: int = SHOWN_RECORDS) -> dict:
    """records.jsonl's line for a round: the number of records scored (`records`), the k highest-scoring ones
    (`top`, descending) and the k lowest (`bottom`, ascending; non-finite scores left out), each with its index in the
    batch, score, reward, whether the filter kept it, and its prompt and completion decoded with the task's
    vocabulary."""
    values = scores_.detach().double().cpu().numpy()
    finite = np.flatnonzero(np.isfinite(values))
    top, bottom = top_bottom(values[finite], k)

    def text(ids: Tensor, mask: Tensor) -> str:
        return task.language.decode(ids[mask.bool()].tolist())

    def record(i: int) -> dict:
        return {"index": i, "score": float(values[i]), "reward": float(rewards[i]), "kept": bool(keep[i]),
                "prompt": text(records.prompt_ids[i], records.prompt_mask[i]),
                "completion": text(records.completion_ids[i], records.completion_mask[i])}

    return {"round": round_index, "records": len(values), "top": [record(int(finite[i])) for i in top],
            "bottom": [record(int(finite[i])) for i in bottom]}


def _initial_row(task: Task, policy, cfg: ExperimentConfig) -> dict:
    return {"round": 0, **task.evaluate(policy, "test", cfg.eval_seed, cfg.eval_samples),
            **dict.fromkeys(TRAINING_FIELDS), "wall_seconds": 0.0}


# ----------------------------------------------------------------------------------------------------------------------
# Our sequence PPO
# ----------------------------------------------------------------------------------------------------------------------
def _run_ppo(task: Task, method: str, seed: int, rounds: int, run_dir: Path, resume: bool, cfg: ExperimentConfig,
             metrics: _RoundLines, records: _RoundLines, log) -> None:
    torch.manual_seed(seed)  # LoRA's A initialisation
    policy = scores.lora(task.policy(), r=cfg.lora_r, alpha=2 * cfg.lora_r)
    ppo_cfg = replace(cfg.ppo, filter=FILTER_OF[method], p=1.0, attribute=method != "ppo",
                      target_policy=cfg.target_policy)
    loop = SequencePPO(task, policy, ppo_cfg, seed=seed)
    ckpt, wall = run_dir / "checkpoint.pt", 0.0
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        loop.load_state_dict(state["ppo"])
        wall = state["wall_seconds"]
        metrics.truncate(loop.round_index + 1)
        records.truncate(loop.round_index + 1)
        log(f"rlhf: resuming {run_dir} after round {loop.round_index}")
    else:
        metrics.truncate(0)
        records.truncate(0)
        metrics.write(_initial_row(task, policy, cfg))
    start = time.perf_counter() - wall
    while loop.round_index < rounds:
        rnd = loop.round()
        stats = rnd.stats
        if rnd.scores is not None:
            records.write(shown_records(task, loop.round_index, rnd.records, rnd.scores, rnd.rewards, rnd.keep))
        row = {"round": loop.round_index, **task.evaluate(policy, "test", cfg.eval_seed, cfg.eval_samples),
               **{k: stats[k] for k in ("kept_fraction", "attr_seconds", "rollout_seconds", "update_seconds",
                                        "train_reward")},
               "round_seconds": stats["rollout_seconds"] + stats["attr_seconds"] + stats["update_seconds"],
               "wall_seconds": time.perf_counter() - start}
        metrics.write(row)
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"ppo": loop.state_dict(), "wall_seconds": row["wall_seconds"]}, tmp)
        os.replace(tmp, ckpt)
        log(f"rlhf ppo/{method} seed {seed} round {row['round']}: reward {row['reward']:.3f} toxicity "
            f"{row['toxicity']:.3f} kept {row['kept_fraction']:.2f} ({row['round_seconds']:.1f} s)")


# ----------------------------------------------------------------------------------------------------------------------
# TRL's GRPO
# ----------------------------------------------------------------------------------------------------------------------
def _committed(trl_dir: Path) -> list[Path]:
    """TRL checkpoint folders whose COMMITTED marker was written (complete ones), oldest first."""
    found = [p for p in trl_dir.glob("checkpoint-*") if (p / "COMMITTED").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _run_grpo(task: Task, method: str, seed: int, rounds: int, run_dir: Path, resume: bool, cfg: ExperimentConfig,
              metrics: _RoundLines, records: _RoundLines, log) -> None:
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from ..integrations.trl import IIFGRPOTrainer

    g = cfg.grpo
    steps_per_round = g.steps_per_generation * g.iterations
    trl_dir = run_dir / "trl"
    checkpoint = None
    if resume:
        done = _committed(trl_dir)
        checkpoint = str(done[-1]) if done else None
    for p in trl_dir.glob("checkpoint-*"):  # incomplete ones, and any after the one resumed from
        if checkpoint is None or int(p.name.split("-")[1]) > int(Path(checkpoint).name.split("-")[1]):
            shutil.rmtree(p)
    torch.manual_seed(seed)
    policy = scores.lora(task.policy(), r=cfg.lora_r, alpha=2 * cfg.lora_r)
    lang = task.language

    def reward(completion_ids, **kwargs):
        ids, mask = pad_rows([list(c) or [EOS] for c in completion_ids], PAD, side="right")
        return task.reward_model.reward(ids, mask).tolist()

    def target(trainer):
        model = trainer.accelerator.unwrap_model(trainer.model)
        seed_ = derived_seed(seed, trainer.state.global_step, 2)
        if cfg.target_policy == "current":
            return scores.validation_target(task, model, seed_, position_ids=False)
        with model.disable_adapter():
            return scores.validation_target(task, model, seed_, position_ids=False)

    args = GRPOConfig(
        output_dir=str(trl_dir), use_cpu=True, bf16=False, gradient_checkpointing=False, seed=seed,
        per_device_train_batch_size=g.prompts * g.generations // g.steps_per_generation,
        steps_per_generation=g.steps_per_generation, num_generations=g.generations, num_iterations=g.iterations,
        max_completion_length=task.config.max_new_tokens, learning_rate=g.lr, lr_scheduler_type="constant",
        max_steps=rounds * steps_per_round, save_strategy="steps", save_steps=steps_per_round, save_total_limit=2,
        logging_steps=steps_per_round, report_to=[], disable_tqdm=True)
    dataset = Dataset.from_dict({"prompt": [lang.decode(p) for p in task.prompts["train"]]})
    common = {"model": policy, "reward_funcs": reward, "args": args, "train_dataset": dataset,
              "processing_class": task.tokenizer()}
    if method == "ppo":
        trainer = _timed(GRPOTrainer)(**common)
    else:
        trainer = _timed(IIFGRPOTrainer)(**common, filter=FILTER_OF[method], p=1.0, target=target)
    trainer.remove_callback(PrinterCallback)

    class Rounds(TrainerCallback):
        """Evaluates at the end of each round, writes its metrics line, and commits TRL's checkpoint."""

        def __init__(self):
            self.wall = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            if checkpoint is None:
                metrics.truncate(0)
                records.truncate(0)
                metrics.write(_initial_row(task, policy, cfg))
            else:
                self.wall = json.loads((Path(checkpoint) / "COMMITTED").read_text())["wall_seconds"]
                metrics.truncate(state.global_step // steps_per_round + 1)
                records.truncate(state.global_step // steps_per_round + 1)
                log(f"rlhf: resuming {run_dir} after round {state.global_step // steps_per_round}")
            self.start = time.perf_counter() - self.wall

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step % steps_per_round == 0:
                self.round_start, trainer.rollout_seconds = time.perf_counter(), 0.0

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % steps_per_round:
                return
            seconds = time.perf_counter() - self.round_start
            attr = getattr(trainer, "last_seconds", 0.0)
            keep = getattr(trainer, "last_keep", None)
            rollout = trainer.rollout_seconds - attr
            row = {"round": state.global_step // steps_per_round,
                   **task.evaluate(policy, "test", cfg.eval_seed, cfg.eval_samples),
                   "kept_fraction": 1.0 if keep is None else float(keep.float().mean()), "attr_seconds": attr,
                   "rollout_seconds": rollout, "update_seconds": seconds - rollout - attr, "round_seconds": seconds,
                   "train_reward": trainer.last_reward, "wall_seconds": time.perf_counter() - self.start}
            self.wall = row["wall_seconds"]
            scored = getattr(trainer, "last_scores", None)  # IIFGRPOTrainer: this round's generation batch
            if scored is not None:
                batch = trainer.last_records
                records.write(shown_records(task, row["round"], batch, scored, task.reward(batch), trainer.last_keep))
            metrics.write(row)
            log(f"rlhf grpo/{method} seed {seed} round {row['round']}: reward {row['reward']:.3f} toxicity "
                f"{row['toxicity']:.3f} kept {row['kept_fraction']:.2f} ({seconds:.1f} s)")

        def on_save(self, args, state, control, **kwargs):
            folder = trl_dir / f"checkpoint-{state.global_step}"
            tmp = folder / "COMMITTED.tmp"
            tmp.write_text(json.dumps({"round": state.global_step // steps_per_round, "wall_seconds": self.wall}))
            os.replace(tmp, folder / "COMMITTED")

    trainer.add_callback(Rounds())
    trainer.train(resume_from_checkpoint=checkpoint)


def _timed(cls):
    """`cls` (a GRPO trainer class) timing its generation and reward (TRL's `_generate_and_score_completions`, the
    attribution included for IIFGRPOTrainer) into `rollout_seconds`, with the batch's mean reward in `last_reward`."""

    class Timed(cls):
        rollout_seconds, last_reward = 0.0, None

        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            output = super()._generate_and_score_completions(inputs)
            self.rollout_seconds += time.perf_counter() - t0
            self.last_reward = self._metrics["train"]["reward"][-1]
            return output

    return Timed


# ----------------------------------------------------------------------------------------------------------------------
def run_rlhf(method: str, trainer: str, seed: int = 0, rounds: int = 20, run_dir: str | os.PathLike = "runs/rlhf",
             resume: bool = False, *, config: ExperimentConfig | None = None,
             cache_dir: str | os.PathLike | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Trains with `method` (ppo | iif | random) and `trainer` (grpo | ppo) for `rounds` rounds and returns the
    metrics rows (also in `<run_dir>/metrics.jsonl`). The task is built or loaded from `cache_dir` (default
    runs/rlhf-cache). `resume=True` continues a run from its last committed round (a run directory that holds a run
    is refused without it, so that nothing is overwritten by accident: `check_run_dir`)."""
    _check(method, trainer, rounds)
    cfg = config or ExperimentConfig()
    run_dir = Path(run_dir)
    meta = run_meta(method, trainer, seed, cfg)
    check_run_dir(run_dir, meta, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    meta_path = run_dir / "run.json"
    if not meta_path.exists():
        meta_path.write_text(json.dumps(meta, indent=1))
    task = build_task(cfg.task, cache_dir, log)
    base = {"method": method, "trainer": trainer, "seed": seed}
    metrics, records = _RoundLines(run_dir / "metrics.jsonl", base), _RoundLines(run_dir / "records.jsonl", base)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical resumption: one intra-op thread
    try:
        with warnings.catch_warnings():  # TRL 1.x uses transformers' deprecated checkpointing names at every step
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning)
            run = _run_ppo if trainer == "ppo" else _run_grpo
            run(task, method, seed, rounds, run_dir, resume, cfg, metrics, records, log)
    finally:
        torch.set_num_threads(threads)
    return metrics.rows()
