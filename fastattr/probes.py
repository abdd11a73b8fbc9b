"""Probes: predicates on (state, action) that pick the records of a behaviour, for `fastattr behaviour` (paper §4.2).

A probe maps a round's raw observations obs [N, ...] and actions [N] to a bool mask [N]. Named probes:

    frozenlake-down / -right / -left / -up     FrozenLake: that move, in any cell
    minigrid-turn                               MiniGrid: turn left or right (actions 0, 1)
    minigrid-turn-at-wall                       MiniGrid: turn while the cell in front is a wall
    minigrid-forward                            MiniGrid: move forward
    highway-slower-when-tailing                 highway: SLOWER while a car is close ahead in the same lane (Fig. 4)
    acrobot-torque-pos / -neg                   Acrobot: torque +1 / -1
and generic ones, for any env with discrete actions (and discrete states for `state=`):
    action=K          every record with action K
    state=S           every record in state S (FrozenLake cell index)
    state=S,action=K  both
Thresholds of the highway probe can be given after a colon: `highway-slower-when-tailing:gap=0.15,lane=0.1`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

ACTION_NAMES = {
    "FrozenLake": ["LEFT", "DOWN", "RIGHT", "UP"],
    "MiniGrid": ["left", "right", "forward", "pickup", "drop", "toggle", "done"],
    "Acrobot": ["torque -1", "torque 0", "torque +1"],
    "CartPole": ["push left", "push right"],
    "LunarLander": ["noop", "fire left", "fire main", "fire right"],
    "highway": ["LANE_LEFT", "IDLE", "LANE_RIGHT", "FASTER", "SLOWER"],
    "merge": ["LANE_LEFT", "IDLE", "LANE_RIGHT", "FASTER", "SLOWER"],
}


def env_family(env_id: str | None) -> str | None:
    """'FrozenLake-v1' -> 'FrozenLake', 'MiniGrid-Empty-8x8-v0' -> 'MiniGrid', 'highway-fast-v0' -> 'highway'."""
    if not env_id:
        return None
    for fam in ACTION_NAMES:
        if env_id.lower().startswith(fam.lower()):
            return fam
    return env_id.split("-")[0]


# The range an episode's return can take, per env family (where it is known): plots clip confidence bands to it.
RETURN_RANGES: dict[str, tuple[float, float]] = {
    "FrozenLake": (0.0, 1.0), "MiniGrid": (0.0, 1.0), "CartPole": (0.0, 500.0), "Acrobot": (-500.0, 0.0),
}


def return_range(env_id: str | None) -> tuple[float, float] | None:
    """(lowest, highest) possible return of an episode of env_id, or None when not known."""
    return RETURN_RANGES.get(env_family(env_id) or "")


@dataclass
class Probe:
    name: str
    description: str
    fn: Callable[[np.ndarray, np.ndarray], np.ndarray]
    families: tuple[str, ...] = ()          # env families it applies to; () = any
    actions: tuple[int, ...] = ()           # the behaviour's actions (for "same action" statistics); () = unknown
    params: dict = field(default_factory=dict)

    def __call__(self, obs, actions) -> np.ndarray:
        obs, actions = np.asarray(obs), np.asarray(actions)
        mask = np.asarray(self.fn(obs, actions), dtype=bool).reshape(-1)
        if len(mask) != len(actions):
            raise ValueError(f"probe {self.name} returned {len(mask)} values for {len(actions)} records")
        return mask

    def check_env(self, env_id: str | None) -> None:
        fam = env_family(env_id)
        if self.families and fam is not None and fam not in self.families:
            raise ValueError(f"probe {self.name!r} is for {', '.join(self.families)} runs, but this run is {env_id}; "
                             f"see `fastattr behaviour --list-probes`")


def _acts(actions) -> np.ndarray:
    a = np.asarray(actions)
    return a.reshape(len(a), -1)[:, 0] if a.ndim > 1 else a


def _action_is(*ks: int):
    return lambda obs, actions: np.isin(np.round(_acts(actions)).astype(np.int64), ks)


def _state_ids(obs) -> np.ndarray:
    o = np.asarray(obs)
    if o.ndim == 2 and o.shape[1] > 1:
        return o.argmax(1)
    return np.round(o.reshape(len(o))).astype(np.int64)


def _minigrid_image(obs) -> np.ndarray:
    """[N, 7, 7, 3] object/colour/state codes from raw MiniGrid observations (HWC, CHW or flattened)."""
    o = np.asarray(obs)
    n = len(o)
    if o.ndim == 4 and o.shape[1] == 3 and o.shape[-1] != 3:
        o = np.transpose(o, (0, 2, 3, 1))
    elif o.ndim == 2:
        side = int(round(np.sqrt(o.shape[1] // 3)))
        o = o.reshape(n, side, side, 3)
    return np.round(o).astype(np.int64)


def _front_is_wall(obs) -> np.ndarray:
    img = _minigrid_image(obs)
    w, h = img.shape[1], img.shape[2]
    # the egocentric view has the agent at (w // 2, h - 1) facing up, so the cell in front is (w // 2, h - 2);
    # MiniGrid's OBJECT_TO_IDX["wall"] = 2
    return img[:, w // 2, h - 2, 0] == 2


def _highway_tailing(obs, gap: float, lane: float) -> np.ndarray:
    """A present vehicle ahead within `gap` (normalised x) and within `lane` (normalised |y|) of the ego vehicle.
    highway-env's default Kinematics observation: rows = vehicles (row 0 = ego), columns presence, x, y, vx, vy,
    others relative to ego, x normalised by 5 * MAX_SPEED = 200 m and y by the road half-width (4 m per lane), so
    gap 0.15 is about 30 m and lane 0.1 is less than half a lane for up to 5 lanes."""
    o = np.asarray(obs, dtype=np.float64)
    o = o.reshape(len(o), -1, 5)
    others = o[:, 1:, :]
    close = (others[..., 0] > 0.5) & (others[..., 1] > 0) & (others[..., 1] < gap) & (np.abs(others[..., 2]) < lane)
    return close.any(axis=1)


def _named() -> dict[str, Callable[[dict], Probe]]:
    fl = ("FrozenLake",)
    mg = ("MiniGrid",)
    moves = {"left": 0, "down": 1, "right": 2, "up": 3}
    out: dict[str, Callable[[dict], Probe]] = {}
    for word, k in moves.items():
        out[f"frozenlake-{word}"] = (lambda k=k, word=word: lambda p: Probe(
            f"frozenlake-{word}", f"FrozenLake: move {word.upper()} (any cell)", _action_is(k), fl, (k,)))()
    out["minigrid-turn"] = lambda p: Probe("minigrid-turn", "MiniGrid: turn left or right", _action_is(0, 1), mg,
                                           (0, 1))
    out["minigrid-forward"] = lambda p: Probe("minigrid-forward", "MiniGrid: move forward", _action_is(2), mg, (2,))
    out["minigrid-turn-at-wall"] = lambda p: Probe(
        "minigrid-turn-at-wall", "MiniGrid: turn while facing a wall",
        lambda o, a: _action_is(0, 1)(o, a) & _front_is_wall(o), mg, (0, 1))

    def highway(p):
        gap, lane = float(p.get("gap", 0.15)), float(p.get("lane", 0.1))
        return Probe("highway-slower-when-tailing", f"highway: SLOWER with a car ahead in the lane within "
                     f"{gap:g} (x, normalised) and {lane:g} (|y|)",
                     lambda o, a: _action_is(4)(o, a) & _highway_tailing(o, gap, lane), ("highway", "merge"), (4,),
                     {"gap": gap, "lane": lane})

    out["highway-slower-when-tailing"] = highway
    out["acrobot-torque-pos"] = lambda p: Probe("acrobot-torque-pos", "Acrobot: torque +1", _action_is(2),
                                                ("Acrobot",), (2,))
    out["acrobot-torque-neg"] = lambda p: Probe("acrobot-torque-neg", "Acrobot: torque -1", _action_is(0),
                                                ("Acrobot",), (0,))
    return out


NAMED = _named()


def _kv(spec: str) -> dict[str, str]:
    out = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"probe parameter {part!r} is not key=value")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def get_probe(spec: str) -> Probe:
    """A named probe (optionally `name:key=value,...`) or a generic `action=K`, `state=S`, `state=S,action=K`."""
    if not spec:
        raise ValueError("--probe is empty; see `fastattr behaviour --list-probes`")
    name, _, params = spec.partition(":")
    if name in NAMED:
        return NAMED[name](_kv(params))
    try:
        kv = _kv(spec)
    except ValueError:
        kv = {}
    if kv and set(kv) <= {"action", "state"}:
        try:
            a = int(kv["action"]) if "action" in kv else None
            s = int(kv["state"]) if "state" in kv else None
        except ValueError:
            raise ValueError(f"probe {spec!r}: action and state must be integers") from None

        def fn(obs, actions):
            m = np.ones(len(actions), dtype=bool)
            if a is not None:
                m &= _action_is(a)(obs, actions)
            if s is not None:
                m &= _state_ids(obs) == s
            return m
        return Probe(spec, f"records with {spec.replace(',', ' and ')}", fn, (), (a,) if a is not None else ())
    raise ValueError(f"unknown probe {spec!r}; named probes: {', '.join(NAMED)}; or action=K, state=S, "
                     "state=S,action=K")


def describe() -> str:
    lines = [f"  {name:<30} {NAMED[name]({}).description}" for name in NAMED]
    lines += ["  action=K / state=S / state=S,action=K   generic (discrete actions / discrete states)"]
    return "\n".join(lines)
