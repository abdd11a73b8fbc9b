"""The run dir of `fastattr train`: args.json, the lock, atomic writes, checkpoints (everything a bit-identical resume
needs, the metrics rows included) and metrics.jsonl.

    <run-dir>/args.json             the run's semantic arguments (a resume must match them; see EXTENDABLE)
    <run-dir>/metrics.jsonl         one line per round (rebuilt from the checkpoint on every resume)
    <run-dir>/checkpoints/latest.pt the last finished round: weights, optimiser, every RNG, the envs' replay records
    <run-dir>/checkpoints/theta_k.pt theta(k) with --save-attribution
    <run-dir>/.lock                 held while a process trains the run
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import sys
import time
import warnings
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from .. import store
from .agent import Agent
from .config import NON_SEMANTIC, Args
from .rollout import RolloutState

CHECKPOINT_FORMAT = 2  # 2: the checkpoint also carries the metrics rows, from which metrics.jsonl is rebuilt
READABLE_FORMATS = (1, 2)
EXTENDABLE = ("total_timesteps",)  # a resume may raise these (a finished run is extended by more rounds)


class RunDirError(ValueError):
    """The run dir cannot be used as asked (another run, files fastattr did not write, damage); says what to do."""


def semantic_args(args: Args) -> dict:
    return {k: v for k, v in asdict(args).items() if k not in NON_SEMANTIC}


def recorded_args(run_dir) -> dict:
    """A run's args.json, with the default filled in for every option added after that run started (absent from
    its args.json: it ran with the option's default)."""
    path = Path(run_dir) / "args.json"
    try:
        theirs = json.loads(path.read_text())
        if not isinstance(theirs, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RunDirError(f"{path} is damaged ({e}): the run's arguments cannot be read. Restore the file, or start "
                          "the run again in a new --run-dir") from None
    defaults = {f.name: f.default_factory() if f.default is MISSING else f.default
                for f in fields(Args) if f.name not in NON_SEMANTIC}
    return {**{k: v for k, v in defaults.items() if k not in theirs}, **theirs}


def args_differences(recorded: dict, now: dict) -> str:
    """'' when two semantic-args dicts agree, else 'name: X there vs Y now, ...'."""
    keys = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
    return ", ".join(f"{k}: {recorded.get(k)!r} there vs {now.get(k)!r} now" for k in keys)


def checkpoint_path(run_dir) -> Path:
    return Path(run_dir) / "checkpoints" / "latest.pt"


def theta_path(run_dir, k: int) -> Path:
    """theta(k), the parameters that collected and scored B(k) (saved with --save-attribution)."""
    return Path(run_dir) / "checkpoints" / f"theta_{k:05d}.pt"


def _make_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--run-dir {run_dir} is a file, not a directory; choose another --run-dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"--run-dir {run_dir} cannot be created ({e.strerror}); choose a writable place") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise RunDirError(f"--run-dir {run_dir} is not writable; choose another --run-dir or fix its permissions")


def prepare_run_dir(args: Args) -> tuple[Path, dict | None]:
    """Creates or checks the run dir and locks it for this process (see `lock_run_dir`). Returns (path, checkpoint or
    None). Never overwrites another run. A resume may raise --total-timesteps (the run continues from its last round,
    exactly as a longer run would have)."""
    run_dir = Path(args.run_dir)
    args_file = run_dir / "args.json"
    mine = semantic_args(args)
    if run_dir.is_dir() and not args_file.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise RunDirError(f"run dir {run_dir} is not empty and holds no fastattr run (no args.json); choose "
                          "another --run-dir. Nothing was changed.")
    _make_dir(run_dir)
    lock_run_dir(run_dir)  # before reading or writing anything in it: a second process stops here
    if not args_file.exists():
        atomic_write_text(args_file, json.dumps(mine, indent=2, sort_keys=True) + "\n")
        return run_dir, None
    recorded = recorded_args(run_dir)
    diff = args_differences(recorded, mine)
    if diff and not _holds_results(run_dir):  # stopped before its first round (e.g. a bad env setting)
        print(f"run dir {run_dir}: its run stopped before finishing a round ({diff}); starting over with the new "
              "arguments", file=sys.stderr)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        atomic_write_text(args_file, json.dumps(mine, indent=2, sort_keys=True) + "\n")
        return run_dir, None
    changed = {k for k in set(recorded) | set(mine) if recorded.get(k) != mine.get(k)}
    if changed and changed <= set(EXTENDABLE) and args.resume:
        if mine["total_timesteps"] < recorded["total_timesteps"]:
            raise RunDirError(f"run dir {run_dir} holds a run of --total-timesteps {recorded['total_timesteps']}; a "
                              "resume can extend a run but not shorten it. Nothing was changed.")
        print(f"run dir {run_dir}: extending the run to --total-timesteps {mine['total_timesteps']}", file=sys.stderr)
        atomic_write_text(args_file, json.dumps(mine, indent=2, sort_keys=True) + "\n")
    elif diff:
        raise RunDirError(f"run dir {run_dir} holds another run ({diff}); choose another --run-dir, or pass "
                          "the same arguments to --resume it (a larger --total-timesteps extends it). Nothing was "
                          "changed.")
    if not args.resume:
        raise RunDirError(f"run dir {run_dir} already holds this run; pass --resume to continue it, or choose "
                          "another --run-dir. Nothing was changed.")
    ckpt_file = checkpoint_path(run_dir)
    return run_dir, (load_checkpoint(ckpt_file) if ckpt_file.exists() else None)


LOCK_FILE = ".lock"
_held_locks: dict[str, object] = {}  # resolved run dir -> the open lock file this process holds


def _holds_results(run_dir: Path) -> bool:
    """Anything beyond args.json and the round-0 evaluation (a checkpoint, saved attribution, ...)."""
    return any(p.is_file() and p.name not in (LOCK_FILE, "args.json", "metrics.jsonl") for p in run_dir.rglob("*"))


def lock_run_dir(run_dir: Path) -> None:
    """Takes an exclusive flock on <run-dir>/.lock for the rest of this run, so that a second process (a `--resume`
    or a `fastattr compare` started while the first still runs) stops with an error instead of writing into the same
    run dir. The kernel drops the lock when the process ends, killed or not: nothing stale is left to clean up."""
    key = str(run_dir.resolve())
    if key in _held_locks:
        return
    f = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise RunDirError(f"run dir {run_dir} is in use by another fastattr process (pid {holder}); wait for it to "
                          "finish, or stop it and pass --resume. Nothing was changed.") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held_locks[key] = f


def release_run_dir(run_dir) -> None:
    """Drops this process's lock on run_dir (`main` does it when the run ends or fails)."""
    f = _held_locks.pop(str(Path(run_dir).resolve()), None)
    if f is not None:
        f.close()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    """torch.load(weights_only=True): checkpoints hold only tensors and plain Python types."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, empty or overwritten: torch raises several kinds
        first = (str(e) or "empty").splitlines()[0][:120]
        raise RunDirError(f"checkpoint {path} is damaged ({type(e).__name__}: {first}); the run cannot resume from "
                          "it: start it again in a new --run-dir") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in READABLE_FORMATS:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise RunDirError(f"{path} has checkpoint format {found}, this fastattr reads {READABLE_FORMATS}")
    return ckpt


def _np_state(rng: np.random.Generator) -> str:
    return json.dumps(rng.bit_generator.state)


def save_checkpoint(path: Path, *, round_: int, agent: Agent, optimizer, rngs: dict, envs: gym.vector.SyncVectorEnv,
                    state: RolloutState, totals: dict, rows: list[dict], finished: bool = False) -> None:
    """Everything a bit-identical resume needs: weights, optimiser, every RNG (torch global and ours, numpy global and
    ours, python), the rollout state, each training env's replay record (see envs.ReplayableEnv), and the metrics
    rows so far. rngs: {"train": torch.Generator, "filter": numpy Generator}."""
    np_global = np.random.get_state()
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "round": round_,
        "finished": finished,
        "agent": agent.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {
            "torch_global": torch.get_rng_state(),
            "train": rngs["train"].get_state(),
            "actions": _np_state(state.rng),
            "filter": _np_state(rngs["filter"]),
            "numpy_global": [np_global[0], torch.from_numpy(np_global[1].astype(np.int64)), *map(float, np_global[2:])],
            "python": random.getstate(),
        },
        "rollout": {
            "next_obs": torch.as_tensor(np.asarray(state.next_obs)),
            "ep_return": torch.as_tensor(state.ep_return),
            "ep_length": torch.as_tensor(state.ep_length),
            "global_step": state.global_step,
            "episodes": torch.as_tensor(state.episodes if state.episodes is not None else np.zeros(len(envs.envs),
                                                                                                    dtype=np.int64)),
            "episode_start": [list(e.episode_start) for e in envs.envs],
            "episode_actions": [torch.as_tensor(np.array(e.episode_actions)) for e in envs.envs],
        },
        "totals": dict(totals),
        "rows": rows,
    }
    atomic_torch_save(ckpt, path)


def restore_checkpoint(ckpt: dict, agent: Agent, optimizer, rngs: dict, envs: gym.vector.SyncVectorEnv,
                       action_rng: np.random.Generator, env_id: str) -> RolloutState:
    """Loads a checkpoint into the agent, the optimiser and the generators (in place) and replays the envs to their
    saved state; returns the rollout state."""
    agent.load_state_dict(ckpt["agent"])
    optimizer.load_state_dict(ckpt["optimizer"])
    rng = ckpt["rng"]
    torch.set_rng_state(rng["torch_global"])
    rngs["train"].set_state(rng["train"])
    rngs["filter"].bit_generator.state = json.loads(rng["filter"])
    ro = ckpt["rollout"]
    saved_obs = ro["next_obs"].numpy()
    for i, env in enumerate(envs.envs):
        start = tuple(ro["episode_start"][i])
        acts = ro["episode_actions"][i]
        obs = env.replay(start, [a.numpy() for a in acts] if acts.numel() else [])
        if not np.array_equal(np.asarray(obs), saved_obs[i]):
            warnings.warn(f"{env_id}: training env {i} could not be rebuilt exactly from its replay record (its "
                          "randomness is not all in np_random); the resumed run continues from the saved observation "
                          "but will not be bit-identical to an uninterrupted one", RuntimeWarning, stacklevel=2)
    # the global RNGs last: an env drawing from them during the replay must not move them
    ng = rng["numpy_global"]
    np.random.set_state((ng[0], ng[1].numpy().astype(np.uint32), int(ng[2]), int(ng[3]), float(ng[4])))
    random.setstate(_as_tuple(rng["python"]))
    action_rng.bit_generator.state = json.loads(rng["actions"])
    episodes = ro["episodes"].numpy().copy() if "episodes" in ro else np.zeros(len(envs.envs), dtype=np.int64)
    return RolloutState(saved_obs, ro["ep_return"].numpy().copy(), ro["ep_length"].numpy().copy(), action_rng,
                        int(ro["global_step"]), episodes)


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def rows_from_metrics(path: Path, last_round: int) -> list[dict]:
    """Rounds 0..last_round of a metrics.jsonl written before checkpoints carried the rows; lines past last_round
    (a kill between the log line and the checkpoint) are dropped. A missing, cut or garbled row is an error: it
    cannot be rebuilt without training the round again."""
    try:
        rows = {int(rec["round"]): rec for rec in store.read_jsonl(path)}
    except (ValueError, KeyError, TypeError) as e:
        raise RunDirError(f"{path} is damaged ({e}) and this run's checkpoint is too old to rebuild it. Restore the "
                          "file, or start the run again in a new --run-dir") from None
    missing = [r for r in range(last_round + 1) if r not in rows]
    if missing:
        raise RunDirError(f"{path} is damaged: rounds {missing[:5]}{'...' if len(missing) > 5 else ''} are missing, "
                          "and this run's checkpoint is too old to rebuild it. Restore the file, or start the run "
                          "again in a new --run-dir")
    return [rows[r] for r in range(last_round + 1)]


class RunDir:
    """One run's directory while `fastattr train` trains it: opened (created or checked, locked), started (fresh or
    restored from the checkpoint), then one `log_round` per round (metrics line + checkpoint). Leaving the `with`
    block drops the lock."""

    def __init__(self, args: Args):
        self.args, self.path = args, Path(args.run_dir)
        self.ckpt, self.rows, self.round, self.finished = None, [], 0, False
        self.totals = {"wall_seconds": 0.0}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        release_run_dir(self.path)

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def open(self) -> None:
        """Creates or checks the run dir, takes the lock, reads the checkpoint (RunDirError if anything is off)."""
        self.path, self.ckpt = prepare_run_dir(self.args)
        num_rounds = self.args.total_timesteps // (self.args.n_steps * self.args.num_envs)
        if self.ckpt is not None:
            self.round = int(self.ckpt["round"])
            self.rows = (list(self.ckpt["rows"]) if "rows" in self.ckpt
                         else rows_from_metrics(self.metrics_file, self.round))
            self.finished = self.round >= num_rounds
            if self.finished:
                self._rewrite_metrics()

    def start(self, agent: Agent, optimizer, rngs: dict, envs, obs0, action_rng) -> RolloutState:
        """The rollout state to train from: fresh (round 0 still to log) or restored from the checkpoint, whose rows
        then rebuild metrics.jsonl (whatever happened to the file)."""
        if self.ckpt is None:
            self.metrics_file.unlink(missing_ok=True)  # killed before its first checkpoint: start over
            state = RolloutState(obs0, np.zeros(self.args.num_envs), np.zeros(self.args.num_envs, dtype=np.int64),
                                 action_rng)
        else:
            state = restore_checkpoint(self.ckpt, agent, optimizer, rngs, envs, action_rng, self.args.env_id)
            self.totals.update(self.ckpt["totals"])
            self._rewrite_metrics()
        self._t = time.perf_counter()
        return state

    def _rewrite_metrics(self) -> None:
        atomic_write_text(self.metrics_file, "".join(json.dumps(row) + "\n" for row in self.rows))

    def log_round(self, row: dict, *, timers: dict, agent, optimizer, rngs: dict, envs, state: RolloutState,
                  finished: bool = False, steps: int = 0) -> None:
        """Completes the round's metrics row with its timings, appends it to metrics.jsonl, then saves the
        checkpoint (a kill in between re-runs the round identically on --resume)."""
        now = time.perf_counter()
        wall, self._t = now - self._t, now
        train = sum(timers.get(k, 0.0) for k in ("rollout", "attr", "update"))
        row.update(rollout_seconds=timers.get("rollout", 0.0), attr_seconds=timers.get("attr", 0.0),
                   update_seconds=timers.get("update", 0.0), train_seconds=train, eval_seconds=timers.get("eval", 0.0))
        if row["round"] > 0:
            row.update(io_seconds=timers.get("io", 0.0), sps=steps / max(train, 1e-9))
        self.totals["wall_seconds"] += wall
        row.update(wall_seconds=self.totals["wall_seconds"], time=time.time())
        store.append_jsonl(self.metrics_file, row)
        self.rows.append(row)
        save_checkpoint(checkpoint_path(self.path), round_=row["round"], agent=agent, optimizer=optimizer, rngs=rngs,
                        envs=envs, state=state, totals=self.totals, rows=self.rows, finished=finished)
        self.round = row["round"]

    def save_theta(self, k: int, agent, optimizer) -> None:
        """theta(k) and the optimiser state before round k's update (with --save-attribution)."""
        atomic_torch_save({"round": k, "agent": agent.state_dict(), "optimizer": optimizer.state_dict()},
                          theta_path(self.path, k))

    def result(self, already_finished: bool = False) -> dict:
        """The last metrics row plus `run_dir` (and `already_finished` when nothing was left to train)."""
        out = {**(self.rows[-1] if self.rows else {}), "run_dir": str(self.path)}
        if already_finished:
            out["already_finished"] = True
        return out
