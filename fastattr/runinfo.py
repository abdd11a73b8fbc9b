"""Reading a run directory for the application tools (diagnose, behaviour, intervene, validate, report).

A run dir (written by `fastattr train`) holds:
    args.json                      the run's arguments (env id, seed, hyperparameters)   [optional for the tools here]
    metrics.jsonl                  one JSON object per round
    attribution/round_XXXXX.npz    per-round records (fastattr.store), with --save-attribution
    checkpoints/...                per-round model checkpoints
The tools write their own outputs next to these (diagnose_round_k.*, behaviour_*.json, intervene_*.json, ...).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import store
from .store import read_jsonl
from .probes import ACTION_NAMES, env_family  # noqa: F401  (re-exported for the applications)

ARGS_FILES = ("args.json", "config.json")

# Human-readable action names for the paper's environments (index = action id).
def action_name(env_id: str | None, a) -> str:
    names = ACTION_NAMES.get(env_family(env_id) or "", [])
    a_arr = np.asarray(a)
    if a_arr.ndim == 0 and float(a_arr) == int(a_arr) and 0 <= int(a_arr) < len(names):
        return names[int(a_arr)]
    return np.array2string(a_arr, precision=2) if a_arr.ndim else f"{a_arr.item():g}"


@dataclass
class Run:
    path: Path
    args: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)

    @property
    def env_id(self) -> str | None:
        for key in ("env_id", "env", "env_name"):
            if isinstance(self.args.get(key), str):
                return self.args[key]
        return None

    @property
    def name(self) -> str:
        return self.path.name


def load_run(run_dir: str | os.PathLike) -> Run:
    """Reads a run dir. Raises FileNotFoundError naming what is missing when it holds neither metrics nor rounds."""
    p = Path(run_dir)
    if not p.is_dir():
        raise FileNotFoundError(f"run dir {p} does not exist")
    args = {}
    for name in ARGS_FILES:
        if (p / name).exists():
            try:
                args = json.loads((p / name).read_text())
            except (UnicodeDecodeError, ValueError) as e:
                raise ValueError(f"{p / name} is damaged ({e}); restore it, or train the run again") from None
            break
    run = Run(p, args, read_jsonl(p / "metrics.jsonl"), store.saved_rounds(p))
    if not run.metrics and not run.rounds and not args:
        raise FileNotFoundError(
            f"{p} does not look like a fastattr run dir: no args.json, metrics.jsonl or attribution/round_*.npz "
            "(create one with `fastattr train ... --run-dir DIR --save-attribution`)"
        )
    return run


def load_round(run_dir: str | os.PathLike, k: int, required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """store.load_round plus a clear error naming the missing fields (e.g. a run saved by another version)."""
    data = store.load_round(run_dir, k)
    missing = [key for key in required if key not in data]
    if missing:
        raise KeyError(
            f"round {k} in {run_dir} lacks {missing} (it has {sorted(data)}); it was written by a different fastattr "
            "version or without --save-attribution: re-run `fastattr train --save-attribution`"
        )
    return data


def parse_int_list(spec: str, what: str = "--seeds", at_most: int = 1000) -> list[int]:
    """'0-4' -> [0..4]; '0,3,7' -> [0, 3, 7]: sorted, without repeats. An empty item ('0,,1'), a reversed range, a
    negative number, an empty list or more than `at_most` values (e.g. '0-1000000' seeds: a million runs) is an
    error."""
    out: list[int] = []
    try:
        for part in str(spec).split(","):
            part = part.strip()
            a, sep, b = part.partition("-")
            lo, hi = (int(a), int(b)) if sep else (int(part), int(part))
            if lo < 0 or hi < lo:
                raise ValueError
            if hi - lo + 1 + len(out) > at_most:
                raise OverflowError
            out.extend(range(lo, hi + 1))
    except OverflowError:
        raise ValueError(f"{what} {spec!r} asks for more than {at_most} values; give a smaller range") from None
    except ValueError:
        raise ValueError(f"{what} must look like '0-4' or '0,2,5' (non-negative, no empty item), got {spec!r}") \
            from None
    return sorted(dict.fromkeys(out))


def parse_rounds(spec: str, available: list[int]) -> list[int]:
    """'3' -> [3]; '1,4,7' -> [1,4,7]; '2-5' -> [2,3,4,5]; 'all' -> available (the rounds saved). A round that was
    not saved is reported by the tool that needs it, with the rounds that were."""
    if spec == "all":
        if not available:
            raise ValueError("no rounds were saved in this run (train with --save-attribution)")
        return list(available)
    return parse_int_list(spec, "--round", at_most=1_000_000)


def parse_seeds(spec: str) -> list[int]:
    """'0-2' -> [0, 1, 2]; '0,5' -> [0, 5]."""
    return parse_int_list(spec, "--seeds")


# ---------------------------------------------------------------------------------------------------------------------
# Re-creating a round's model and buffer (needs fastattr.ppo; imported lazily so report/diagnose stay light)

BUFFER_FIELDS = ("obs", "actions", "logp", "values", "rewards", "dones", "adv_gae", "returns")


def ppo_args(run: Run, **overrides):
    """fastattr.Args of the run (from args.json), with overrides. Clear error for a run from another version."""
    from .rl.config import Args
    if not run.args:
        raise FileNotFoundError(f"{run.path} has no args.json; it was not written by `fastattr train`")
    fields = set(Args.__dataclass_fields__)
    unknown = sorted(set(run.args) - fields)
    if unknown:
        raise ValueError(f"{run.path}/args.json has arguments this fastattr does not know ({unknown}); the run was "
                         "written by another fastattr version: re-train it with this one")
    args = Args(**{**run.args, **overrides})
    args.run_dir = str(run.path)
    args.progress = False
    return args


def make_agent(args):
    """A fresh Agent for the run's env (spaces from one env instance)."""
    from . import envs as envs_lib
    from .rl.agent import Agent
    env = envs_lib.make_env(args.env_id, args.env_kwargs)()
    try:
        return Agent(env.observation_space, env.action_space, args.network, args.hidden, args.features_dim)
    finally:
        env.close()


def load_theta(run: Run, k: int, args=None):
    """(agent, optimizer) at θ(k), the parameters that collected and scored B(k) (saved with --save-attribution)."""
    import torch

    from .rl.agent import make_optimizer
    from .rl.rundir import theta_path
    args = args or ppo_args(run)
    path = theta_path(run.path, k)
    if not path.exists():
        have = sorted(int(p.stem.split("_")[-1]) for p in path.parent.glob("theta_*.pt"))
        raise FileNotFoundError(f"θ({k}) was not saved in {run.path} ({path.name} missing; saved: {have[:10]}"
                                f"{'...' if len(have) > 10 else ''}); train with --save-attribution")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # cut or overwritten: torch raises several kinds
        raise ValueError(f"{path} is damaged ({type(e).__name__}); delete it and the round's attribution file, or "
                         "train the run again with --save-attribution") from None
    agent = make_agent(args)
    agent.load_state_dict(ckpt["agent"])
    optimizer = make_optimizer(agent, args)
    if "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    return agent, optimizer


def load_buffer(run: Run, k: int, continuous: bool = False):
    """(Buffer of B(k) with its GAE advantages and value targets, the round's raw arrays)."""
    import torch

    from .rl.rollout import Buffer
    data = load_round(run.path, k, required=BUFFER_FIELDS + ("score_return",))
    t = {key: torch.as_tensor(np.asarray(v)) for key, v in data.items()}
    n = len(t["rewards"])
    zeros = torch.zeros(n)
    actions = t["actions"].float() if continuous else t["actions"].long()
    buf = Buffer(
        obs=t["obs"].float(), actions=actions, logp=t["logp"].float(), values=t["values"].float(),
        rewards=t["rewards"].float(), bootstrap=t.get("bootstrap", zeros).float(), dones=t["dones"].float(),
        terminated=t.get("terminated", t["dones"]).float(), next_value=t.get("next_value", torch.zeros(1)).float(),
        num_envs=int(data.get("num_envs", 1)), advantages=t["adv_gae"].float(), returns=t["returns"].float(),
    )
    return buf, data


def run_tool(name: str, compute, write, to_markdown, out_dir) -> int:
    """The shared tail of `fastattr behaviour | intervene | validate`: run `compute()`, write its files, print the
    markdown summary; a bad run dir, round or probe becomes one clear error line and exit code 2."""
    try:
        res = compute()
        files = write(res, out_dir)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"fastattr {name}: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nfastattr {name}: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(to_markdown(res))
    print("wrote " + ", ".join(files.values()))
    return 0
