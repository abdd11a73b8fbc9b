"""Environments for fastattr's PPO: `make_env` / `make_vector_env` and the paper's per-environment presets.

Observation handling follows Stable-Baselines3, which the paper used: the *agent* one-hot encodes Discrete
observations (FrozenLake), flattens Box observations (highway's 5x5 kinematics) and turns uint8 HWC images
(MiniGrid's 7x7x3 egocentric view) into CHW floats divided by 255. The environment therefore hands out raw
observations, and the buffers saved with --save-attribution hold the raw values (FrozenLake: the cell index).

Every sub-environment is wrapped in `ReplayableEnv` (outermost), which remembers how its current episode started
(a seed, or the state of the env's `np_random` just before an automatic reset) and the actions taken since. A
checkpoint stores those, and `--resume` re-creates the exact env state by replaying them, so a killed run
continues bit-identically without pickling environments (Box2D worlds cannot be pickled).
"""
from __future__ import annotations

import difflib
import functools
import importlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import gymnasium as gym
import numpy as np


@dataclass(frozen=True)
class Preset:
    """Paper settings for one environment (the paper's sections 3-4, appendix A.1-A.2, Table 1)."""

    total_timesteps: int
    p: float
    """fraction of the negative-influence records IIF drops"""
    optimizer: str = "sgd"
    learning_rate: float = 5e-3
    network: str = "mlp"
    eval_episodes: int = 100
    """ours; the paper evaluates 1000 episodes per round (100 for highway and BipedalWalker), too slow on 2 cores"""
    eval_every: int = 1
    env_kwargs: dict = field(default_factory=dict)
    paper_eval_episodes: int = 1000
    note: str = ""


_HIGHWAY_CONFIG = {"observation": {"type": "Kinematics"}, "action": {"type": "DiscreteMetaAction"},
                   "vehicles_count": 10}  # the official code's make_env

PAPER_PRESETS: dict[str, Preset] = {
    "FrozenLake-v1": Preset(102_400, 0.5, eval_episodes=1000, env_kwargs={"map_name": "4x4", "is_slippery": False}),
    "MiniGrid-Empty-8x8-v0": Preset(81_920, 0.125, network="cnn"),
    "Acrobot-v1": Preset(102_400, 0.5),
    "highway-v0": Preset(204_800, 0.5, eval_episodes=20, env_kwargs={"config": _HIGHWAY_CONFIG},
                         paper_eval_episodes=100, note="about 23 env steps/s here: ~2.5 h per run"),
    "highway-fast-v0": Preset(204_800, 0.5, eval_episodes=20, env_kwargs={"config": _HIGHWAY_CONFIG},
                              paper_eval_episodes=100, note="stand-in for highway-v0, several times faster"),
    "LunarLander-v3": Preset(307_200, 0.125),
    "BipedalWalker-v3": Preset(1_024_000, 0.0625, optimizer="adam", learning_rate=3e-4, eval_episodes=20,
                               eval_every=5, paper_eval_episodes=100,
                               note="1,024,000 steps = 500 rounds of 2048 (the paper prints 1000 rounds)"),
}


def paper_preset(env_id: str) -> Preset:
    if env_id not in PAPER_PRESETS:
        raise ValueError(
            f"--preset paper: no paper preset for env id {env_id!r}; the paper's environments are "
            f"{', '.join(PAPER_PRESETS)}. Drop --preset to use the generic defaults."
        )
    return PAPER_PRESETS[env_id]


_HIGHWAY_FAMILIES = {"highway", "merge", "roundabout", "intersection", "parking", "racetrack", "exit", "two",
                     "u", "lane"}  # first dash-separated word of highway-env's ids (two-way-v0, u-turn-v0, ...)


def _import_env_package(env_id: str) -> None:
    """Registers third-party env ids on demand, with an install hint instead of gymnasium's bare NameNotFound."""
    if env_id.startswith("MiniGrid") or env_id.startswith("BabyAI"):
        try:
            import minigrid  # noqa: F401
        except ImportError as e:
            raise ValueError(f"env id {env_id!r} needs the minigrid package: pip install minigrid") from e
    if env_id.split("-")[0] in _HIGHWAY_FAMILIES:
        try:
            import highway_env  # noqa: F401
        except ImportError as e:
            raise ValueError(f"env id {env_id!r} needs the highway-env package: pip install highway-env "
                             "(or pip install 'fastattr[envs]')") from e


def check_env_id(env_id: str) -> None:
    """Raises ValueError with close matches when gymnasium does not know env_id."""
    if not isinstance(env_id, str) or not env_id:
        raise ValueError(f"--env-id must be a gymnasium id such as 'CartPole-v1', got {env_id!r}")
    if ":" in env_id:  # 'my_module:MyEnv-v0': gym.make imports my_module (which registers the id); so do we
        module, _, name = env_id.partition(":")
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"--env-id {env_id!r}: cannot import module {module!r} ({e}); put it on PYTHONPATH") from e
    else:
        name = env_id
    _import_env_package(name)
    try:
        gym.spec(name)
    except gym.error.Error as e:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see gymnasium.pprint_registry() for known ids"
        raise ValueError(f"unknown --env-id {env_id!r} ({e}){hint}") from None


class ReplayableEnv(gym.Wrapper):
    """Records how the current episode began and every action since, so the env state can be rebuilt exactly.

    `episode_start` is ("seed", s) after reset(seed=s), else ("rng", <np_random bit-generator state as JSON>) taken
    just before the reset consumed any randomness. Replaying the episode's actions from there reproduces the
    env's state, its RNG state and the wrappers' counters (TimeLimit) for any env whose randomness is `np_random`.
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.episode_start: tuple[str, Any] = ("seed", None)
        self.episode_actions: list[np.ndarray] = []

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if options:
            raise ValueError("ReplayableEnv cannot replay a reset with options (a resumed run would replay it without "
                             f"them); got options={options!r}: pass the settings at env creation instead")
        if seed is not None:
            self.episode_start = ("seed", int(seed))
        else:
            self.episode_start = ("rng", json.dumps(self.env.unwrapped.np_random.bit_generator.state))
        self.episode_actions = []
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        self.episode_actions.append(np.array(action, copy=True))
        return self.env.step(action)

    def replay(self, episode_start: tuple[str, Any], actions: list[np.ndarray]):
        """Rebuilds the env from a saved episode start and action list; returns the observation reached."""
        kind, value = episode_start
        if kind == "seed":
            obs, _ = self.reset(seed=value)
        else:
            self.env.unwrapped.np_random.bit_generator.state = json.loads(value)
            obs, _ = self.reset()
        for a in actions:  # a[()]: a 0-d array back to the numpy scalar the vector env passed (FrozenLake: dict key)
            obs, *_ = self.step(a[()])
        return obs


class NumpyKinematics(gym.Wrapper):
    """highway-env's Kinematics observation, computed with numpy instead of pandas: the same array, bit for bit.

    highway-env's `KinematicObservation.observe` builds and concatenates pandas DataFrames for five rows every step,
    which was a large share of a highway-fast-v0 step. After each reset this swaps the env's observation
    object to a subclass whose `observe` does the same arithmetic (`utils.lmap`, `np.clip`) on a float64 array
    (tests/test_envs.py compares both on random rollouts). The default ranges still come from highway-env's own
    `normalize_obs`; other observation types are left alone.
    """

    def reset(self, **kwargs):
        out = self.env.reset(**kwargs)  # re-creates the observation object (highway-env's define_spaces)
        from highway_env.envs.common.observation import KinematicObservation

        obs_type = getattr(self.env.unwrapped, "observation_type", None)
        if type(obs_type) is KinematicObservation:
            obs_type.__class__ = _numpy_kinematics_class()
        return out


@functools.cache  # one class for every env and episode, built on the first highway reset
def _numpy_kinematics_class():
    import pandas as pd
    from highway_env import utils
    from highway_env.envs.common.observation import KinematicObservation

    class _NumpyKinematicObservation(KinematicObservation):
        def observe(self) -> np.ndarray:  # KinematicObservation.observe, step for step
            if not self.env.road:
                return np.zeros(self.space().shape)
            rows = [self.observer_vehicle.to_dict()]
            close_vehicles = self.env.road.close_objects_to(
                self.observer_vehicle, self.env.PERCEPTION_DISTANCE, count=self.vehicles_count - 1,
                see_behind=self.see_behind, sort=self.order == "sorted", vehicles_only=not self.include_obstacles)
            if close_vehicles:
                origin = self.observer_vehicle if not self.absolute else None
                rows += [v.to_dict(origin, observe_intentions=self.observe_intentions)
                         for v in close_vehicles[-self.vehicles_count + 1:]]
            obs = np.array([[row[f] for f in self.features] for row in rows], dtype=np.float64)
            if self.normalize:
                if not self.features_range:
                    self.normalize_obs(pd.DataFrame())  # highway-env fills in its default ranges
                for feature, f_range in self.features_range.items():
                    if feature in self.features:
                        j = self.features.index(feature)
                        obs[:, j] = utils.lmap(obs[:, j], [f_range[0], f_range[1]], [-1, 1])
                        if self.clip:
                            obs[:, j] = np.clip(obs[:, j], -1, 1)
            if obs.shape[0] < self.vehicles_count:
                obs = np.concatenate([obs, np.zeros((self.vehicles_count - obs.shape[0], len(self.features)))])
            if self.order == "shuffled":
                self.env.np_random.shuffle(obs[1:])
            return obs.astype(self.space().dtype)

    return _NumpyKinematicObservation


def make_env(env_id: str, env_kwargs: dict | None = None, render_mode: str | None = None) -> Callable[[], gym.Env]:
    """Thunk building one environment: gym.make(env_id, **env_kwargs), MiniGrid's image-only view, ReplayableEnv."""
    env_kwargs = dict(env_kwargs or {})

    def thunk() -> gym.Env:
        _import_env_package(env_id)
        kwargs = dict(env_kwargs)
        if render_mode is not None:
            kwargs["render_mode"] = render_mode
        env = gym.make(env_id, **kwargs)
        if isinstance(env.observation_space, gym.spaces.Dict) and "image" in env.observation_space.spaces:
            from minigrid.wrappers import ImgObsWrapper  # MiniGrid: the 7x7x3 egocentric image only (as the paper)

            env = ImgObsWrapper(env)
        if env_id.split("-")[0] in _HIGHWAY_FAMILIES:
            env = NumpyKinematics(env)
        return ReplayableEnv(env)

    return thunk


def check_spaces(obs_space: gym.Space, act_space: gym.Space, env_id: str) -> None:
    """The spaces fastattr's PPO supports; anything else gets a ValueError naming the space and the way out."""
    for name, space in (("observation", obs_space), ("action", act_space)):
        if isinstance(space, gym.spaces.Discrete) and int(space.start) != 0:
            raise ValueError(f"{env_id}: {name} space {space} starts at {space.start}; fastattr's PPO takes Discrete "
                             "spaces that start at 0 (wrap the env to shift them)")
    if isinstance(obs_space, gym.spaces.Discrete):
        pass
    elif isinstance(obs_space, gym.spaces.Box):
        if not np.issubdtype(obs_space.dtype, np.number):
            raise ValueError(f"{env_id}: unsupported observation dtype {obs_space.dtype}")
    else:
        raise ValueError(
            f"{env_id}: unsupported observation space {obs_space}; fastattr's PPO takes Box or Discrete observations "
            "(wrap the env, e.g. gymnasium.wrappers.FlattenObservation, and register it under its own id)"
        )
    if isinstance(act_space, gym.spaces.Discrete):
        return
    if isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1:
        if not (np.all(np.isfinite(act_space.low)) and np.all(np.isfinite(act_space.high))):
            raise ValueError(f"{env_id}: continuous actions need finite bounds, got {act_space}; wrap the env "
                             "(e.g. gymnasium.wrappers.RescaleAction or ClipAction) and register it under its own id")
        return
    raise ValueError(
        f"{env_id}: unsupported action space {act_space}; fastattr's PPO takes Discrete or 1-D Box actions"
    )


def make_vector_env(env_id: str, num_envs: int, env_kwargs: dict | None = None) -> gym.vector.SyncVectorEnv:
    """SyncVectorEnv of `num_envs` copies. SAME_STEP autoreset: the obs returned with done=True is already the next
    episode's first obs and the last obs is in info["final_obs"] (gymnasium 1.x defaults to NEXT_STEP, which would
    insert a dummy reset step into the rollout buffer)."""
    if num_envs < 1:
        raise ValueError(f"--num-envs must be >= 1, got {num_envs}")
    try:
        envs = gym.vector.SyncVectorEnv(
            [make_env(env_id, env_kwargs) for _ in range(num_envs)],
            autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
            copy=False,  # the rollout copies each observation into its buffer anyway
        )
    except (TypeError, gym.error.Error) as e:
        raise ValueError(f"could not create {env_id} with env_kwargs={env_kwargs or {}}: {e}") from e
    check_spaces(envs.single_observation_space, envs.single_action_space, env_id)
    return envs
