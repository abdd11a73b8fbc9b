"""Exact per-record attribution scores for any PyTorch model, without materialising per-sample gradients.

    score[i]    = <grad_theta record_loss_i, grad_theta target>          (one aggregated target)
    score[i, m] = <grad_theta record_loss_i, grad_theta target_m>        (M targets)

How each selected parameter is scored (DESIGN.md section 1):
- nn.Linear: captured input x and output gradient g per call; aggregated target -> `ops.grad_dot` (identity I1),
  M targets -> `ops.grad_sim_reduce` on Gram tiles (identity I2), or a per-sample materialisation of that one layer
  when the T^2 rule says it is cheaper (then the layer enters the same op as x = vec(grad), g = 1).
- nn.Conv1d/2d/3d: aggregated -> one extra convolution with the target gradient as weight; M targets -> unfolded
  patches as positions T (Conv1d/2d, groups = 1), else the general path.
- nn.Embedding: gathers of the target gradient at the looked-up rows; M targets -> index-equality Gram.
- Every other parameter (LayerNorm, custom modules, a weight tied across two modules, ...): forward-mode JVP of the
  record losses along the target gradient (identity I3; batched over M for M targets).
- M targets whose target m does not depend on row m alone (checked, `_one_row_per_target`): full per-target
  gradients, then the per-layer contractions of the aggregated case.
Output gradients come from one `torch.autograd.grad` to the captured layer outputs, so no parameter .grad is formed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import ops, reference

REDUCE_OVER_M = ("none", "sum", "mean", "max", "min")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ScoringError(ValueError):
    """Bad input to fastattr.score; the message names the argument or module and says what to do."""


# ----------------------------------------------------------------------------------------------------------------------
# Which parameters are scored, and how
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    """A module scored by a ghost identity, with the subset of its parameters that is selected."""

    name: str
    module: nn.Module
    weight: bool
    bias: bool
    calls: list = field(default_factory=list)  # (x, y) per forward call, x detached, y in the graph


@dataclass
class _Plan:
    params: dict[str, nn.Parameter]  # every selected parameter, by its (first) qualified name
    layers: list[_Layer]
    generic: dict[str, nn.Parameter]  # selected parameters scored by the JVP path

    def name_of(self, p: nn.Parameter) -> str:
        """The name a selected parameter has in `params` (a module may know it under another, shared, name)."""
        return next(k for k, q in self.params.items() if q is p)


def _ghost_kind(module: nn.Module) -> str | None:
    if type(module) is nn.Linear:
        return "linear"
    if type(module) in _CONV:
        return "conv"
    if type(module) is nn.Embedding:
        return "embedding"
    return None


def _select(model: nn.Module, params) -> dict[str, nn.Parameter]:
    named = dict(model.named_parameters())  # de-duplicated: a shared parameter appears once
    if params is None:
        chosen = {n: p for n, p in named.items() if p.requires_grad}
    elif callable(params) and not isinstance(params, (nn.Module, nn.Parameter)):
        chosen = {n: p for n, p in named.items() if params(n)}
    else:
        items = [params] if isinstance(params, (str, nn.Module, nn.Parameter)) else list(params)
        chosen = {}
        by_id = {id(p): n for n, p in named.items()}
        for item in items:
            if isinstance(item, nn.Parameter):
                if id(item) not in by_id:
                    raise ScoringError("params: a Parameter passed in `params` does not belong to `model`")
                chosen[by_id[id(item)]] = item
            elif isinstance(item, nn.Module):
                found = {by_id[id(p)]: p for p in item.parameters() if id(p) in by_id}
                if not found:
                    raise ScoringError("params: a Module passed in `params` has no parameters of `model`")
                chosen.update(found)
            elif isinstance(item, str):
                found = {n: p for n, p in named.items() if n == item or n.startswith(item + ".")}
                if not found:
                    raise ScoringError(
                        f"params: {item!r} matches no parameter or module of the model; parameter names look like "
                        f"{list(named)[:4]}"
                    )
                chosen.update(found)
            else:
                raise ScoringError(f"params: expected names, Parameters or Modules, got {type(item).__name__}")
    if not chosen:
        raise ScoringError("params: no parameter is selected (none requires grad, or the selection matched nothing)")
    return chosen


def _plan(model: nn.Module, params) -> _Plan:
    chosen = _select(model, params)
    chosen_ids = {id(p) for p in chosen.values()}
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    if len(devices) > 1:
        raise ScoringError(
            f"model: parameters and buffers live on several devices {sorted(map(str, devices))}; move the model to "
            "one device (model.to(device)) before scoring"
        )
    # A Parameter held by two modules (tied weights, e.g. an output head sharing an embedding's table) is used in
    # both, and neither module's hook sees the other's use: such parameters go to the general (JVP) path.
    owners: dict[int, int] = {}
    for m in model.modules():
        if _ghost_kind(m) is not None:
            for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                if isinstance(p, nn.Parameter):
                    owners[id(p)] = owners.get(id(p), 0) + 1
    layers, claimed = [], set()
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ScoringError(
                f"model: module '{name}' ({type(m).__name__}) is in training mode, which mixes records through batch "
                "statistics, so per-record gradients are not defined; call model.eval() (or the module's .eval()) "
                "before scoring"
            )
        kind = _ghost_kind(m)
        if kind is None:
            continue
        w = getattr(m, "weight", None)
        b = getattr(m, "bias", None)
        use_w = w is not None and id(w) in chosen_ids and owners[id(w)] == 1
        use_b = isinstance(b, nn.Parameter) and id(b) in chosen_ids and owners[id(b)] == 1
        if not (use_w or use_b):
            continue
        if kind == "embedding" and (m.scale_grad_by_freq or m.max_norm is not None):
            raise ScoringError(
                f"model: Embedding '{name}' uses {'scale_grad_by_freq' if m.scale_grad_by_freq else 'max_norm'}, "
                "which makes a record's gradient depend on the other records in the batch (or renormalises the "
                "table during the forward), so per-record scores are not defined; disable it or exclude the "
                "module with `params`"
            )
        layers.append(_Layer(name, m, use_w, use_b))
        claimed |= {id(w)} if use_w else set()
        claimed |= {id(b)} if use_b else set()
    generic = {n: p for n, p in chosen.items() if id(p) not in claimed}
    return _Plan(chosen, layers, generic)


def _layer_params(layer: _Layer) -> list[nn.Parameter]:
    return ([layer.module.weight] if layer.weight else []) + ([layer.module.bias] if layer.bias else [])


# ----------------------------------------------------------------------------------------------------------------------
# Capture: each scored layer's input and output, per forward call
# ----------------------------------------------------------------------------------------------------------------------
class _Capture:
    """Records (input, output) of every call of the scored layers. The input is detached (it shares the tensor's
    version counter) and the output stays in the graph. `modified()` tells whether the forward changed either in
    place afterwards (e.g. ReLU(inplace=True) on a Linear's output, which would move the output's place in the
    graph); with clone=True the hook keeps its own copy of the input and hands the model a copy of the output, so
    in-place ops downstream change only those copies."""

    def __init__(self, layers: list[_Layer], clone: bool = False):
        self.layers, self.clone, self.handles, self.versions = layers, clone, [], []

    def __enter__(self):
        for layer in self.layers:
            layer.calls = []

            def hook(module, args, kwargs, output, layer=layer):
                x = args[0] if args else next(iter(kwargs.values()))  # layer(x) or layer(input=x)
                if self.clone:
                    layer.calls.append((x.detach().clone(), output))
                    return output.clone()
                layer.calls.append((x.detach(), output))
                self.versions.append((x, x._version, output, output._version))
                return None

            self.handles.append(layer.module.register_forward_hook(hook, with_kwargs=True))
        return self

    def modified(self) -> bool:
        return any(x._version != vx or y._version != vy for x, vx, y, vy in self.versions)

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


class _Threads:
    """Pins torch's intra-op threads for the model's own forward/backward passes.

    BLAS splits long reductions (e.g. a weight gradient summed over N records) across threads, so the same inputs give
    bit-different target gradients with 1 and 2 threads. With deterministic=True the passes run on one thread and
    fastattr's own kernels, whose fixed-size blocks make them thread-count independent, get the caller's threads back
    through `_Threads.full()`."""

    caller: int | None = None

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        if self.enabled:
            self.saved, _Threads.caller = torch.get_num_threads(), torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.enabled:
            torch.set_num_threads(self.saved)
            _Threads.caller = None

    @staticmethod
    def full():
        """Context for fastattr kernels: the caller's thread count while pinned, else a no-op."""
        return _Restore(_Threads.caller)


class _Restore:
    def __init__(self, n):
        self.n = n

    def __enter__(self):
        if self.n is not None:
            self.prev = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.n is not None:
            torch.set_num_threads(self.prev)


class _RequireGrad:
    """Temporarily makes the selected parameters require grad (restored afterwards)."""

    def __init__(self, params: Iterable[nn.Parameter]):
        self.params = list(params)

    def __enter__(self):
        self.saved = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(True)

    def __exit__(self, *exc):
        for p, r in zip(self.params, self.saved):
            p.requires_grad_(r)


# ----------------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------------
def _check_records(losses, what: str = "record_loss") -> Tensor:
    if not isinstance(losses, Tensor):
        raise ScoringError(f"{what} must return a Tensor[N] of per-record losses, got {type(losses).__name__}")
    if losses.dim() != 1:
        raise ScoringError(
            f"{what} must return a 1-D Tensor[N] of per-record losses (one per record, not summed or averaged), got "
            f"shape {tuple(losses.shape)}"
        )
    if not losses.is_floating_point():
        raise ScoringError(f"{what} must return floating-point losses, got {losses.dtype}")
    if not losses.requires_grad and losses.numel() > 0:
        raise ScoringError(f"{what}: the losses do not depend on any parameter that requires grad")
    _check_finite(losses, what)
    return losses


def _check_target(target) -> Tensor:
    if not isinstance(target, Tensor):
        raise ScoringError(f"target_loss must return a Tensor[] or Tensor[M], got {type(target).__name__}")
    if target.dim() > 1:
        raise ScoringError(f"target_loss must return a scalar or a 1-D Tensor[M], got shape {tuple(target.shape)}")
    if not target.is_floating_point():
        raise ScoringError(f"target_loss must return floating-point values, got {target.dtype}")
    if not target.requires_grad:
        raise ScoringError(
            "target_loss does not depend on any selected parameter (its output does not require grad); check `params`"
        )
    _check_finite(target, "target_loss")
    return target


def _check_finite(t: Tensor, what: str) -> None:
    bad = ~torch.isfinite(t.detach())
    if bool(bad.any()):
        idx = bad.nonzero().flatten()[:5].tolist()
        raise ScoringError(
            f"{what} returned {int(bad.sum())} non-finite value(s) (NaN or inf), e.g. at index {idx}; scores would be "
            "NaN. Fix the loss (log of zero probabilities, exploding values) before scoring"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Per-layer views of the captured calls
# ----------------------------------------------------------------------------------------------------------------------
def _positions(x: Tensor, g: Tensor, n: int, name: str) -> tuple[Tensor, Tensor]:
    """Linear call -> x: [N, T, d_in], g: [N, T, d_out] with every leading dim past the first folded into T."""
    if x.shape[0] != n:
        raise ScoringError(
            f"module '{name}' saw a leading dimension of {x.shape[0]} but there are N={n} records: the leading "
            "dimension of every activation through a scored layer must be the record dimension (reshape the input, "
            "or exclude the module with `params`)"
        )
    return x.reshape(n, -1, x.shape[-1]), g.reshape(n, -1, g.shape[-1])


def _conv_patches(module: nn.Module, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
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


def _pairwise_ok(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1


def _grads_to_outputs(losses: Tensor, layers: list[_Layer], retain: bool,
                      extra: dict[str, nn.Parameter] | None = None):
    """d(sum losses)/d(output) for every captured call; None where the losses do not depend on that call (also a
    call made under torch.no_grad(), whose output is outside the graph). With `extra` (parameters), also returns
    {name: d(sum losses)/d(parameter)} from the same backward."""
    outs = [y for layer in layers for (_, y) in layer.calls if y.requires_grad]
    inputs = outs + list((extra or {}).values())
    grads = list(torch.autograd.grad(losses.sum(), inputs, allow_unused=True, retain_graph=retain)) if inputs else []
    res = [[grads.pop(0) if y.requires_grad else None for (_, y) in layer.calls] for layer in layers]
    return res if extra is None else (res, dict(zip(extra, grads)))


# ----------------------------------------------------------------------------------------------------------------------
# Aggregated target:  score_i = <grad l_i, G>
# ----------------------------------------------------------------------------------------------------------------------
def _ghost_aggregated(layer: _Layer, gs: list, G: dict, n: int, dtype, chunk: int) -> Tensor:
    m = layer.module
    gw = G.get("weight") if layer.weight else None
    gb = G.get("bias") if layer.bias else None
    total = torch.zeros(n, dtype=reference.score_dtype(dtype), device=m.weight.device)
    for (x, _), g in zip(layer.calls, gs):
        if g is None or (gw is None and gb is None):
            continue
        if isinstance(m, nn.Linear):
            x3, g3 = _positions(x, g, n, layer.name)
            x3, g3 = x3.to(dtype), g3.to(dtype)
            b = gb.to(dtype) if gb is not None else None
            if gw is None:  # only the bias is selected
                total += (g3.sum(1) @ b).to(total.dtype)
                continue
            w = gw.to(dtype)
            for s in range(0, n, chunk):
                with _Threads.full():
                    total[s:s + chunk] += ops.grad_dot(x3[s:s + chunk], g3[s:s + chunk], w, b)
        elif isinstance(m, _CONV):
            if x.shape[0] != n:
                _positions(x, g, n, layer.name)  # raises the N-mismatch error
            for s in range(0, n, chunk):
                xc, gc = x[s:s + chunk].to(dtype), g[s:s + chunk].to(dtype)
                if gw is not None:
                    y = m._conv_forward(xc, gw.to(dtype), None)  # one extra conv with the target as weight
                    total[s:s + chunk] += (y * gc).flatten(1).sum(1).to(total.dtype)
                if gb is not None:
                    total[s:s + chunk] += (gc.flatten(2).sum(2) @ gb.to(dtype)).to(total.dtype)
        else:  # Embedding: grad_W l_i = sum_t onehot(idx_t) g_t^T, so <., G> = sum_t g_t . G[idx_t]
            if x.shape[0] != n:
                _positions(x, g, n, layer.name)
            idx = x.reshape(n, -1)
            g3 = g.reshape(n, idx.shape[1], -1).to(dtype)
            rows = (gw.to_dense() if gw.is_sparse else gw).to(dtype)[idx]  # sparse=True Embedding
            if m.padding_idx is not None:
                rows = rows * (idx != m.padding_idx).unsqueeze(-1)
            total += (rows * g3).sum((1, 2)).to(total.dtype)
    return total


def _jvp_records(model: nn.Module, record_fn, generic: dict[str, nn.Parameter], tangents: list[Tensor]) -> Tensor:
    """(d record_losses / d generic params) . tangents, by one forward-mode pass (identity I3)."""
    names = list(generic)
    wrapper = _Call(model, record_fn)
    primals = tuple(generic[n].detach() for n in names)

    def f(*ps):
        return torch.func.functional_call(wrapper, {"model." + n: p for n, p in zip(names, ps)}, ())

    # MultiheadAttention's eval fast path and the fused attention kernels have no forward-mode AD: run attention
    # through its plain math (the same values)
    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha else None
    try:
        if mha:
            mha.set_fastpath_enabled(False)
        with sdpa_kernel(SDPBackend.MATH):
            _, out = torch.func.jvp(f, primals, tuple(tangents))
    except Exception as e:  # forward-mode AD not implemented for some op
        mods = _modules_of(names)
        raise ScoringError(
            f"cannot score parameters of module(s) {mods} with the general (forward-mode JVP) path: {e}. Exclude them "
            "with `params=` or replace the op that lacks forward-mode AD"
        ) from e
    finally:
        if mha:
            mha.set_fastpath_enabled(fast)
    return out


def _rel_tol(dtype: torch.dtype) -> float:
    """Relative tolerance of the exact identities the scorer checks (float64: rounding only; else float32-level)."""
    return 1e-9 if dtype == torch.float64 else 1e-4


def _modules_of(param_names) -> list[str]:
    return sorted({n.rsplit(".", 1)[0] if "." in n else "(the model itself)" for n in param_names})


def _check_jvp(jv: Tensor, reverse: dict[str, Tensor | None], tangents: dict[str, Tensor]) -> None:
    """The JVP path's scores must add up to what reverse mode says: sum_i jv[i(, m)] = <d sum_i l_i / d theta,
    tangent(_m)> (exact identity; one reverse pass the scoring backward already makes). Forward-mode AD does not see
    torch.no_grad() blocks, for one, so a record_loss computing a baseline under no_grad would be scored wrong."""
    cols = jv.reshape(jv.shape[0], -1).double()  # [N, M] (M = 1 for one target)
    got = cols.sum(0)
    expect = torch.zeros_like(got)
    for k, t in tangents.items():
        r = reverse.get(k)
        if r is not None:
            expect += (t.reshape(got.shape[0], -1).double() @ r.reshape(-1).double())
    scale = torch.maximum(expect.abs(), cols.abs().sum(0)).clamp_min(1e-30)
    if bool(((got - expect).abs() > _rel_tol(jv.dtype) * scale).any()):
        mods = _modules_of(tangents)
        raise ScoringError(
            f"the general (forward-mode JVP) path for module(s) {mods} disagrees with reverse mode: scores sum to "
            f"{got.tolist()[:4]} but the gradients give {expect.tolist()[:4]}. Usually a torch.no_grad() block inside "
            "record_loss (forward-mode AD ignores it: compute that value with .detach() or outside record_loss), or "
            "randomness in the forward, which the JVP pass draws anew (dropout in training mode: call model.eval())"
        )


class _Call(nn.Module):
    """Lets torch.func.functional_call run an arbitrary closure over the model."""

    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self):
        return self.fn(self.model)


# ----------------------------------------------------------------------------------------------------------------------
# The public entry point
# ----------------------------------------------------------------------------------------------------------------------
def score(
    model: nn.Module,
    record_loss: Callable[[nn.Module], Tensor],
    target_loss: Callable[[nn.Module], Tensor] | None = None,
    *,
    params=None,
    reduce: str = "none",
    chunk_size: int = 4096,
    dtype: torch.dtype | None = None,
    check: bool = False,
    deterministic: bool = True,
) -> Tensor:
    """Exact attribution scores of N records against one or M targets.

    Arguments:
        model: any nn.Module on one device.
        record_loss: `record_loss(model) -> Tensor[N]`, the per-record training losses. The leading dimension of
            every activation through a scored layer must be the record dimension (a record may span T positions).
        target_loss: `target_loss(model) -> Tensor[]` (one aggregated target) or `Tensor[M]` (M targets). If None,
            `record_loss(model)` must return `(record_losses, target)` from one forward pass (cheapest when both
            share the same inputs, as in PPO).
        params: which parameters to score: None (all requiring grad), a predicate `name -> bool`, or an iterable of
            parameter names, module-name prefixes, Parameters or Modules (e.g. only the actor of an actor-critic).
        reduce: for M targets, 'none' -> [N, M]; 'sum' | 'mean' | 'max' | 'min' -> [N]. Ignored for one target.
        chunk_size: records per block in the kernels and in any per-layer materialisation (bounds extra memory).
        dtype: dtype the contractions run in (e.g. torch.float64 for extra precision); default: the model's.
        check: also verify sum_i score_i against <grad sum_i l_i, grad target> (one extra backward).
        deterministic: run the model's forward/backward passes on one intra-op thread, so scores are bit-identical
            whatever torch.get_num_threads() is (BLAS splits long reductions across threads otherwise). fastattr's
            kernels use all threads either way. Set False to let the passes use every thread.

    Returns:
        Tensor[N] or Tensor[N, M]: score[i(, m)] = <grad_theta record_loss_i, grad_theta target(_m)>, summed over the
        selected parameters. float64 when the contractions run in float64, else float32.
    """
    if not isinstance(model, nn.Module):
        raise ScoringError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(record_loss):
        raise ScoringError("record_loss must be a callable record_loss(model) -> Tensor[N]")
    if target_loss is not None and not callable(target_loss):
        raise ScoringError("target_loss must be a callable target_loss(model) -> Tensor[] or Tensor[M], or None")
    if reduce not in REDUCE_OVER_M:
        raise ScoringError(f"reduce must be one of {REDUCE_OVER_M}, got {reduce!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ScoringError(f"chunk_size must be a positive int, got {chunk_size!r}")
    plan = _plan(model, params)
    param_dtype = next(iter(plan.params.values())).dtype
    dtype = dtype or param_dtype
    if not dtype.is_floating_point:
        raise ScoringError(f"dtype must be a floating-point dtype, got {dtype}")
    joint = target_loss is None

    def split(out):  # (record_losses, target) when target_loss is None
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ScoringError(
                f"record_loss must return (record_losses, target) when target_loss is None; got {type(out).__name__}"
            )
        return out

    def record_fn(m):
        return split(record_loss(m))[0] if joint else record_loss(m)

    def capture(clone: bool):
        with _Capture(plan.layers, clone) as cap:
            losses, target = split(record_loss(model)) if joint else (record_loss(model), None)
            record_calls = [layer.calls for layer in plan.layers]
            if not joint:  # a separate forward for the target: keep its calls apart from the records'
                for layer in plan.layers:
                    layer.calls = []
                target = target_loss(model)
        for layer, calls in zip(plan.layers, record_calls):
            layer.target_calls, layer.calls = layer.calls, calls
        return losses, target, cap.modified()

    with _Threads(deterministic), _RequireGrad(plan.params.values()), torch.enable_grad():
        losses, target, modified = capture(clone=False)
        if modified:  # an in-place op changed a captured input or output: capture again with copies
            losses, target, _ = capture(clone=True)
        losses = _check_records(losses)
        target = _check_target(target)
        n = losses.shape[0]
        single = target.dim() == 0 or reduce in ("sum", "mean")
        # check=True with max / min: the check needs the [N, M] scores, so reduce after it
        inner = "none" if check and reduce in ("max", "min") else reduce
        if single:
            agg = target if target.dim() == 0 else (target.sum() if reduce == "sum" else target.mean())
            result = _score_aggregated(model, plan, record_fn, losses, agg, n, dtype, chunk_size)
        else:
            result = _score_pairwise(model, plan, record_fn, losses, target, n, dtype, chunk_size, inner)
        if check:
            def fresh(m):  # records and target from a new forward: the scoring backward freed the joint graph
                return split(record_loss(m)) if joint else (record_loss(m), target_loss(m))

            _verify(plan, fresh, model, result, inner, single)
        if not single and inner != reduce:
            result = reference.reduce_sim(result, reduce)
    return result


def _param_grads(target: Tensor, params: dict[str, nn.Parameter], retain: bool) -> dict[str, Tensor | None]:
    names = list(params)
    grads = torch.autograd.grad(target, [params[k] for k in names], allow_unused=True, retain_graph=retain)
    return dict(zip(names, grads))


def _score_aggregated(model, plan, record_fn, losses, target, n, dtype, chunk) -> Tensor:
    G = _param_grads(target, plan.params, retain=True)
    if all(g is None for g in G.values()):
        raise ScoringError("target_loss does not depend on any selected parameter; check `params`")
    generic = {k: p for k, p in plan.generic.items() if G[k] is not None}
    out_grads, reverse = _grads_to_outputs(losses, plan.layers, retain=False, extra=generic)
    total = torch.zeros(n, dtype=reference.score_dtype(dtype), device=losses.device)
    for layer, gs in zip(plan.layers, out_grads):
        Gl = {}
        if layer.weight:
            Gl["weight"] = G[plan.name_of(layer.module.weight)]
        if layer.bias:
            Gl["bias"] = G[plan.name_of(layer.module.bias)]
        Gl = {k: v for k, v in Gl.items() if v is not None}
        total += _ghost_aggregated(layer, gs, Gl, n, dtype, chunk)
    if generic and n > 0:
        jv = _jvp_records(model, record_fn, generic, [G[k].detach() for k in generic]).detach()
        _check_jvp(jv, reverse, {k: G[k].detach() for k in generic})
        total += jv.to(total.dtype)
    return total


# ----------------------------------------------------------------------------------------------------------------------
# M targets:  score_im = <grad l_i, grad t_m>
# ----------------------------------------------------------------------------------------------------------------------
def _layer_sides(layer: _Layer, calls, gs, rows: int) -> tuple[Tensor, Tensor] | None:
    """All calls of one layer as positions: x [rows, T, d_in(+1)], g [rows, T, d_out]; None if nothing depends on it.
    A constant-1 column folds the bias into x; with only the bias selected x is that column alone."""
    xs, gss = [], []
    m = layer.module
    for (x, _), g in zip(calls, gs):
        if g is None:
            continue
        if isinstance(m, nn.Linear):
            x3, g3 = _positions(x, g, rows, layer.name)
        else:
            if x.shape[0] != rows:
                _positions(x, g, rows, layer.name)
            x3, g3 = _conv_patches(m, x, g)
        if not layer.weight:
            x3 = x3.new_ones(x3.shape[:-1] + (1,))
        elif layer.bias:
            x3 = torch.cat([x3, x3.new_ones(x3.shape[:-1] + (1,))], dim=-1)
        xs.append(x3)
        gss.append(g3)
    if not xs:
        return None
    return torch.cat(xs, 1), torch.cat(gss, 1)


def _materialise(x: Tensor, g: Tensor, chunk: int) -> Tensor:
    """Per-sample gradients of one layer, [rows, d_out * d_in]: sum_t g_t x_t^T (chunked over rows)."""
    parts = [torch.einsum("nto,nti->noi", g[s:s + chunk], x[s:s + chunk]).flatten(1) for s in range(0, len(x), chunk)]
    return torch.cat(parts) if parts else x.new_zeros(0, g.shape[-1] * x.shape[-1])


def _score_pairwise(model, plan, record_fn, losses, target, n, dtype, chunk, reduce) -> Tensor:
    m_targets = target.shape[0]
    acc = reference.score_dtype(dtype)
    # Output gradients of the targets (per target, when target m depends on row m only) and of the records.
    generic = dict(plan.generic)  # + convs without a Gram form (Conv3d, groups > 1): the JVP path
    for layer in plan.layers:
        if isinstance(layer.module, _CONV) and not _pairwise_ok(layer.module):
            generic.update({plan.name_of(p): p for p in _layer_params(layer)})
    t_grads = _grads_to_outputs(target, _with_calls(plan.layers, "target_calls"), retain=True)
    r_grads, reverse = _grads_to_outputs(losses, plan.layers, retain=True, extra=generic)
    if not _one_row_per_target(target, plan.layers, t_grads):
        return _score_per_target(model, plan, record_fn, losses, target, r_grads, reverse, n, dtype, chunk, reduce)

    xa, ga, xb, gb, embeddings = [], [], [], [], []
    for layer, rg, tg in zip(plan.layers, r_grads, t_grads):
        if isinstance(layer.module, nn.Embedding):
            embeddings.append((layer, rg, tg))
            continue
        if isinstance(layer.module, _CONV) and not _pairwise_ok(layer.module):
            continue
        a = _layer_sides(layer, layer.calls, rg, n)
        b = _layer_sides(layer, layer.target_calls, tg, m_targets)
        if a is None or b is None:
            continue
        (x_a, g_a), (x_b, g_b) = a, b
        t, s = x_a.shape[1], x_b.shape[1]
        d_in, d_out = x_a.shape[-1], g_a.shape[-1]
        if t * s * (d_in + d_out) > d_in * d_out:  # T^2 rule: materialising this layer is cheaper
            x_a, g_a = _materialise(x_a, g_a, chunk), torch.ones(n, 1, dtype=x_a.dtype, device=x_a.device)
            x_b, g_b = _materialise(x_b, g_b, chunk), torch.ones(m_targets, 1, dtype=x_b.dtype, device=x_b.device)
        xa.append(x_a.to(dtype)), ga.append(g_a.to(dtype)), xb.append(x_b.to(dtype)), gb.append(g_b.to(dtype))

    extra_needed = bool(embeddings) or bool(generic)
    op_reduce = "none" if extra_needed else reduce
    out_shape = (n, m_targets) if op_reduce == "none" else (n,)
    result = torch.zeros(out_shape, dtype=acc, device=losses.device)
    if xa and n > 0:
        for s in range(0, n, chunk):
            with _Threads.full():
                result[s:s + chunk] = ops.grad_sim_reduce(
                    [x[s:s + chunk] for x in xa], [g[s:s + chunk] for g in ga], xb, gb, op_reduce
                )
    elif op_reduce != "none" and n > 0:
        result = reference.reduce_sim(torch.zeros(n, m_targets, dtype=acc, device=losses.device), reduce)
    for layer, rg, tg in embeddings:
        result += _embedding_pairwise(layer, rg, tg, n, m_targets, dtype, chunk).to(acc)
    if generic:
        result += _jvp_checked(model, record_fn, generic, target, reverse, n, chunk).to(acc)
    if extra_needed:
        result = reference.reduce_sim(result, reduce)
    return result


def _one_row_per_target(target: Tensor, layers: list[_Layer], t_grads) -> bool:
    """Whether target m depends on row m of every scored call only, as the Gram path assumes (e.g. M log-probs of M
    probe states). Equal row counts are not enough (a target may mix rows). Exactly: each target's gradient on every
    row, one batched backward, must be zero off its own row (autograd gives exact zeros where there is no
    dependence); when that [M, M, ...] tensor would be too large, a random combination w . target must give each
    row w_row times the output gradient of sum(target), up to rounding (a cross-row term below the rounding of a row
    whose own target is far larger can pass there)."""
    m_targets = target.shape[0]
    calls = [(y, g) for layer, tg in zip(layers, t_grads) for (_, y), g in zip(layer.target_calls, tg) if g is not None]
    if any(y.shape[0] != m_targets for y, _ in calls):
        return False
    if not calls:
        return True
    ys = [y for y, _ in calls]
    if m_targets * sum(y.numel() for y in ys) <= 2**24:
        eye = torch.eye(m_targets, dtype=target.dtype, device=target.device)
        try:
            per = torch.autograd.grad(target, ys, grad_outputs=eye, is_grads_batched=True, retain_graph=True,
                                      allow_unused=True)
        except RuntimeError:  # an op without a batching rule: the random-combination test below
            per = None
        if per is not None:
            off = ~torch.eye(m_targets, dtype=torch.bool, device=target.device)
            return not any(bool(g[off].ne(0).any()) for g in per if g is not None)
    w = torch.rand(m_targets, generator=torch.Generator().manual_seed(0), dtype=torch.float64).add_(1.0)
    w = w.to(dtype=target.dtype, device=target.device)
    gw = torch.autograd.grad(target, ys, grad_outputs=w, retain_graph=True, allow_unused=True)
    for (_, g), h in zip(calls, gw):
        expect = g * w.view((-1,) + (1,) * (g.dim() - 1))
        h = torch.zeros_like(g) if h is None else h
        if float((h - expect).abs().max()) > _rel_tol(target.dtype) * max(float(expect.abs().max()), 1e-30):
            return False
    return True


def _with_calls(layers: list[_Layer], attr: str) -> list[_Layer]:
    return [_Layer(l.name, l.module, l.weight, l.bias, getattr(l, attr, [])) for l in layers]


def _embedding_pairwise(layer, rg, tg, n, m_targets, dtype, chunk) -> Tensor:
    """sum_{t,s} [idx_nt == idx_ms] (g_nt . g_ms), with padding_idx rows excluded."""
    mod = layer.module

    def side(calls, gs, rows):
        idx, g = [], []
        for (x, _), gg in zip(calls, gs):
            if gg is None:
                continue
            if x.shape[0] != rows:
                _positions(x, gg, rows, layer.name)
            i = x.reshape(rows, -1)
            idx.append(i), g.append(gg.reshape(rows, i.shape[1], -1).to(dtype))
        if not idx:
            return None
        i, gg = torch.cat(idx, 1), torch.cat(g, 1)
        if mod.padding_idx is not None:
            gg = gg * (i != mod.padding_idx).unsqueeze(-1)
        return i, gg

    out = torch.zeros(n, m_targets, dtype=reference.score_dtype(dtype), device=mod.weight.device)
    a, b = side(layer.calls, rg, n), side(layer.target_calls, tg, m_targets)
    if a is None or b is None or not layer.weight:
        return out
    (ia, ga), (ib, gb) = a, b
    for s in range(0, n, max(1, chunk // max(1, ia.shape[1]))):
        e = slice(s, s + max(1, chunk // max(1, ia.shape[1])))
        eq = (ia[e, :, None, None] == ib[None, None]).to(dtype)  # [n, T, M, S]
        dots = torch.einsum("nto,mso->ntms", ga[e], gb)
        out[e] = (eq * dots).sum((1, 3)).to(out.dtype)
    return out


def _per_target_grads(target: Tensor, params: dict[str, nn.Parameter], chunk: int) -> list[Tensor]:
    """[M, *p.shape] gradients of each target entry, one vmapped backward (loop if vmap cannot run)."""
    names = list(params)
    m_targets = target.shape[0]
    ps = [params[k] for k in names]
    eye = torch.eye(m_targets, dtype=target.dtype, device=target.device)
    try:
        grads = torch.autograd.grad(target, ps, grad_outputs=eye, is_grads_batched=True, retain_graph=True,
                                    allow_unused=True)
    except RuntimeError:
        rows = [torch.autograd.grad(target[i], ps, retain_graph=True, allow_unused=True) for i in range(m_targets)]
        grads = [torch.stack([r[j] if r[j] is not None else torch.zeros_like(ps[j]) for r in rows])
                 for j in range(len(ps))]
    return [g if g is not None else torch.zeros((m_targets,) + p.shape, dtype=p.dtype, device=p.device)
            for g, p in zip(grads, ps)]


def _jvp_checked(model, record_fn, generic, target: Tensor, reverse: dict, n: int, chunk: int) -> Tensor:
    """[N, M]: column m = (d record_losses / d generic) . grad t_m, cross-checked against reverse mode."""
    Gm = [g.detach() for g in _per_target_grads(target, generic, chunk)]
    cols = [_jvp_records(model, record_fn, generic, [g[i] for g in Gm]).detach() for i in range(len(Gm[0]))]
    jv = torch.stack(cols, 1) if cols else torch.zeros(n, 0)
    _check_jvp(jv, reverse, dict(zip(generic, Gm)))
    return jv


def _score_per_target(model, plan, record_fn, losses, target, r_grads, reverse, n, dtype, chunk, reduce) -> Tensor:
    """Targets whose activations are not one row per target: full per-target gradients, then per-layer contraction."""
    acc = reference.score_dtype(dtype)
    m_targets = target.shape[0]
    result = torch.zeros(n, m_targets, dtype=acc, device=losses.device)
    ghost_params = {f"{l.name}.{k}": p for l in plan.layers for k, p in zip(
        (["weight"] if l.weight else []) + (["bias"] if l.bias else []), _layer_params(l))}
    Gm = dict(zip(ghost_params, _per_target_grads(target, ghost_params, chunk))) if ghost_params else {}
    for layer, rg in zip(plan.layers, r_grads):
        gw = Gm.get(f"{layer.name}.weight")
        gbias = Gm.get(f"{layer.name}.bias")
        for mi in range(m_targets):
            G = {}
            if gw is not None:
                G["weight"] = gw[mi]
            if gbias is not None:
                G["bias"] = gbias[mi]
            result[:, mi] += _ghost_aggregated(layer, rg, G, n, dtype, chunk).to(acc)
    if plan.generic:
        result += _jvp_checked(model, record_fn, plan.generic, target, reverse, n, chunk).to(acc)
    return reference.reduce_sim(result, reduce)


def _verify(plan, fresh, model, result, reduce, single) -> None:
    """sum_i score_i must equal <grad sum_i l_i, grad target> (exact identity, cheap): catches missed contributions.
    `fresh(model) -> (record_losses, target)` runs a new forward. reduce is none, sum or mean here."""
    with torch.enable_grad():
        out, target = fresh(model)
        ps = list(plan.params.values())
        gl = torch.autograd.grad(out.sum(), ps, allow_unused=True, retain_graph=True)
        t = target if target.dim() == 0 else (target.mean() if reduce == "mean" else target.sum())
        gt = torch.autograd.grad(t, ps, allow_unused=True)
    expect = sum(float((a.double() * b.double()).sum()) for a, b in zip(gl, gt) if a is not None and b is not None)
    got = float(result.double().sum())
    scale = max(abs(expect), float(result.double().abs().sum()), 1e-30)
    if abs(got - expect) > _rel_tol(result.dtype) * scale:
        raise RuntimeError(
            f"fastattr.score check failed: sum of scores {got:.6g} != <grad sum l, grad target> {expect:.6g}. A selected "
            "parameter is used outside the module that owns it (e.g. F.linear(x, layer.weight)); score it through its "
            "module or exclude it with `params`"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Selecting records by score
# ----------------------------------------------------------------------------------------------------------------------
def topk(scores: Tensor, k: int, largest: bool = True) -> tuple[Tensor, Tensor]:
    """The k most helpful (largest=True) or most harmful records: (values, indices). scores: [N] (or [N, M] reduced
    first with `reduce=`)."""
    if scores.dim() != 1:
        raise ScoringError(f"topk: scores must be 1-D [N]; got shape {tuple(scores.shape)} (pass reduce= to score())")
    if not 0 <= k <= scores.shape[0]:
        raise ScoringError(f"topk: k must be in [0, N={scores.shape[0]}], got {k}")
    return torch.topk(scores, k, largest=largest, sorted=True)


def select(scores: Tensor, *, above: float | None = None, below: float | None = None) -> Tensor:
    """Indices of records with score > above and/or score < below."""
    if scores.dim() != 1:
        raise ScoringError(f"select: scores must be 1-D [N]; got shape {tuple(scores.shape)}")
    if above is None and below is None:
        raise ScoringError("select: give a threshold, above= and/or below=")
    mask = torch.ones_like(scores, dtype=torch.bool)
    if above is not None:
        mask &= scores > above
    if below is not None:
        mask &= scores < below
    return mask.nonzero().flatten()
