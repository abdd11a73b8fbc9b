"""The ghost identities: per-record gradient inner products of one layer from its captured inputs and output gradients,
without forming a per-record gradient.

A layer call maps input rows x_i (T positions each) to output rows y_i; g_i = d(sum of losses)/d y_i. When record i's
loss reaches the layer's parameters only through its own row of the call (fastattr.scoring checks this), the layer's
per-record gradient is

    Linear     grad_W l_i = sum_t g_it x_it^T,         grad_b l_i = sum_t g_it
    Conv       the same over unfolded patches (positions = output pixels)
    Embedding  grad_W l_i = sum_t onehot(idx_it) g_it^T

so that, against one aggregated target gradient G:   <grad_W l_i, G> = sum_t g_it^T G x_it          (ops.grad_dot)
and against M targets with their own rows x_m, g_m:   <grad_W l_i, grad_W t_m> = sum_{t,s} (x_it . x_ms)(g_it . g_ms)
                                                                                             (ops.grad_sim_reduce)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops, reference
from .threads import for_kernels

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def kind_of(module: nn.Module) -> str | None:
    """'linear' | 'conv' | 'embedding' for the module types the ghost identities cover (exact types: a subclass may
    change forward), else None. transformers' Conv1D (GPT-2's layers) is a Linear with its weight stored transposed."""
    if type(module) is nn.Linear or is_transposed_linear(module):
        return "linear"
    if type(module) in CONV:
        return "conv"
    if type(module) is nn.Embedding:
        return "embedding"
    return None


_CONV1D_CLASSES: dict[type, bool] = {}


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether `module` is transformers' Conv1D (y = x @ W + b with W stored [d_in, d_out]; GPT-2 and other
    GPT-style models), checked by exact class and, once per class, by what a fresh instance computes on a random input
    (so a transformers version that changed its meaning would leave it to the affine path's own check)."""
    cls = type(module)
    if cls.__name__ != "Conv1D" or cls.__module__ != "transformers.pytorch_utils" or "forward" in vars(module):
        return False
    if cls not in _CONV1D_CLASSES:
        _CONV1D_CLASSES[cls] = _computes_x_w_plus_b(cls)
    return _CONV1D_CLASSES[cls]


def _computes_x_w_plus_b(cls: type) -> bool:
    """A small instance of `cls` (no hooks; the model's own modules untouched) on float64 parameters and input."""
    d_in, d_out = 5, 4
    gen = torch.Generator().manual_seed(0xC1D)
    x = torch.randn(2, 3, d_in, generator=gen, dtype=torch.float64)
    w = torch.randn(d_in, d_out, generator=gen, dtype=torch.float64)
    b = torch.randn(d_out, generator=gen, dtype=torch.float64)
    try:
        probe = cls(d_out, d_in)
        if dict(probe.named_parameters()).keys() != {"weight", "bias"} or probe.weight.shape != w.shape:
            return False
        with torch.no_grad():
            y = torch.func.functional_call(probe, {"weight": w, "bias": b}, (x,))
    except Exception:  # noqa: BLE001  (a constructor or forward we do not know makes it not the layer we know)
        return False
    return y.shape == (2, 3, d_out) and torch.allclose(y, x @ w + b, rtol=1e-12, atol=1e-12)


@dataclass
class Call:
    """One forward call of a scored layer: its input (detached; the indices for an Embedding), its output (in the
    autograd graph), and the autograd node the input came from (where the module's own part of the graph ends)."""

    x: Tensor
    y: Tensor
    stop: object = None
    expanded: bool = False
    """the call ran on a batch of one and its output was expanded to every record (a broadcast input)"""

    @property
    def batched(self) -> bool:
        """Whether the call has a batch dimension at all (an unbatched Linear/conv call has none)."""
        return self.x.dim() >= 1 and self.y.dim() >= 2


@dataclass
class Layer:
    """A module scored by a ghost identity, with the subset of its parameters that is selected."""

    name: str
    module: nn.Module
    use_weight: bool
    use_bias: bool
    calls: list[Call] = field(default_factory=list)  # calls made while computing the record losses
    target_calls: list[Call] = field(default_factory=list)  # calls made by a separate target forward

    @property
    def kind(self) -> str:
        return kind_of(self.module)

    @property
    def transposed(self) -> bool:
        """A linear layer whose weight is stored [d_in, d_out] (transformers' Conv1D)."""
        return is_transposed_linear(self.module)

    def params(self) -> list[nn.Parameter]:
        return ([self.module.weight] if self.use_weight else []) + ([self.module.bias] if self.use_bias else [])

    def param_names(self) -> list[str]:
        return ([f"{self.name}.weight"] if self.use_weight else []) + ([f"{self.name}.bias"] if self.use_bias else [])


def positions(x: Tensor, g: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Linear call -> x: [N, T, d_in], g: [N, T, d_out] with every leading dim past the first folded into T."""
    t = math.prod(x.shape[1:-1])  # explicit, so that N = 0 records still has a shape
    return x.reshape(n, t, x.shape[-1]), g.reshape(n, t, g.shape[-1])


def _flat_rows(idx: Tensor, n: int) -> Tensor:
    """Embedding indices [N, ...] -> [N, T]."""
    return idx.reshape(n, math.prod(idx.shape[1:]))


def conv_patches(module: nn.Module, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Conv1d/2d call -> unfolded patches x: [N, L, C_in*k] and g: [N, L, C_out]."""
    conv2d = isinstance(module, nn.Conv2d)
    k = module.kernel_size if conv2d else (1, module.kernel_size[0])
    st = module.stride if conv2d else (1, module.stride[0])
    dil = module.dilation if conv2d else (1, module.dilation[0])
    if not conv2d:
        x = x.unsqueeze(-2)
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        if isinstance(module.padding, str):
            pads = []
            for kk, dd in zip(reversed(k), reversed(dil)):
                total = 0 if module.padding == "valid" else dd * (kk - 1)
                pads += [total // 2, total - total // 2]
        else:
            pads = list(module._reversed_padding_repeated_twice) + ([0, 0] if not conv2d else [])
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pads, mode=mode) if mode == "constant" else F.pad(x, pads[: 2 * (x.dim() - 2)], mode=mode)
        pad = (0, 0)
    else:
        pad = module.padding if conv2d else (0, module.padding[0])
    cols = F.unfold(x, k, dilation=dil, padding=pad, stride=st)  # [N, C_in*k, L]
    return cols.transpose(1, 2), g.flatten(2).transpose(1, 2)


def has_gram_form(module: nn.Module) -> bool:
    """Whether the pairwise (Gram) identity covers the layer: Conv3d and grouped convs have no unfolded form here."""
    return not isinstance(module, CONV) or (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1)


def aggregated(layer: Layer, grads: list, G: dict, n: int, dtype, chunk: int, backend: str = "auto") -> Tensor:
    """[N]: sum over the layer's record calls of <grad l_i, G> for its selected parameters. G: {'weight', 'bias'}.
    backend: ops.grad_dot's."""
    m = layer.module
    gw = G.get("weight") if layer.use_weight else None
    gb = G.get("bias") if layer.use_bias else None
    total = torch.zeros(n, dtype=reference.score_dtype(dtype), device=m.weight.device)
    for call, g in zip(layer.calls, grads):
        if g is None or (gw is None and gb is None):
            continue
        x = call.x
        if layer.kind == "linear":
            x3, g3 = positions(x, g, n)
            x3, g3 = x3.to(dtype), g3.to(dtype)
            b = gb.to(dtype) if gb is not None else None
            if gw is None:  # only the bias is selected
                total += (g3.sum(1) @ b).to(total.dtype)
                continue
            w = (gw.t() if layer.transposed else gw).to(dtype)
            for s in range(0, n, chunk):
                with for_kernels():
                    total[s:s + chunk] += ops.grad_dot(x3[s:s + chunk], g3[s:s + chunk], w, b, backend=backend)
        elif layer.kind == "conv":
            for s in range(0, n, chunk):
                xc, gc = x[s:s + chunk].to(dtype), g[s:s + chunk].to(dtype)
                if gw is not None:
                    y = m._conv_forward(xc, gw.to(dtype), None)  # one extra conv with the target as weight
                    total[s:s + chunk] += (y * gc).flatten(1).sum(1).to(total.dtype)
                if gb is not None:
                    total[s:s + chunk] += (gc.flatten(2).sum(2) @ gb.to(dtype)).to(total.dtype)
        else:  # Embedding: <grad_W l_i, G> = sum_t g_it . G[idx_it]
            idx = _flat_rows(x, n)
            g3 = g.reshape(n, idx.shape[1], g.shape[-1]).to(dtype)
            rows = (gw.to_dense() if gw.is_sparse else gw).to(dtype)[idx]  # sparse=True Embedding
            if m.padding_idx is not None:
                rows = rows * (idx != m.padding_idx).unsqueeze(-1)
            total += (rows * g3).sum((1, 2)).to(total.dtype)
    return total


def sides(layer: Layer, calls: list[Call], grads: list, rows: int) -> tuple[Tensor, Tensor] | None:
    """All calls of one layer as positions: x [rows, T, d_in(+1)], g [rows, T, d_out]; None if nothing depends on it.
    A constant-1 column folds the bias into x; with only the bias selected x is that column alone."""
    xs, gss = [], []
    for call, g in zip(calls, grads):
        if g is None:
            continue
        if layer.kind == "linear":
            x3, g3 = positions(call.x, g, rows)
        else:
            x3, g3 = conv_patches(layer.module, call.x, g)
        if not layer.use_weight:
            x3 = x3.new_ones(x3.shape[:-1] + (1,))
        elif layer.use_bias:
            x3 = torch.cat([x3, x3.new_ones(x3.shape[:-1] + (1,))], dim=-1)
        xs.append(x3)
        gss.append(g3)
    if not xs:
        return None
    return torch.cat(xs, 1), torch.cat(gss, 1)


def materialise(x: Tensor, g: Tensor, chunk: int) -> Tensor:
    """Per-sample gradients of one layer, [rows, d_out * d_in]: sum_t g_t x_t^T (chunked over rows)."""
    parts = [torch.einsum("nto,nti->noi", g[s:s + chunk], x[s:s + chunk]).flatten(1) for s in range(0, len(x), chunk)]
    return torch.cat(parts) if parts else x.new_zeros(0, g.shape[-1] * x.shape[-1])


def embedding_pairwise(layer: Layer, rg: list, tg: list, n: int, m_targets: int, dtype, chunk: int) -> Tensor:
    """[N, M]: sum_{t,s} [idx_nt == idx_ms] (g_nt . g_ms), with padding_idx rows excluded."""
    mod = layer.module

    def side(calls, gs, rows):
        idx, g = [], []
        for call, gg in zip(calls, gs):
            if gg is None:
                continue
            i = _flat_rows(call.x, rows)
            idx.append(i), g.append(gg.reshape(rows, i.shape[1], gg.shape[-1]).to(dtype))
        if not idx:
            return None
        i, gg = torch.cat(idx, 1), torch.cat(g, 1)
        if mod.padding_idx is not None:
            gg = gg * (i != mod.padding_idx).unsqueeze(-1)
        return i, gg

    out = torch.zeros(n, m_targets, dtype=reference.score_dtype(dtype), device=mod.weight.device)
    a, b = side(layer.calls, rg, n), side(layer.target_calls, tg, m_targets)
    if a is None or b is None or not layer.use_weight:
        return out
    (ia, ga), (ib, gb) = a, b
    step = max(1, chunk // max(1, ia.shape[1]))
    for s in range(0, n, step):
        e = slice(s, s + step)
        eq = (ia[e, :, None, None] == ib[None, None]).to(dtype)  # [n, T, M, S]
        dots = torch.einsum("nto,mso->ntms", ga[e], gb)
        out[e] = (eq * dots).sum((1, 3)).to(out.dtype)
    return out
