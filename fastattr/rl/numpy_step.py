"""The torch step's loss and plain-SGD update for the 2x64 tanh MLP agent, with the backward pass written out in numpy
(a minibatch of 64 is ~20 tiny ops whose per-call overhead dominates in torch)."""
from __future__ import annotations

import math

import numpy as np
import torch

from .agent import LOG_2PI, Agent
from .config import Args
from .rollout import Buffer


class NumpySGDStep:
    """TorchStep's loss and plain-SGD step for the 2x64 tanh MLP agent, with the backward pass written out in numpy.

    At minibatch 64 a step is ~20 tiny ops whose per-call overhead dominates, which numpy pays far less of than
    torch autograd (benchmarks/bench_ppo.py's torch-step row measures the difference). The arrays are views of the torch Parameters, so the updates land in
    the agent directly (SGD keeps no optimiser state). Agrees with TorchStep to float32 rounding (tests/test_ppo.py).
    """

    @staticmethod
    def supports(agent: Agent, optimizer) -> bool:
        if agent.network != "mlp" or type(optimizer) is not torch.optim.SGD:
            return False
        g = optimizer.param_groups
        return len(g) == 1 and not g[0]["momentum"] and not g[0]["weight_decay"] and not g[0]["nesterov"] \
            and not g[0].get("maximize", False)

    def __init__(self, agent: Agent, optimizer, buf: Buffer, args: Args):
        self.agent, self.args = agent, args
        self.lr = np.float32(optimizer.param_groups[0]["lr"])
        # [W (out, in), b] per layer, sharing memory with the Parameters
        self.layers = {k: [(w.detach().numpy(), b.detach().numpy()) for w, b in agent._linears[k]]
                       for k in ("actor", "critic")}
        self.logstd = agent.actor_logstd.detach().numpy() if agent.continuous else None
        with torch.no_grad():
            self.x = agent.preprocess(buf.obs).numpy()
        self.actions = buf.actions.numpy()
        self.logp_old, self.adv = buf.logp.numpy(), buf.advantages.numpy()
        self.returns = buf.returns.numpy()

    @staticmethod
    def _forward(layers, x):
        (w0, b0), (w1, b1), (w2, b2) = layers
        h1 = np.tanh(x @ w0.T + b0)
        h2 = np.tanh(h1 @ w1.T + b1)
        return h1, h2, h2 @ w2.T + b2

    @staticmethod
    def _backward(layers, x, h1, h2, g):
        """Gradients [(gW, gb)] of sum(g * out) for out = MLP(x)."""
        (_, _), (w1, _), (w2, _) = layers
        g2 = (g @ w2) * (1 - h2 * h2)
        g1 = (g2 @ w1) * (1 - h1 * h1)
        return [(g1.T @ x, g1.sum(0)), (g2.T @ h1, g2.sum(0)), (g.T @ h2, g.sum(0))]

    def __call__(self, mb: torch.Tensor, kl_limit: float | None = None) -> np.ndarray | None:
        """The step on minibatch mb: [pg_loss, v_loss, approx_kl, clipfrac]; None (and no step) when the approx. KL
        exceeds kl_limit."""
        a = self.args
        idx = mb.numpy()
        n = len(idx)
        x, act = self.x[idx], self.actions[idx]
        h1, h2, out = self._forward(self.layers["actor"], x)
        c1, c2, v = self._forward(self.layers["critic"], x)
        v = v[:, 0]
        # log pi(a|s) and its gradient w.r.t. the actor's output (and the log-std)
        if self.logstd is None:
            z = out - out.max(1, keepdims=True)
            logp_all = z - np.log(np.exp(z).sum(1, keepdims=True))
            p = np.exp(logp_all)
            rows = np.arange(n)
            logp = logp_all[rows, act]
        else:
            inv_std = np.exp(-self.logstd)
            u = (act - out) * inv_std
            logp = (-0.5 * u * u - self.logstd - np.float32(0.5 * LOG_2PI)).sum(1)
        logratio = logp - self.logp_old[idx]
        ratio = np.exp(logratio)
        approx_kl = ((ratio - 1) - logratio).mean()
        if kl_limit is not None and approx_kl > kl_limit:
            return None
        adv = self.adv[idx]
        if a.norm_adv and n > 1:
            adv = (adv - adv.mean()) / (adv.std(ddof=1) + np.float32(1e-8))
        lo, hi = 1 - a.clip_coef, 1 + a.clip_coef
        surr1, surr2 = adv * ratio, adv * np.clip(ratio, lo, hi)
        pg_loss = -np.minimum(surr1, surr2).mean()
        v_loss = ((v - self.returns[idx]) ** 2).mean()
        # d loss / d logp_i: torch.min routes the gradient to surr1 where surr1 <= surr2 (ties included); the clipped
        # branch passes gradient only strictly inside (lo, hi)
        d_ratio = np.where(surr1 <= surr2, adv, adv * ((ratio > lo) & (ratio < hi)))
        d_logp = (-(d_ratio * ratio) / n).astype(np.float32)
        grads = {}
        if self.logstd is None:
            g_out = -p * d_logp[:, None]
            g_out[rows, act] += d_logp
            if a.ent_coef:
                ent = -(p * logp_all).sum(1)
                g_out += (a.ent_coef / n) * p * (logp_all + ent[:, None])  # d(-c * mean H)/d logits
        else:
            g_out = d_logp[:, None] * u * inv_std
            g_logstd = (d_logp[:, None] * (u * u - 1)).sum(0) - (a.ent_coef if a.ent_coef else 0.0)
            grads["logstd"] = g_logstd.astype(np.float32)
        grads["actor"] = self._backward(self.layers["actor"], x, h1, h2, g_out.astype(np.float32))
        g_v = (a.vf_coef * 2.0 / n) * (v - self.returns[idx])
        grads["critic"] = self._backward(self.layers["critic"], x, c1, c2, g_v[:, None].astype(np.float32))
        scale = np.float32(1.0)
        if a.clip_grad:
            sq = sum(float((gw * gw).sum() + (gb * gb).sum()) for k in ("actor", "critic") for gw, gb in grads[k])
            sq += float((grads["logstd"] ** 2).sum()) if "logstd" in grads else 0.0
            scale = np.float32(min(1.0, a.max_grad_norm / (math.sqrt(sq) + 1e-6)))
        step = self.lr * scale
        for k in ("actor", "critic"):
            for (w, b), (gw, gb) in zip(self.layers[k], grads[k]):
                w -= step * gw
                b -= step * gb
        if "logstd" in grads:
            self.logstd -= step * grads["logstd"]
        clipfrac = (np.abs(ratio - 1.0) > a.clip_coef).mean()
        return np.array([pg_loss, v_loss, approx_kl, clipfrac], dtype=np.float64)

