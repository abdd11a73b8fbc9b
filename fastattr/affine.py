"""The fast path for layers affine in their own parameters: norms (LayerNorm, RMSNorm, GroupNorm, a BatchNorm in eval
mode, any model's own RMSNorm class), scales, PReLU.

A module whose output is affine in its weight w and its bias b,

    y = A(w) + B(b) + c(x)       (A, B linear; x its input),

has per-record gradient <grad_w l_i, G> = sum over record i's part of y of g * A(G), with g = d(sum of losses)/dy, and
likewise for the bias. A(G) = M(w=G, b=0) - M(w=0, b=0) is one call of the module itself with the target gradient as
weight (the trick the convolutions use), so no per-record gradient and no forward-mode pass is formed, whatever the
module's arithmetic (casts to float32 included). Candidates are modules with a `weight` (and at most a `bias`) of their
own and no parameters in submodules, called on one tensor; that they are affine is checked on each call with random
parameters (see why_not_affine), which also catches a module whose output changes from call to call; a module that
fails goes to the general path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import reference
from .ghost import Layer


@dataclass
class AffineLayer(Layer):
    """A Layer scored through the module's affinity in its parameters; `inputs` holds each record-side call's
    (args, kwargs), detached, so the module can be called again, and `bases` its output with zero parameters."""

    inputs: list = field(default_factory=list)
    bases: list = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "affine"


def is_candidate(module: nn.Module) -> bool:
    """A `weight` (and optionally a `bias`) Parameter of its own, nothing else with parameters inside."""
    own = dict(module.named_parameters(recurse=False))
    if "weight" not in own or not set(own) <= {"weight", "bias"}:
        return False
    return all(not any(True for _ in child.parameters()) for child in module.children())


def _call(module: nn.Module, inputs, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """The module's output with its weight and bias replaced (no autograd)."""
    args, kwargs = inputs
    params = {"weight": weight}
    if isinstance(getattr(module, "bias", None), nn.Parameter):
        params["bias"] = bias if bias is not None else torch.zeros_like(module.bias)
    with torch.no_grad():
        return torch.func.functional_call(module, params, args, kwargs)


def _affine_along(moved: Tensor, y: Tensor, step: Tensor, base: Tensor) -> bool:
    """moved == y + step - base up to the rounding of the dtype, relative to the largest of the four terms (the step
    along a random direction can be far larger than y: the rounding of its matmul scales with it)."""
    if moved.shape != y.shape or step.shape != y.shape:
        return False
    if not moved.numel():
        return True
    scale = max(float(t.abs().amax()) for t in (moved, y, step, base))
    tol = (1e-10 if moved.dtype == torch.float64 else 1e-5) * max(scale, 1e-30)
    return float((moved - (y + step - base)).abs().amax()) <= tol


def why_not_affine(layer: AffineLayer, call, inputs) -> str | None:
    """None when the call is affine in the module's parameters as the fast path assumes, else the reason. Along a
    random direction r of the weight (and s of the bias): M(w + r, b) = y + M(r, 0) - M(0, 0), and
    M(w, b + s) = y + M(0, s) - M(0, 0), with y the output the forward produced (so a module whose result changes from
    call to call fails too). Keeps M(0, 0) for `aggregated`."""
    args, kwargs = inputs
    tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, Tensor)]
    if len(tensors) != 1:
        return "is called with several tensor inputs (its fast path takes one)"
    m = layer.module
    w = m.weight.detach()
    b = m.bias.detach() if isinstance(getattr(m, "bias", None), nn.Parameter) else None
    gen = torch.Generator().manual_seed(0xAFF)
    r = torch.rand(w.shape, generator=gen, dtype=torch.float64).add_(0.5).to(w)
    y = call.y.detach()
    base = _call(m, inputs, torch.zeros_like(w), None)
    if not _affine_along(_call(m, inputs, w + r, b), y, _call(m, inputs, r, None), base):
        return "is not affine in its weight (or gives another output when called again)"
    if b is not None:
        s = torch.rand(b.shape, generator=gen, dtype=torch.float64).add_(0.5).to(b)
        if not _affine_along(_call(m, inputs, w, b + s), y, _call(m, inputs, torch.zeros_like(w), s), base):
            return "is not affine in its weight and bias together"
    layer.bases.append(base)
    return None


def aggregated(layer: AffineLayer, grads: list, G: dict, n: int, dtype) -> Tensor:
    """[N]: sum over the layer's record calls of <grad l_i, G> for its selected parameters. G: {'weight', 'bias'}:
    the module called with the target gradient as parameters, minus M(0, 0), is d y/d theta applied to G."""
    m = layer.module
    total = torch.zeros(n, dtype=reference.score_dtype(dtype), device=m.weight.device)
    gw = G.get("weight") if layer.use_weight else None
    gb = G.get("bias") if layer.use_bias else None
    if gw is None and gb is None:
        return total
    weight = gw.to(m.weight.dtype) if gw is not None else torch.zeros_like(m.weight)
    bias = gb.to(m.bias.dtype) if gb is not None else None
    for call, inputs, base, g in zip(layer.calls, layer.inputs, layer.bases, grads):
        if g is None:
            continue
        direction = _call(m, inputs, weight, bias) - base
        total += (g.to(dtype) * direction.to(dtype)).reshape(n, -1).sum(1).to(total.dtype)
    return total
