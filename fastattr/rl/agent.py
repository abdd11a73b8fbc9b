"""The actor-critic of `fastattr train` (SB3's MlpPolicy and the paper's MiniGrid CNN) and its optimiser."""
from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import targets
from .config import Args

LOG_2PI = math.log(2 * math.pi)


def layer_init(layer: nn.Module, gain: float, bias: float = 0.0) -> nn.Module:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.constant_(layer.bias, bias)
    return layer


class Agent(nn.Module):
    """Separate actor and critic (SB3 MlpPolicy: 2x64 tanh each) behind an optional shared CNN feature extractor
    (the paper's MiniGrid net: conv3x3 3->16, ReLU, conv3x3 16->32, ReLU, linear 288->64, ReLU; 32,359 actor
    parameters). Continuous actions: a diagonal Gaussian with a state-independent log-std (init 0, SB3).

    Parameter names: `features.*` (shared, counts as actor for attribution), `actor.*`, `actor_logstd`, `critic.*`.
    Observations are raw env observations; `preprocess` applies SB3's one-hot / flatten / image scaling.
    """

    def __init__(self, obs_space: gym.Space, act_space: gym.Space, network: str = "auto", hidden: int = 64,
                 features_dim: int = 64):
        super().__init__()
        is_image = (isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) == 3
                    and obs_space.dtype == np.uint8)
        if network == "auto":
            network = "cnn" if is_image else "mlp"
        if network == "cnn" and not is_image:
            raise ValueError(f"--network cnn needs uint8 HxWxC image observations, got {obs_space}")
        if network == "cnn" and obs_space.shape[0] < min(obs_space.shape[1:]):  # SB3's channel-first test
            raise ValueError(f"image observations {obs_space.shape} look channel-first (C, H, W); the CNN takes "
                             "(H, W, C): wrap the env with a transpose (gymnasium.wrappers.TransformObservation with "
                             "np.moveaxis(obs, 0, -1) and the matching space), or pass --network mlp")
        self.network = network
        if isinstance(obs_space, gym.spaces.Discrete):
            self.obs_kind, in_dim = "onehot", int(obs_space.n)
        elif network == "cnn":
            self.obs_kind = "image"
        else:
            self.obs_kind, in_dim = "flat", int(np.prod(obs_space.shape))
        self.n_obs = int(obs_space.n) if self.obs_kind == "onehot" else 0
        self.continuous = isinstance(act_space, gym.spaces.Box)
        n_out = int(np.prod(act_space.shape)) if self.continuous else int(act_space.n)

        if network == "cnn":
            h, w, c = obs_space.shape
            conv = nn.Sequential(layer_init(nn.Conv2d(c, 16, 3), math.sqrt(2)), nn.ReLU(),
                                 layer_init(nn.Conv2d(16, 32, 3), math.sqrt(2)), nn.ReLU(), nn.Flatten())
            with torch.no_grad():
                n_flat = conv(torch.zeros(1, c, h, w)).shape[1]
            self.features = nn.Sequential(*conv, layer_init(nn.Linear(n_flat, features_dim), math.sqrt(2)), nn.ReLU())
            in_dim = features_dim
        else:
            self.features = nn.Identity()
        self.actor = nn.Sequential(
            layer_init(nn.Linear(in_dim, hidden), math.sqrt(2)), nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden), math.sqrt(2)), nn.Tanh(),
            layer_init(nn.Linear(hidden, n_out), 0.01),
        )
        self.critic = nn.Sequential(
            layer_init(nn.Linear(in_dim, hidden), math.sqrt(2)), nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden), math.sqrt(2)), nn.Tanh(),
            layer_init(nn.Linear(hidden, 1), 1.0),
        )
        if self.continuous:
            self.actor_logstd = nn.Parameter(torch.zeros(n_out))
        # the same Parameter objects (updated in place by optimisers and load_state_dict), for _chain
        self._linears = {k: [(m.weight, m.bias) for m in getattr(self, k) if isinstance(m, nn.Linear)]
                         for k in ("actor", "critic")}

    @staticmethod
    def is_actor_param(name: str) -> bool:
        """Parameters the attribution scores: everything but the critic (the shared CNN extractor counts)."""
        return not name.startswith("critic.")

    def preprocess(self, obs: torch.Tensor) -> torch.Tensor:
        if self.obs_kind == "onehot":
            # == one_hot, written with a comparison so that torch.func.vmap can trace it
            return (obs.long().reshape(-1, 1) == torch.arange(self.n_obs, device=obs.device)).float()
        if self.obs_kind == "image":
            return obs.float().permute(0, 3, 1, 2) / 255.0
        return obs.float().reshape(obs.shape[0], -1)

    def _chain(self, z: torch.Tensor, which: str) -> torch.Tensor:
        """actor(z) / critic(z) with F.linear on the same Parameters, skipping nn.Module call overhead (a rollout
        step is ~10 tiny layer calls). Bit-identical to the modules (nn.Linear.forward is F.linear). The scoring
        path (`log_prob`) goes through the modules, whose forward hooks fastattr.score uses."""
        (w0, b0), (w1, b1), (w2, b2) = self._linears[which]
        return F.linear(torch.tanh(F.linear(torch.tanh(F.linear(z, w0, b0)), w1, b1)), w2, b2)

    def _log_prob_entropy(self, out: torch.Tensor, actions: torch.Tensor, entropy: bool = True):
        if self.continuous:
            logstd = self.actor_logstd.expand_as(out)
            logp = (-0.5 * ((actions - out) * torch.exp(-logstd)) ** 2 - logstd - 0.5 * LOG_2PI).sum(-1)
            return logp, ((0.5 + 0.5 * LOG_2PI + logstd).sum(-1) if entropy else None)
        logp_all = F.log_softmax(out, dim=-1)
        logp = logp_all.gather(1, actions.long().reshape(-1, 1)).squeeze(1)
        return logp, (-(logp_all.exp() * logp_all).sum(-1) if entropy else None)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi(a|s) [N] (summed over action dims for Gaussian actions); actor parameters only, via the modules."""
        return self._log_prob_entropy(self.actor(self.features(self.preprocess(obs))), actions)[0]

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """= log_prob (so torch.func.functional_call(agent, params, (obs, actions)) gives log pi(a|s))."""
        return self.log_prob(obs, actions)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self._chain(self.features(self.preprocess(obs)), "critic").squeeze(-1)

    def evaluate_actions(self, obs, actions, entropy: bool = True):
        """(log pi(a|s), entropy or None, V(s)), each [N], from one pass through the shared features (SB3's name)."""
        z = self.features(self.preprocess(obs))
        logp, entropy = self._log_prob_entropy(self._chain(z, "actor"), actions, entropy)
        return logp, entropy, self._chain(z, "critic").squeeze(-1)

    @torch.no_grad()
    def sample_actions(self, obs: np.ndarray, rng: np.random.Generator, policy: "NumpyPolicy | None" = None):
        """a ~ pi(.|s) for a batch of raw observations, drawn with the numpy Generator `rng` (one uniform per row for
        discrete actions: the inverse CDF of the softmax; a standard normal per dim for Gaussian actions).

        With `policy` (this agent's weights as numpy arrays, see `numpy_policy`) the MLP runs in numpy: a rollout step
        is a batch of one, where numpy's per-op cost is a fraction of torch's. Otherwise (the CNN) torch computes the
        logits. The buffer's log-probabilities and values are computed afterwards in one torch pass."""
        if policy is not None:
            out = policy.actor_out(obs)
        else:
            out = self._chain(self.features(self.preprocess(torch.as_tensor(obs, dtype=torch.float32))), "actor")
            out = out.numpy().astype(np.float64)
        if self.continuous:
            std = np.exp(self.actor_logstd.detach().numpy().astype(np.float64))
            return (out + std * rng.standard_normal(out.shape)).astype(np.float32)
        e = np.exp(out - out.max(-1, keepdims=True))
        cdf = np.cumsum(e, -1)
        u = rng.random((out.shape[0], 1)) * cdf[:, -1:]
        return np.minimum((cdf < u).sum(-1), out.shape[-1] - 1).astype(np.int64)

    def return_scores(self, obs: torch.Tensor, actions: torch.Tensor, adv_record: torch.Tensor,
                      adv_target: torch.Tensor, extra_targets=None) -> torch.Tensor:
        """Each record's influence on the return target at the current parameters, actor parameters only: [N]
        (or [N, 1 + M] with `extra_targets(agent) -> Tensor[M]`, further target losses). See fastattr.targets."""
        return targets.return_scores(self, lambda m: m.log_prob(obs, actions), adv_record, adv_target,
                                     params=Agent.is_actor_param, extra_targets=extra_targets)

    def numpy_policy(self) -> "NumpyPolicy | None":
        """A frozen numpy copy of the MLP actor for sampling (None for the CNN). Rebuild it after each update."""
        return NumpyPolicy(self) if self.network == "mlp" else None


class NumpyPolicy:
    """The actor MLP of an Agent as float64 numpy arrays, for fast batched-of-one sampling during rollouts."""

    def __init__(self, agent: Agent):
        self.kind, self.n_obs = agent.obs_kind, agent.n_obs
        self.layers = [(w.detach().numpy().astype(np.float64).T.copy(), b.detach().numpy().astype(np.float64))
                       for w, b in agent._linears["actor"]]

    def actor_out(self, obs: np.ndarray) -> np.ndarray:
        if self.kind == "onehot":
            x = np.eye(self.n_obs)[np.asarray(obs).astype(np.int64).reshape(-1)]
        else:
            x = np.asarray(obs, dtype=np.float64).reshape(len(obs), -1)
        (w0, b0), (w1, b1), (w2, b2) = self.layers
        return np.tanh(np.tanh(x @ w0 + b0) @ w1 + b1) @ w2 + b2


def make_optimizer(agent: Agent, args: Args) -> torch.optim.Optimizer:
    if args.optimizer == "sgd":
        return torch.optim.SGD(agent.parameters(), lr=args.learning_rate)  # SB3 passes no momentum
    return torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=args.adam_eps)

