"""Exact per-record attribution scores for any PyTorch model, without materialising per-sample gradients.

    score[i]    = <grad_theta record_loss_i, grad_theta target>          (one aggregated target)
    score[i, m] = <grad_theta record_loss_i, grad_theta target_m>        (M targets)

Exact or refused: a parameter is scored by a fast path only when that path's assumptions are checked to hold for this
very call; otherwise by the exact general path; and when that cannot run either, a ScoringError says why and what to do.

Fast paths (fastattr/ghost.py), for nn.Linear (and transformers' Conv1D, a Linear with its weight transposed),
nn.Conv1d/2d/3d and nn.Embedding: the per-record gradient of the layer is formed implicitly from its captured inputs
and output gradients, against one target with `ops.grad_dot` (one extra layer forward with the target gradient as
weight), against M targets with `ops.grad_sim_reduce` on Gram tiles. The affine path (fastattr/affine.py), for any
other module whose only parameters are its own weight and bias and whose output is affine in them (norms, PReLU,
scales; checked on every call), calls the module again with the target gradient as its parameters. A weight tied
across modules is scored by each module's path, the parts added (the Gram form sends it to the general path). The
fast paths are exact when:
  (a) every use of the parameter goes through the module's own calls. Checked on the autograd graph of the losses: a
      parameter that is reached by any other route (F.linear(x, layer.weight), a regulariser, a user hook) goes to
      the general path;
  (b) each call has one row per record. A call on a batch of one broadcast over the records (GPT-2's position
      embedding on ids of shape [1, T]) is run again with its output expanded to N rows (a view), and the losses are
      checked unchanged; a call with another leading dimension goes to the general path;
  (c) record i's loss depends on row i of each call's output only. Proven from the autograd graph when every node
      between the losses and a captured output is an op known to keep rows apart (_rows_local_by_structure); else
      checked with one extra backward under random power-of-two record weights w: rows that do not mix give exactly
      w_i times the unweighted output gradient (a power of two scales floating-point results exactly), anything else
      shows. A loss normalised by the batch, a TD target taken from the next row, batch statistics inside forward
      all fail it and go to the general path.
General path: the record losses' forward-mode JVP along the target gradient (score = J G: exact whatever mixes rows,
for any module with forward-mode AD), batched over targets for M of them, cross-checked against reverse mode.

M targets take the Gram path when target m depends on row m of each call only (checked exactly); otherwise each
target's full gradient is formed and contracted per layer. Record losses may be per position ([N, T]); `units` sums
scores into episodes, sequences or groups (exact by linearity). `process_group` shards the records over ranks.
Output gradients come from `torch.autograd.grad` to the captured layer outputs, so no parameter .grad is formed.

A target that is the sum (or mean) of the record losses shares their backward (one backward gives the output
gradients and the target gradient). `score_and_backward` uses that inside a training step: scores against the batch's
own loss, a keep-mask chosen from them, and the kept records' gradient written to .grad (the dropped rows' part taken
off layer by layer), from the step's own forward and backward.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

from . import affine, ghost, ops, reference
from .ghost import Call, Layer
from .threads import for_kernels, pinned

REDUCE_OVER_M = ("none", "sum", "mean", "max", "min")


class ScoringError(ValueError):
    """fastattr.score cannot score this exactly; the message names the argument or module and says what to do."""


# ----------------------------------------------------------------------------------------------------------------------
# Which parameters are scored, and how
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    params: dict[str, nn.Parameter]  # every selected parameter, by its (first) qualified name
    layers: list[Layer]  # modules whose selected parameters may take a fast path
    why: dict[str, str] = field(default_factory=dict)  # parameter name -> why it takes the general path

    def name_of(self, p: nn.Parameter) -> str:
        """The name a selected parameter has in `params` (a module may know it under another, shared, name)."""
        return next(k for k, q in self.params.items() if q is p)

    @property
    def general(self) -> dict[str, nn.Parameter]:
        """Selected parameters scored by the general (JVP) path."""
        fast = {id(p) for layer in self.layers for p in layer.params()}
        return {n: p for n, p in self.params.items() if id(p) not in fast}

    def to_general(self, layer: Layer, why: str, only: nn.Parameter | None = None) -> None:
        """Sends a layer's selected parameters (or just `only`) to the general path, from every layer holding them
        (a weight tied across modules is scored on one path or the other, never both)."""
        leaving = [only] if only is not None else layer.params()
        for p in leaving:
            self.why.setdefault(self.name_of(p), why)
        ids = {id(p) for p in leaving}
        for x in self.layers:
            x.use_weight = x.use_weight and id(x.module.weight) not in ids
            x.use_bias = x.use_bias and id(getattr(x.module, "bias", None)) not in ids
        self.layers = [x for x in self.layers if x.params()]


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
    layers, why = [], {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ScoringError(
                f"model: module '{name}' ({type(m).__name__}) is in training mode, which mixes records through batch "
                "statistics and updates its running statistics on every forward; call model.eval() (or the "
                "module's .eval()) before scoring"
            )
        kind = ghost.kind_of(m) or ("affine" if affine.is_candidate(m) else None)
        if kind is None:
            continue
        w, b = getattr(m, "weight", None), getattr(m, "bias", None)
        use_w = isinstance(w, nn.Parameter) and id(w) in chosen_ids  # a weight tied to several modules: each
        use_b = isinstance(b, nn.Parameter) and id(b) in chosen_ids  # call adds its part of the gradient
        if not (use_w or use_b):
            continue
        if kind == "embedding" and (m.scale_grad_by_freq or m.max_norm is not None):
            raise ScoringError(
                f"model: Embedding '{name}' uses {'scale_grad_by_freq' if m.scale_grad_by_freq else 'max_norm'}, "
                "which makes a record's gradient depend on the other records in the batch (or renormalises the "
                "table during the forward), so per-record scores are not defined; disable it or exclude the "
                "module with `params`"
            )
        layers.append((affine.AffineLayer if kind == "affine" else Layer)(name, m, use_w, use_b))
    return _Plan(chosen, layers, why)


# ----------------------------------------------------------------------------------------------------------------------
# Capture: each scored layer's input and output, per forward call
# ----------------------------------------------------------------------------------------------------------------------
class _Capture:
    """Records every call of the scored layers (fastattr.ghost.Call), into `layer.calls` while the records' losses are
    computed and into `layer.target_calls` during a separate target forward (`phase`). The hooks run before any user
    hook, so they see the module's own output.

    `modified()` tells whether the forward changed a captured input or output in place afterwards (e.g.
    ReLU(inplace=True) on a Linear's output, which moves the output's place in the graph); with clone=True the hook
    keeps its own copy of the input and hands the model a copy of the output, so in-place ops downstream change only
    those copies. With `expand_to=N`, a records-phase call on a batch of one hands the model its output expanded to N
    rows (a view), so that each record's output gradient is its own."""

    def __init__(self, layers: list[Layer], clone: bool = False, expand_to: int | None = None):
        self.layers, self.clone, self.expand_to = layers, clone, expand_to
        self.handles, self.versions, self.phase = [], [], "records"

    def __enter__(self):
        for layer in self.layers:
            layer.calls, layer.target_calls = [], []
            if isinstance(layer, affine.AffineLayer):
                layer.inputs, layer.bases = [], []
            self.handles.append(layer.module.register_forward_hook(self._hook(layer), with_kwargs=True, prepend=True))
        return self

    def _hook(self, layer: Layer):
        def hook(module, args, kwargs, output):
            x = args[0] if args else next(iter(kwargs.values()))  # layer(x) or layer(input=x)
            stop = x.grad_fn
            calls = layer.calls if self.phase == "records" else layer.target_calls
            expand = (self.phase == "records" and self.expand_to is not None and x.dim() >= 1 and output.dim() >= 2
                      and x.shape[0] == 1 and output.shape[0] == 1)
            y = output.expand(self.expand_to, *output.shape[1:]) if expand else output
            xs = x.expand(self.expand_to, *x.shape[1:]) if expand else x
            if isinstance(layer, affine.AffineLayer) and self.phase == "records":  # to call the module again
                layer.inputs.append(tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t,
                                             (args, kwargs)))
            if self.clone:
                calls.append(Call(xs.detach().clone(), y, stop, expand))
                return y.clone()
            calls.append(Call(xs.detach(), y, stop, expand))
            self.versions.append((x, x._version, output, output._version))
            return y if expand else None

        return hook

    def modified(self) -> bool:
        return any(x._version != vx or y._version != vy for x, vx, y, vy in self.versions)

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


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


def _unwrap(model: nn.Module):
    """(module the closures and the plan see, context for the scoring passes). A DistributedDataParallel model is
    scored through its .module, inside no_sync(): fastattr's backward passes are autograd.grad calls, which must not
    arm DDP's gradient reduction."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model.module, model.no_sync()
    return model, nullcontext()


# ----------------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------------
def _check_records(losses, what: str = "record_loss") -> Tensor:
    if not isinstance(losses, Tensor):
        raise ScoringError(f"{what} must return a Tensor[N] of per-record losses, got {type(losses).__name__}")
    if losses.dim() not in (1, 2):
        raise ScoringError(
            f"{what} must return a 1-D Tensor[N] of per-record losses (one per record, not summed or averaged) or a "
            f"2-D Tensor[N, T] of per-position losses, got shape {tuple(losses.shape)}"
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
    if target.numel() == 0:
        raise ScoringError("target_loss returned zero targets (Tensor[0]); give at least one target")
    _check_finite(target, "target_loss")
    return target


def _check_finite(t: Tensor, what: str) -> None:
    bad = ~torch.isfinite(t.detach())
    if bool(bad.any()):
        idx = bad.nonzero()[:5].tolist()
        raise ScoringError(
            f"{what} returned {int(bad.sum())} non-finite value(s) (NaN or inf), e.g. at index {idx}; scores would be "
            "NaN. Fix the loss (log of zero probabilities, exploding values) before scoring"
        )


def _check_units(units, shape: torch.Size, device) -> Tensor | None:
    if units is None:
        return None
    units = torch.as_tensor(units, device=device)
    if units.dtype in (torch.bool,) or units.is_floating_point() or units.is_complex():
        raise ScoringError(f"units must be an integer tensor (a unit index per record), got {units.dtype}")
    if tuple(units.shape) not in (tuple(shape[:1]), tuple(shape)):
        raise ScoringError(
            f"units must have one entry per record, shape {tuple(shape[:1])}"
            + (f" (or one per position, {tuple(shape)})" if len(shape) == 2 else "")
            + f", got shape {tuple(units.shape)}"
        )
    if units.numel() and int(units.min()) < 0:
        raise ScoringError(f"units must be >= 0 (unit indices), got a minimum of {int(units.min())}")
    return units.long()


# ----------------------------------------------------------------------------------------------------------------------
# The checks behind the fast paths
# ----------------------------------------------------------------------------------------------------------------------
def _module_nodes(calls: list[Call]) -> set:
    """Autograd nodes of the layer's own computation: reachable from a call's output without passing its input."""
    nodes: set = set()
    for call in calls:
        stack = [call.y.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node is call.stop or node in nodes:
                continue
            nodes.add(node)
            stack.extend(nxt for nxt, _ in node.next_functions)
    return nodes


def _used_outside(roots: list[Tensor], layers: list[Layer], side: str) -> dict[int, nn.Parameter]:
    """The selected parameters (by id) reached from `roots` through a node that is not part of a call of a layer
    holding them: the fast path would not see that use. A weight tied across layers may be used by any of them."""
    owners: dict[int, list[Layer]] = {}
    for layer in layers:
        for p in layer.params():
            owners.setdefault(id(p), []).append(layer)
    if not owners:
        return {}
    own = {id(layer): _module_nodes(layer.calls if side == "records" else layer.target_calls) for layer in layers}
    found: dict[int, nn.Parameter] = {}
    seen: set = set()
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)  # an AccumulateGrad node: a leaf tensor
            if var is not None:
                held = owners.get(id(var))
                if held is not None and not any(node in own[id(layer)] for layer in held):
                    found[id(var)] = var
            elif nxt not in seen:
                stack.append(nxt)
    return found


# Autograd nodes whose every output row depends on the same row of each input, when the input has the output's rank and
# its leading dimension (elementwise ops, casts, broadcasting within a row)
_ROWWISE = {
    "AbsBackward0", "AddBackward0", "AddBackward1", "ClampBackward1", "ClampMaxBackward0", "ClampMinBackward0",
    "CloneBackward0", "CosBackward0", "DivBackward0", "DivBackward1", "EluBackward0", "ExpBackward0", "Expm1Backward0",
    "ExpandBackward0", "GeluBackward0", "HardtanhBackward0", "LeakyReluBackward0", "Log1pBackward0", "LogBackward0",
    "MaskedFillBackward0", "MaximumBackward0", "MinimumBackward0", "MseLossBackward0", "MulBackward0",
    "MulBackward1", "NegBackward0", "PowBackward0", "ReciprocalBackward0", "ReluBackward0", "RsqrtBackward0",
    "RsubBackward0", "RsubBackward1", "SigmoidBackward0", "SiluBackward0", "SinBackward0", "SoftplusBackward0",
    "SqrtBackward0", "SubBackward0", "SubBackward1", "TanhBackward0", "ToCopyBackward0", "WhereBackward0",
    "AliasBackward0",
}
# Reshapes that keep the leading dimension keep rows apart (row-major order maps block i to block i)
_ROW_RESHAPE = {"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"}
# ... and those where it holds when the op's dimension(s) are not 0 (the record dimension)
_ROWWISE_IF_NOT_DIM0 = {"LogSoftmaxBackward0", "SoftmaxBackward0", "LogsumexpBackward0", "SumBackward1",
                        "MeanBackward1", "GatherBackward0", "SqueezeBackward1", "UnsqueezeBackward0", "SelectBackward0",
                        "SliceBackward0", "CatBackward0", "TransposeBackward0", "PermuteBackward0",
                        "SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0"}
# ops with several outputs, each a piece along one dimension: rows stay apart when it is not 0
_SPLITS = {"SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0"}
# ... and those where it holds for the input at this position only (the other inputs are shared across rows)
_ROWWISE_INPUT = {"AddmmBackward0": 1, "MmBackward0": 0, "ConvolutionBackward0": 0, "NativeLayerNormBackward0": 0,
                  "NllLossBackward0": 0, "BmmBackward0": None,  # bmm: both inputs are batched by row
                  # attention mixes positions within a batch entry, never across entries (q, k, v all batched)
                  "ScaledDotProductFlashAttentionForCpuBackward0": None, "ScaledDotProductFlashAttentionBackward0": None,
                  "ScaledDotProductEfficientAttentionBackward0": None, "ScaledDotProductCudnnAttentionBackward0": None}


def _dims(node, rank: int) -> list[int]:
    """The dimension(s) a dimension-taking op works on, normalised to [0, rank) (permute: [0] unless dimension 0
    stays first; an op whose dimension cannot be read, or that reduces every dimension: [0])."""
    def norm(d) -> int:
        d = int(d)
        d = d - 2**64 if d >= 2**63 else d  # a negative dim comes back as an unsigned 64-bit integer
        return d % rank if rank else 0

    if hasattr(node, "_saved_dims"):
        return [] if norm(node._saved_dims[0]) == 0 else [0]
    if hasattr(node, "_saved_dim0"):
        return [norm(node._saved_dim0), norm(node._saved_dim1)]
    dim = getattr(node, "_saved_dim", None)
    dims = list(dim) if isinstance(dim, (tuple, list)) else [] if dim is None else [dim]
    return [norm(d) for d in dims] or [0]


def _row_edge(node, k: int, in_shape: torch.Size, out_shape: torch.Size, n: int) -> bool:
    """Whether each output row of `node` depends only on input rows of the same record, through its k-th input.

    A tensor on the way has a leading dimension of n * k rows, records-major (reshapes never move data, so a view of
    [N, T, d] as [N * T, d] keeps each record's rows together): an op that keeps rows apart keeps records apart."""
    if len(in_shape) == 0 or len(out_shape) == 0 or in_shape[0] % n or out_shape[0] % n or in_shape[0] == 0:
        return False
    name = type(node).__name__
    if name in _ROW_RESHAPE:
        return True
    if in_shape[0] != out_shape[0]:
        return False
    if name in _ROWWISE:
        return len(in_shape) == len(out_shape)
    if name in _ROWWISE_IF_NOT_DIM0:
        index = getattr(node, "_saved_index", None) if name == "GatherBackward0" else None
        if index is not None and (index.dim() == 0 or int(index.shape[0]) != int(out_shape[0])):
            return False
        return 0 not in _dims(node, len(in_shape))
    if name in _ROWWISE_INPUT:
        if name == "NllLossBackward0" and int(node._saved_reduction) != 0:
            return False
        if name == "NativeLayerNormBackward0" and len(node._saved_normalized_shape) >= len(in_shape):
            return False
        return _ROWWISE_INPUT[name] is None or _ROWWISE_INPUT[name] == k
    return False


def _rows_local_by_structure(losses: Tensor, calls: list[Call]) -> bool:
    """A proof, from the autograd graph alone, that record i's loss depends on row i of each call's output only: every
    edge on every path from the losses to a captured output is one of a few ops known to keep rows apart (elementwise
    ops, reductions and softmaxes over other dimensions, the row operand of a matmul or convolution, ...). False means
    "not proven" (an op outside the list, a broadcast of a shared row, a reshape of the record dimension): the
    numeric check then decides. Saves that check's backward for the usual RL losses."""
    n = losses.shape[0] if losses.dim() == 1 else -1
    targets = {c.y.grad_fn for c in calls if c.y.grad_fn is not None}
    root = losses.grad_fn
    if n < 0 or root is None or not targets:
        return False
    reaches: dict = {}  # node -> whether a captured output is reachable from it
    stack = [(root, False)]
    while stack:  # iterative post-order
        node, expanded = stack.pop()
        if node in reaches:
            continue
        kids = [k for k, _ in node.next_functions if k is not None]
        if not expanded:
            stack.append((node, True))
            stack.extend((k, False) for k in kids if k not in reaches)
            continue
        reaches[node] = node in targets or any(reaches.get(k, False) for k in kids)
    if not reaches.get(root):
        return True  # the losses depend on no captured output at all
    for node, hit in reaches.items():
        if not hit:
            continue
        meta = node._input_metadata
        if len(meta) != 1 and (type(node).__name__ not in _SPLITS or len({int(m.shape[0]) if len(m.shape) else -1
                                                                            for m in meta}) != 1):
            return False  # several outputs, other than pieces with the same rows
        out_shape = meta[0].shape
        for k, (kid, idx) in enumerate(node.next_functions):
            if kid is not None and reaches.get(kid) and not _row_edge(node, k, kid._input_metadata[idx].shape,
                                                                      out_shape, n):
                return False
    return True


def _record_weights(n: int, units: Tensor | None, dtype: torch.dtype, device) -> Tensor:
    """Random powers of two per record (equal within a unit), from a fixed seed: [n]. Half precision keeps a narrow
    range so that weighted gradients cannot overflow."""
    top = 4 if dtype == torch.float16 else 16
    ids = torch.arange(n) if units is None else units.cpu()
    exps = _hash(ids) % top
    return torch.ldexp(torch.ones(n, dtype=torch.float64), exps.double()).to(dtype=dtype, device=device)


def _hash(ids: Tensor) -> Tensor:
    """A fixed pseudo-random integer per id (a multiplicative hash: cheap, deterministic, no generator state)."""
    return ((ids * 0x9E3779B1 + 0x7F4A7C15) % (1 << 32)) >> 12


def _mixing(losses: Tensor, pairs: list[tuple[Layer, Call, Tensor]], weights: Tensor) -> dict[int, tuple[Layer, int]]:
    """Layers (by id) whose output rows mix across records (across units), with a row that shows it.

    h = d(sum_i w_i l_i)/dy against g = d(sum_i l_i)/dy: when l_i depends on row i of y only, h_i = w_i g_i exactly
    (w_i a power of two); a dependence of l_i on row j != i adds (w_i - w_j) dl_i/dy_j to row j, which the check sees
    unless w_i = w_j (the weights take 16 values, so a single mixing pair escapes with probability about 1/16; any
    realistic mixing touches many pairs)."""
    ys = [call.y for _, call, _ in pairs]
    hs = torch.autograd.grad(losses, ys, grad_outputs=weights, retain_graph=True, allow_unused=True)
    bad = {}
    for (layer, call, g), h in zip(pairs, hs):
        w = weights.to(g.dtype).view((-1,) + (1,) * (g.dim() - 1))
        if h is not None and torch.equal(h, g * w):  # the usual case: bitwise, one cheap comparison
            continue
        diff = (h / w - g).abs() if h is not None else g.abs()
        tol = 8 * torch.finfo(g.dtype).eps * float(g.abs().amax())
        if float(diff.amax()) > tol:
            bad.setdefault(id(layer), (layer, int(diff.flatten(1).amax(1).argmax())))
    return bad


def _one_row_per_record(layer: Layer, call: Call, n: int) -> bool:
    """Whether a call is batched with its leading dimension the N records (a conv must get [N, C, *spatial])."""
    if layer.kind == "conv" and call.x.dim() != layer.module.weight.dim():
        return False
    return call.batched and call.y.shape[0] == n


def _rel_tol(dtype: torch.dtype) -> float:
    """Relative tolerance of the exact identities the scorer checks (float64: rounding only; else float32-level)."""
    return 1e-9 if dtype == torch.float64 else 1e-4


def _same(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape:
        return False
    scale = float(a.detach().abs().amax()) if a.numel() else 0.0
    return float((a.detach() - b.detach()).abs().amax()) <= _rel_tol(a.dtype) * max(scale, 1e-30) if a.numel() else True


# ----------------------------------------------------------------------------------------------------------------------
# The general path: forward-mode JVP
# ----------------------------------------------------------------------------------------------------------------------
class _Closure(nn.Module):
    """Lets torch.func.functional_call run an arbitrary closure over the model."""

    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self):
        return self.fn(self.model)


def _modules_of(param_names) -> list[str]:
    return sorted({n.rsplit(".", 1)[0] if "." in n else "(the model itself)" for n in param_names})


def _jvp_records(model: nn.Module, record_fn, general: dict[str, nn.Parameter], tangents: list[Tensor],
                 why: dict[str, str]) -> Tensor:
    """(d record_losses / d general-path params) . tangents, by one forward-mode pass (score = J G)."""
    names = list(general)
    wrapper = _Closure(model, record_fn)
    primals = tuple(general[n].detach() for n in names)

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
        raise ScoringError(
            f"cannot score parameters of module(s) {_modules_of(names)} exactly: the general (forward-mode JVP) path "
            f"failed: {e}.{_reasons(why, names)} Exclude them with `params=`, or replace the op that lacks "
            "forward-mode AD"
        ) from e
    finally:
        if mha:
            mha.set_fastpath_enabled(fast)
    return out


def _reasons(why: dict[str, str], names) -> str:
    """' They take that path because: ...' for the parameters of `names` that left a fast path."""
    found = sorted({f"'{n.rsplit('.', 1)[0]}' {why[n]}" for n in names if n in why})
    return f" They take that path because: {'; '.join(found)}." if found else ""


def _check_jvp(jv: Tensor, reverse: dict[str, Tensor | None], tangents: dict[str, Tensor],
               why: dict[str, str]) -> None:
    """The JVP path's scores must add up to what reverse mode says: sum_i jv[i(, m)] = <d sum_i l_i / d theta,
    tangent(_m)> (exact identity; reverse mode from a backward the scorer makes anyway). Forward-mode AD does not see
    torch.no_grad() blocks, for one, so a record_loss computing a baseline under no_grad would be scored wrong."""
    cols = jv.reshape(jv.shape[0], -1).double()  # [R, M] (M = 1 for one target)
    got = cols.sum(0)
    expect = torch.zeros_like(got)
    for k, t in tangents.items():
        r = reverse.get(k)
        if r is not None:
            expect += (t.reshape(got.shape[0], -1).double() @ _dense(r).reshape(-1).double())
    scale = torch.maximum(expect.abs(), cols.abs().sum(0)).clamp_min(1e-30)
    if bool(((got - expect).abs() > _rel_tol(jv.dtype) * scale).any()):
        raise ScoringError(
            f"the general (forward-mode JVP) path for module(s) {_modules_of(tangents)} disagrees with reverse mode: "
            f"scores sum to {got.tolist()[:4]} but the gradients give {expect.tolist()[:4]}. Usually a "
            "torch.no_grad() block inside record_loss (forward-mode AD ignores it: compute that value with .detach() "
            "or outside record_loss), randomness in the forward, which the JVP pass draws anew (dropout in training "
            "mode: call model.eval()), or arithmetic in a lower precision than the scores (autocast, or a layer that "
            "computes in float32 inside a float64 model, as some RMSNorm implementations do: score outside autocast, "
            f"in the precision the model computes in).{_reasons(why, tangents)}"
        )


def _dense(t: Tensor) -> Tensor:
    return t.to_dense() if t.is_sparse else t


def _rows_grad(layer: Layer, call: Call, g: Tensor, rows: Tensor, n: int, inputs=None) -> list[Tensor | None]:
    """The gradient of one layer call's selected parameters from the records `rows` only: its output gradient g on
    those rows pulled back through the call (a Linear's is one GEMM over their positions; other kinds run the module's
    own op again on those rows; an affine module is called again on all rows with the other rows' gradient zeroed)."""
    m = layer.module
    if layer.kind == "linear":
        x3, g3 = ghost.positions(call.x, g, n)
        xr, gr = x3[rows].reshape(-1, x3.shape[-1]), g3[rows].reshape(-1, g3.shape[-1])
        gw = (xr.t() @ gr if layer.transposed else gr.t() @ xr) if layer.use_weight else None
        return ([gw] if layer.use_weight else []) + ([gr.sum(0)] if layer.use_bias else [])
    w = m.weight.detach().requires_grad_(layer.use_weight)
    b = m.bias.detach().requires_grad_(layer.use_bias) if isinstance(getattr(m, "bias", None), nn.Parameter) else None
    with torch.enable_grad():
        if layer.kind == "conv":
            y, gy = m._conv_forward(call.x[rows], w, b), g[rows]
        elif layer.kind == "embedding":
            y, gy = F.embedding(call.x[rows], w, m.padding_idx), g[rows]
        else:  # affine: all rows, the others' output gradient zeroed
            mask = torch.zeros(n, dtype=g.dtype, device=g.device)
            mask[rows] = 1
            args, kwargs = inputs
            y = torch.func.functional_call(m, {"weight": w, **({"bias": b} if b is not None else {})}, args, kwargs)
            gy = g * mask.reshape((n,) + (1,) * (g.dim() - 1))
            if call.expanded:  # called on a batch of one, broadcast to the records: the rows' gradients add up
                gy = gy.sum(0, keepdim=True)
        wanted = [t for t, use in ((w, layer.use_weight), (b, layer.use_bias)) if use]
        return list(torch.autograd.grad(y, wanted, gy, allow_unused=True))


# ----------------------------------------------------------------------------------------------------------------------
# One call of fastattr.score
# ----------------------------------------------------------------------------------------------------------------------
class _Job:
    """The state of one score() call: the captured forward, the plan, the losses and the target."""

    def __init__(self, model, plan: _Plan, record_loss, target_loss, *, reduce, units, chunk, dtype,
                 check_locality: bool, process_group, backend: str = "auto"):
        self.model, self.plan = model, plan
        self.record_loss, self.target_loss, self.joint = record_loss, target_loss, target_loss is None
        self.reduce, self.units_arg, self.chunk, self.dtype = reduce, units, chunk, dtype
        self.check_locality, self.pg, self.backend = check_locality, process_group, backend
        self.acc = reference.score_dtype(dtype)

    # ---- the closures -----------------------------------------------------------------------------------------------
    def _split(self, out):  # (record_losses, target) when target_loss is None
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ScoringError(
                f"record_loss must return (record_losses, target) when target_loss is None; got {type(out).__name__}"
            )
        return out

    def _raw_records(self, m):
        return self._split(self.record_loss(m))[0] if self.joint else self.record_loss(m)

    def record_fn(self, m):
        """The record losses as scored: [R] (per-position losses are flattened, or summed per record for record units)."""
        return self._shape_records(self._raw_records(m))

    def _shape_records(self, losses: Tensor) -> Tensor:
        if losses.dim() == 2:
            return losses.sum(1) if self.sum_positions else losses.reshape(-1)
        return losses

    def fresh(self, m):
        """(record losses as scored, target) from a new forward."""
        if self.joint:
            losses, target = self._split(self.record_loss(m))
        else:
            losses, target = self.record_loss(m), self.target_loss(m)
        return self._shape_records(losses), target

    # ---- capture ----------------------------------------------------------------------------------------------------
    def _capture(self, clone: bool, expand_to: int | None = None):
        with _Capture(self.plan.layers, clone, expand_to) as cap:
            if self.joint:
                losses, target = self._split(self.record_loss(self.model))
            else:
                losses = self.record_loss(self.model)
                cap.phase = "target"
                target = self.target_loss(self.model)
        return losses, target, cap.modified()

    def _capture_checked(self, expand_to: int | None = None):
        losses, target, modified = self._capture(False, expand_to)
        if modified:  # an in-place op changed a captured input or output: capture again with copies
            losses, target, _ = self._capture(True, expand_to)
        return losses, target

    def capture(self) -> None:
        """Runs the forward(s) with the layers captured; checks the losses and the target; records broadcast calls."""
        losses, target = self._capture_checked()
        losses, target = _check_records(losses), _check_target(target)
        n = losses.shape[0]
        broadcast = [layer for layer in self.plan.layers
                     if any(c.y.requires_grad and c.batched and c.y.shape[0] == 1 for c in layer.calls)]
        if broadcast and n > 1:
            saved = [(layer.calls, layer.target_calls) for layer in self.plan.layers]
            try:
                losses2, target2 = self._capture_checked(expand_to=n)
            except Exception:  # the model's code needs that dimension to be 1 (e.g. a target on another batch)
                losses2 = target2 = None
            if losses2 is not None and _same(losses, losses2) and _same(target, target2):
                losses, target = losses2, target2
            else:  # the model's result depends on that dimension being 1: use the first forward, general path
                for layer, (calls, tcalls) in zip(self.plan.layers, saved):
                    layer.calls, layer.target_calls = calls, tcalls
                for layer in broadcast:
                    self.plan.to_general(layer, "is called on a batch of one, and expanding it to the records "
                                                "changes the losses or fails")
        self.raw_shape = losses.shape
        self.units = _check_units(self.units_arg, losses.shape, losses.device)
        # Per-position losses with one unit per record are record losses: sum the positions (exact by linearity)
        self.sum_positions = losses.dim() == 2 and self.units is not None and (
            self.units.dim() == 1 or bool((self.units == self.units[:, :1]).all()))
        if self.sum_positions and self.units.dim() == 2:
            self.units = self.units[:, 0]
        self.losses, self.target = self._shape_records(losses), target
        self.n = losses.shape[0]  # records (rows of every activation)

    # ---- routing: which layers keep their fast path ----------------------------------------------------------------
    def route(self) -> None:
        """Sends to the general path every layer whose fast path would not be exact for this call (see the module
        docstring: per-position losses, calls that are not one row per record, uses outside the module)."""
        plan, n = self.plan, self.n
        if self.losses.shape[0] != n:  # per-position losses: a row of an activation serves several losses
            for layer in list(plan.layers):
                plan.to_general(layer, "feeds per-position losses (scored per position by the general path)")
        for layer in list(plan.layers):
            live = [c for c in layer.calls if c.y.requires_grad]
            bad = next((c for c in live if not _one_row_per_record(layer, c, n)), None)
            if bad is not None:
                shape = tuple(bad.x.shape)
                plan.to_general(layer, f"is called on an input of shape {shape}, whose leading dimension is not the "
                                       f"N={n} records")
        for layer in [x for x in plan.layers if isinstance(x, affine.AffineLayer)]:
            reasons = [affine.why_not_affine(layer, c, inputs) for c, inputs in zip(layer.calls, layer.inputs)]
            why = next((w for w in reasons if w), None)
            if why:
                plan.to_general(layer, why)
        for param in _used_outside([self.losses], plan.layers, "records").values():
            layer = next(x for x in plan.layers if any(p is param for p in x.params()))
            plan.to_general(layer, "has a parameter used outside the module's own calls (e.g. "
                                   "F.linear(x, module.weight), a regulariser, or a forward hook)", only=param)

    def output_grads(self, general_reverse: bool = True, all_params: bool = False):
        """Per layer, per call: d(sum of record losses)/d(output) (None where nothing depends on a call), after the
        row-locality check (layers that fail it go to the general path), and the reverse-mode gradients of the
        general-path parameters ({name: grad}) for the JVP cross-check. With all_params, the same backward also gives
        the gradient of the summed losses for every selected parameter, kept in `self.loss_grads`."""
        plan = self.plan
        general = plan.general if general_reverse else {}
        ys = [c.y for layer in plan.layers for c in layer.calls if c.y.requires_grad]
        wrt = plan.params if all_params else general
        inputs = ys + list(wrt.values())
        grads = list(torch.autograd.grad(self.losses.sum(), inputs, allow_unused=True, retain_graph=True)) \
            if inputs else []
        out = {id(layer): [grads.pop(0) if c.y.requires_grad else None for c in layer.calls] for layer in plan.layers}
        got = {k: (_dense(g) if g is not None else None) for k, g in zip(wrt, grads)}
        if all_params:
            self.loss_grads = got
        reverse = {k: got[k] for k in general}
        units = self.units
        n_units = self.losses.shape[0] if units is None else (int(units.max()) + 1 if units.numel() else 0)
        pairs = [(layer, c, g) for layer in plan.layers for c, g in zip(layer.calls, out[id(layer)]) if g is not None]
        self.locality = "not needed"
        if self.check_locality and n_units > 1 and pairs:
            # the graph proves it for the usual losses; else one backward under record weights decides
            self.locality = "proven by the graph" if _rows_local_by_structure(self.losses, [c for _, c, _ in pairs]) \
                else "checked numerically"
        if self.locality == "checked numerically":
            weights = _record_weights(self.losses.shape[0], units, self.losses.dtype, self.losses.device)
            bad = _mixing(self.losses, pairs, weights) if pairs else {}
            for layer, row in bad.values():
                plan.to_general(layer, f"mixes records: the losses of other records depend on row {row} of its output "
                                       "(a loss normalised over the batch, a target taken from another row, or batch "
                                       "statistics computed in forward)")
            if bad and general_reverse:
                missing = {k: p for k, p in plan.general.items() if k not in reverse}
                if all_params:
                    reverse.update({k: self.loss_grads[k] for k in missing})
                else:
                    got = torch.autograd.grad(self.losses.sum(), list(missing.values()), allow_unused=True,
                                              retain_graph=True)
                    reverse.update(zip(missing, got))
        return {id(layer): out[id(layer)] for layer in plan.layers}, reverse

    # ---- the target gradient ----------------------------------------------------------------------------------------
    def target_grads(self, target: Tensor) -> dict[str, Tensor | None]:
        """{name: grad of the (aggregated) target} for every selected parameter; summed over ranks with a
        process group (None where no rank's target depends on the parameter)."""
        names = list(self.plan.params)
        grads = torch.autograd.grad(target, [self.plan.params[k] for k in names], allow_unused=True, retain_graph=True)
        G = {k: (_dense(g) if g is not None else None) for k, g in zip(names, grads)}
        if self.pg is not None:
            G = _all_reduce(G, self.plan.params, self.pg)
        return G

    def _layer_scores(self, layer: Layer, grads: list, G: dict, rows: int) -> Tensor:
        """[R]: one layer's <grad l_i, G> over its record calls, by its identity."""
        if isinstance(layer, affine.AffineLayer):
            return affine.aggregated(layer, grads, G, rows, self.dtype)
        return ghost.aggregated(layer, grads, G, rows, self.dtype, self.chunk, self.backend)

    # ---- one aggregated target --------------------------------------------------------------------------------------
    def loss_multiple(self, target: Tensor) -> float | None:
        """s when the target is s times the sum of the record losses as scored, read off the autograd graph
        (losses.sum(): 1, losses.mean(): 1/N; the joint form, one process): then the records' backward to the layer
        outputs also gives the target gradient, and the target needs no backward of its own."""
        fn, losses = target.grad_fn, self.losses
        if not self.joint or self.pg is not None or target.dim() != 0 or losses.dim() != 1 or fn is None:
            return None
        if fn.name() not in ("SumBackward0", "MeanBackward0") or fn.next_functions[0][0] is not losses.grad_fn:
            return None
        return 1.0 if fn.name() == "SumBackward0" else 1.0 / max(losses.shape[0], 1)

    def aggregated(self, target: Tensor) -> Tensor:
        plan = self.plan
        multiple = self.loss_multiple(target)
        if multiple is None:
            G = self.target_grads(target)
        else:
            grads, reverse = self.output_grads(all_params=True)
            G = {k: (g * multiple if g is not None else None) for k, g in self.loss_grads.items()}
        if all(g is None for g in G.values()):
            raise ScoringError("target_loss does not depend on any selected parameter; check `params`")
        if multiple is None:
            grads, reverse = self.output_grads()
        self.grads = grads
        rows = self.losses.shape[0]
        total = torch.zeros(rows, dtype=self.acc, device=self.losses.device)
        for layer in plan.layers:
            Gl = {}
            if layer.use_weight and G[plan.name_of(layer.module.weight)] is not None:
                Gl["weight"] = G[plan.name_of(layer.module.weight)]
            if layer.use_bias and G[plan.name_of(layer.module.bias)] is not None:
                Gl["bias"] = G[plan.name_of(layer.module.bias)]
            total += self._layer_scores(layer, grads[id(layer)], Gl, rows)
        general = {k: p for k, p in plan.general.items() if G[k] is not None}
        if general and rows > 0:
            jv = _jvp_records(self.model, self.record_fn, general, [G[k].detach() for k in general], plan.why)
            jv = jv.detach().reshape(rows)
            _check_jvp(jv, reverse, {k: G[k].detach() for k in general}, plan.why)
            total += jv.to(total.dtype)
        return total

    # ---- the gradient of a subset of the records (score_and_backward) ---------------------------------------------
    def kept_grads(self, keep: Tensor) -> dict[str, Tensor | None]:
        """{name: gradient of the kept records' summed losses}, after `aggregated` on the summed-losses target: the
        whole batch's gradient minus, layer by layer, the dropped rows' part from their captured inputs and output
        gradients (the fast paths' assumptions, checked for this call, make that part exact); the general path's
        parameters by one backward of the kept losses."""
        plan, drop = self.plan, (~keep).nonzero().squeeze(1)
        out = {k: (g.clone() if g is not None else None) for k, g in self.loss_grads.items()}
        if drop.numel():
            for layer in plan.layers:
                for i, call in enumerate(layer.calls):
                    g = self.grads[id(layer)][i]
                    if g is None:
                        continue
                    inputs = layer.inputs[i] if isinstance(layer, affine.AffineLayer) else None
                    parts = _rows_grad(layer, call, g, drop, self.losses.shape[0], inputs)
                    for param, part in zip(layer.params(), parts):
                        name = plan.name_of(param)
                        if part is not None and out[name] is not None:
                            out[name] -= part.to(out[name].dtype)
        general = plan.general
        if general and drop.numel():
            w = keep.to(self.losses.dtype)
            got = torch.autograd.grad((self.losses * w).sum(), list(general.values()), allow_unused=True,
                                      retain_graph=True)
            out.update({k: (_dense(g) if g is not None else None) for k, g in zip(general, got)})
        return out

    # ---- M targets ----------------------------------------------------------------------------------------------
    def per_target_grads(self, params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
        """{name: [M, *p.shape]} gradients of each target entry, one batched backward (a loop if that cannot run);
        summed over ranks with a process group."""
        target, names = self.target, list(params)
        m_targets = target.shape[0]
        ps = [params[k] for k in names]
        eye = torch.eye(m_targets, dtype=target.dtype, device=target.device)
        try:
            grads = torch.autograd.grad(target, ps, grad_outputs=eye, is_grads_batched=True, retain_graph=True,
                                        allow_unused=True)
        except RuntimeError:
            rows = [torch.autograd.grad(target[i], ps, retain_graph=True, allow_unused=True) for i in range(m_targets)]
            grads = [torch.stack([_dense(r[j]) if r[j] is not None else torch.zeros_like(ps[j]) for r in rows])
                     for j in range(len(ps))]
        out = {k: (_dense(g) if g is not None else torch.zeros((m_targets,) + p.shape, dtype=p.dtype,
                                                                 device=p.device))
               for k, g, p in zip(names, grads, ps)}
        if self.pg is not None:
            out = _all_reduce(out, params, self.pg)
        return out

    def jvp_columns(self, general: dict[str, nn.Parameter], reverse: dict, Gm: dict[str, Tensor] | None = None) \
            -> Tensor:
        """[R, M]: column m = (d record_losses / d general-path params) . grad t_m, cross-checked against reverse mode. Gm: the
        per-target gradients when already formed."""
        Gm = Gm if Gm is not None else self.per_target_grads(general)
        tangents = [Gm[k].detach() for k in general]
        cols = [_jvp_records(self.model, self.record_fn, general, [g[i] for g in tangents], self.plan.why).detach()
                .reshape(-1) for i in range(self.target.shape[0])]
        jv = torch.stack(cols, 1)
        _check_jvp(jv, reverse, dict(zip(general, tangents)), self.plan.why)
        return jv

    def pairwise(self, reduce: str) -> Tensor:
        plan, target = self.plan, self.target
        m_targets, rows = target.shape[0], self.losses.shape[0]
        for layer in list(plan.layers):
            if (isinstance(layer, affine.AffineLayer) or not ghost.has_gram_form(layer.module)) and self.pg is None:
                plan.to_general(layer, "has no pairwise (Gram) form (Conv3d, a grouped conv, or an affine layer)")
        held = [p for layer in plan.layers for p in layer.params()]
        for p in {id(q): q for q in held if sum(q is r for r in held) > 1}.values():  # the Gram of a sum is not
            layer = next(x for x in plan.layers if any(q is p for q in x.params()))  # the sum of the Grams
            plan.to_general(layer, "is shared with another module (tied weights), which the Gram form cannot split",
                            only=p)
        grads, reverse = self.output_grads()
        gram = self.pg is None and plan.layers and self._one_row_per_target()
        if not gram:
            return self._per_target(grads, reverse, reduce)
        t_grads = self._target_output_grads()
        xa, ga, xb, gb, embeddings = [], [], [], [], []
        for layer in plan.layers:
            rg, tg = grads[id(layer)], t_grads[id(layer)]
            if layer.kind == "embedding":
                embeddings.append((layer, rg, tg))
                continue
            a = ghost.sides(layer, layer.calls, rg, rows)
            b = ghost.sides(layer, layer.target_calls if not self.joint else layer.calls, tg, m_targets)
            if a is None or b is None:
                continue
            (x_a, g_a), (x_b, g_b) = a, b
            t, s = x_a.shape[1], x_b.shape[1]
            d_in, d_out = x_a.shape[-1], g_a.shape[-1]
            if t * s * (d_in + d_out) > d_in * d_out:  # T^2 rule: materialising this layer is cheaper
                x_a, g_a = ghost.materialise(x_a, g_a, self.chunk), torch.ones(rows, 1, dtype=x_a.dtype,
                                                                                device=x_a.device)
                x_b, g_b = ghost.materialise(x_b, g_b, self.chunk), torch.ones(m_targets, 1, dtype=x_b.dtype,
                                                                                device=x_b.device)
            xa.append(x_a.to(self.dtype)), ga.append(g_a.to(self.dtype))
            xb.append(x_b.to(self.dtype)), gb.append(g_b.to(self.dtype))
        general = plan.general
        extra_needed = bool(embeddings) or bool(general)
        op_reduce = "none" if extra_needed else reduce
        result = torch.zeros((rows, m_targets) if op_reduce == "none" else (rows,), dtype=self.acc,
                             device=self.losses.device)
        if xa and rows > 0:
            for s in range(0, rows, self.chunk):
                with for_kernels():
                    result[s:s + self.chunk] = ops.grad_sim_reduce(
                        [x[s:s + self.chunk] for x in xa], [g[s:s + self.chunk] for g in ga], xb, gb, op_reduce,
                        backend=self.backend)
        elif op_reduce != "none" and rows > 0:
            result = reference.reduce_sim(torch.zeros(rows, m_targets, dtype=self.acc, device=result.device), reduce)
        for layer, rg, tg in embeddings:
            tlayer = layer if not self.joint else Layer(layer.name, layer.module, layer.use_weight, layer.use_bias,
                                                        layer.calls, layer.calls)
            result += ghost.embedding_pairwise(tlayer, rg, tg, rows, m_targets, self.dtype, self.chunk).to(self.acc)
        if general and rows > 0:
            result += self.jvp_columns(general, reverse).to(self.acc)
        if extra_needed:
            result = reference.reduce_sim(result, reduce)
        return result

    def _target_calls(self, layer: Layer) -> list[Call]:
        return layer.calls if self.joint else layer.target_calls

    def _target_output_grads(self) -> dict[int, list]:
        ys = [c.y for layer in self.plan.layers for c in self._target_calls(layer) if c.y.requires_grad]
        grads = list(torch.autograd.grad(self.target.sum(), ys, allow_unused=True, retain_graph=True)) if ys else []
        return {id(layer): [grads.pop(0) if c.y.requires_grad else None for c in self._target_calls(layer)]
                for layer in self.plan.layers}

    def _one_row_per_target(self) -> bool:
        """Whether target m depends on row m of every scored call only, through the layers' own calls, as the Gram
        path assumes (e.g. M log-probs of M probe states). Equal row counts are not enough (a target may mix rows).
        Exactly: each target's gradient on every row, one batched backward, must be zero off its own row (autograd
        gives exact zeros where there is no dependence); when that [M, M, ...] tensor would be too large, a random
        combination w . target must give each row w_row times the output gradient of sum(target), up to rounding."""
        target, m_targets = self.target, self.target.shape[0]
        layers = self.plan.layers
        calls = [c for layer in layers for c in self._target_calls(layer) if c.y.requires_grad]
        if any(not c.batched or c.y.shape[0] != m_targets for c in calls):
            return False
        if self.joint and m_targets != self.losses.shape[0]:
            return False
        side = "records" if self.joint else "target"
        if _used_outside([target], layers, side):
            return False
        if not calls:
            return True
        ys = [c.y for c in calls]
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
        g1 = torch.autograd.grad(target.sum(), ys, retain_graph=True, allow_unused=True)
        w = torch.rand(m_targets, generator=torch.Generator().manual_seed(0), dtype=torch.float64).add_(1.0)
        w = w.to(dtype=target.dtype, device=target.device)
        gw = torch.autograd.grad(target, ys, grad_outputs=w, retain_graph=True, allow_unused=True)
        for g, h in zip(g1, gw):
            if g is None:
                continue
            expect = g * w.view((-1,) + (1,) * (g.dim() - 1))
            h = torch.zeros_like(g) if h is None else h
            if float((h - expect).abs().max()) > _rel_tol(target.dtype) * max(float(expect.abs().max()), 1e-30):
                return False
        return True

    def _per_target(self, grads: dict, reverse: dict, reduce: str) -> Tensor:
        """Targets the Gram path cannot take: each target's full gradient, contracted per layer."""
        plan, m_targets, rows = self.plan, self.target.shape[0], self.losses.shape[0]
        result = torch.zeros(rows, m_targets, dtype=self.acc, device=self.losses.device)
        # every selected parameter's (the same set on every rank of a process group, whatever each rank's routing)
        Gm = self.per_target_grads(plan.params)
        for layer in plan.layers:
            gw = Gm[plan.name_of(layer.module.weight)] if layer.use_weight else None
            gbias = Gm[plan.name_of(layer.module.bias)] if layer.use_bias else None
            for mi in range(m_targets):
                G = {}
                if gw is not None:
                    G["weight"] = gw[mi]
                if gbias is not None:
                    G["bias"] = gbias[mi]
                result[:, mi] += self._layer_scores(layer, grads[id(layer)], G, rows).to(self.acc)
        if plan.general and rows > 0:
            result += self.jvp_columns(plan.general, reverse, Gm).to(self.acc)
        return reference.reduce_sim(result, reduce)

    # ---- check=True ---------------------------------------------------------------------------------------------
    def verify(self, result: Tensor, reduce: str) -> None:
        """sum_i score_i must equal <grad sum_i l_i, grad target> (exact identity) on a fresh forward without any
        capture: catches a missed contribution. reduce is none, sum or mean here (scores before any units sum)."""
        ps = list(self.plan.params.values())
        with torch.enable_grad():
            out, target = self.fresh(self.model)
            gl = torch.autograd.grad(out.sum(), ps, allow_unused=True, retain_graph=True)
            t = target if target.dim() == 0 else (target.mean() if reduce == "mean" else target.sum())
            gt = torch.autograd.grad(t, ps, allow_unused=True)
        if self.pg is not None:
            gt = list(_all_reduce(dict(zip(self.plan.params, gt)), self.plan.params, self.pg).values())
        expect = sum(float((_dense(a).double() * _dense(b).double()).sum()) for a, b in zip(gl, gt)
                     if a is not None and b is not None)
        got = float(result.double().sum())
        scale = max(abs(expect), float(result.double().abs().sum()), 1e-30)
        if abs(got - expect) > _rel_tol(result.dtype) * scale:
            raise ScoringError(
                f"fastattr.score check failed: sum of scores {got:.6g} != <grad sum l, grad target> {expect:.6g} on a "
                "fresh forward. The model's result differs between forwards (randomness, or code that depends on a "
                "batch dimension of one), or a contribution was missed; please report this with the model"
            )


def _all_reduce(grads: dict[str, Tensor | None], params: dict[str, nn.Parameter], pg) -> dict[str, Tensor | None]:
    """Sums {name: gradient or None} over the ranks of `pg` in one collective (None = zeros, and None again where no
    rank has a gradient). Every rank must pass the same names in the same order."""
    import torch.distributed as dist

    names = list(grads)
    ref = {k: params[k] for k in names}
    shapes = [grads[k].shape if grads[k] is not None else ref[k].shape for k in names]
    device = next(iter(ref.values())).device
    dtype = next((g.dtype for g in grads.values() if g is not None), next(iter(ref.values())).dtype)
    flat = torch.cat([(grads[k] if grads[k] is not None else torch.zeros(s, dtype=dtype, device=device))
                      .reshape(-1).to(dtype) for k, s in zip(names, shapes)]
                     + [torch.tensor([float(grads[k] is not None) for k in names], dtype=dtype, device=device)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=pg)
    used = flat[-len(names):] if names else flat[:0]
    out, start = {}, 0
    for i, (k, s) in enumerate(zip(names, shapes)):
        size = int(torch.Size(s).numel())
        out[k] = flat[start:start + size].reshape(s) if bool(used[i] > 0) else None
        start += size
    return out


def _agree(pg, error: BaseException | None) -> None:
    """With a process group: every rank learns whether any rank failed before a collective, so that one rank's
    ScoringError does not leave the others waiting in an all-reduce."""
    if pg is None:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    flag = torch.tensor([0.0 if error is None else 1.0], device=_pg_device(pg))
    dist.all_reduce(flag, op=dist.ReduceOp.SUM, group=pg)
    if error is not None:
        raise error
    if float(flag) > 0:
        raise ScoringError(f"fastattr.score failed on {int(flag)} other rank(s) of the process group (see their "
                           "error); no rank scored")


def _pg_device(pg) -> torch.device:
    import torch.distributed as dist

    backend = dist.get_backend(pg)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------------
# The public entry points
# ----------------------------------------------------------------------------------------------------------------------
def score(
    model: nn.Module,
    record_loss: Callable[[nn.Module], Tensor],
    target_loss: Callable[[nn.Module], Tensor] | None = None,
    *,
    params=None,
    reduce: str = "none",
    units: Tensor | None = None,
    chunk_size: int = 4096,
    dtype: torch.dtype | None = None,
    check: bool = False,
    check_locality: bool = True,
    deterministic: bool = True,
    process_group=None,
    backend: str = "auto",
) -> Tensor:
    """Exact attribution scores of N records against one or M targets.

    Arguments:
        model: any nn.Module on one device (a DistributedDataParallel model is scored through its .module, which the
            closures then receive).
        record_loss: `record_loss(model) -> Tensor[N]`, the per-record training losses, or `Tensor[N, T]` per
            position (e.g. per token; scores come back per position). A record may span several rows of positions.
        target_loss: `target_loss(model) -> Tensor[]` (one aggregated target) or `Tensor[M]` (M targets). If None,
            `record_loss(model)` must return `(record_losses, target)` from one forward pass (cheapest when both
            share the same inputs, as in PPO).
        params: which parameters to score: None (all requiring grad), a predicate `name -> bool`, or an iterable of
            parameter names, module-name prefixes, Parameters or Modules (e.g. only the actor of an actor-critic).
        reduce: for M targets, 'none' -> [N, M]; 'sum' | 'mean' | 'max' | 'min' -> [N]. Ignored for one target.
        units: an integer index per record ([N]; or per position, [N, T]) into U units (episodes, sequences, groups):
            the scores come back summed per unit, [U] (or [U, M]), U = units.max() + 1. Exact by linearity; records of
            one unit may depend on each other's rows.
        chunk_size: records per block in the kernels and in any per-layer materialisation (bounds extra memory).
        dtype: dtype the contractions run in (e.g. torch.float64 for extra precision); default: the model's.
        check: also verify sum_i score_i against <grad sum_i l_i, grad target> on a fresh forward (one extra forward
            and backward).
        check_locality: check that record losses do not mix rows (one extra backward to the layer outputs) before a
            fast path is trusted. Only turn it off for losses you know to be per-row (e.g. a PPO surrogate of an MLP
            without batch statistics); with it off, a loss that mixes rows is scored wrong.
        deterministic: run the model's forward/backward passes on one intra-op thread, so scores are bit-identical
            whatever torch.get_num_threads() is (BLAS splits long reductions across threads otherwise). fastattr's
            kernels use all threads either way. Set False to let the passes use every thread.
        process_group: a torch.distributed process group: every rank passes its own records, the target gradient is
            the sum over ranks of each rank's target gradient (a global mean target: each rank returns its local sum
            divided by the global record count), and each rank gets its own records' scores. Every rank must call.
        backend: how the fast paths contract: 'auto' (per op, device, dtype and shape, the path measured fastest:
            fastattr.ops.choose), 'kernel' (the compiled kernels; a ScoringError when they are not built), 'eager'
            (GEMMs in eager torch) or 'reference' (fastattr.reference). The scores are the same to rounding.

    Returns:
        Tensor[N] or Tensor[N, M] (per position: [N, T] or [N, T, M]; with units: [U] or [U, M]):
        score[i(, m)] = <grad_theta record_loss_i, grad_theta target(_m)>, summed over the selected parameters.
        float64 when the contractions run in float64, else float32.

    Raises:
        ScoringError when the scores cannot be computed exactly; it names the module or argument and what to do.
    """
    return _score(model, record_loss, target_loss, params=params, reduce=reduce, units=units, chunk_size=chunk_size,
                  dtype=dtype, check=check, check_locality=check_locality, deterministic=deterministic,
                  process_group=process_group, backend=backend)[0]


def score_and_backward(
    model: nn.Module,
    record_loss: Callable[[nn.Module], Tensor],
    keep: Callable[[Tensor], Tensor],
    *,
    params=None,
    dtype: torch.dtype | None = None,
    check_locality: bool = True,
    deterministic: bool = True,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """A filtered training step's backward, scored from its own passes: one forward of the records, one backward.

    Each record is scored against the gradient of the records' summed losses, the direction the unfiltered update
    takes (score_i = <grad l_i, grad sum_j l_j>, what fastattr.score gives for the target `losses.sum()`); `keep`
    chooses the records from the scores; then every selected parameter's `.grad` receives the gradient of the kept
    records' summed losses, as `(losses * keep).sum().backward()` would (added to an existing .grad; parameters left
    out by `params` receive nothing, so select every parameter the optimizer trains). The scores
    need no passes beyond the step's own: the backward that gives the layers' output gradients also gives the
    batch gradient, and the dropped records' part is taken off it layer by layer from their captured rows. The
    checks are fastattr.score's: a parameter whose fast path is not exact for this call takes the general path (its
    scores by one forward-mode pass, its kept gradient by one more backward), or a ScoringError says why not.

    Arguments:
        model, params, dtype, check_locality, deterministic, backend: as fastattr.score.
        record_loss: `record_loss(model) -> Tensor[N]`, one training loss per record (their sum is the step's loss).
        keep: `keep(scores) -> Tensor[N]` of bools, the records the update keeps (e.g. fastattr.filtering.keep_mask).

    Returns:
        (scores [N], keep [N] bool, losses [N] detached).
    """
    if not callable(record_loss):
        raise ScoringError("record_loss must be a callable record_loss(model) -> Tensor[N]")
    if not callable(keep):
        raise ScoringError("keep must be a callable keep(scores) -> Tensor[N] of bools")
    result: dict = {}

    def joint(m):
        losses = record_loss(m)
        if isinstance(losses, Tensor) and losses.dim() != 1:
            raise ScoringError(f"record_loss must return one loss per record, Tensor[N], for score_and_backward; got "
                               f"shape {tuple(losses.shape)} (sum per-position losses over their positions)")
        return losses, losses.sum() if isinstance(losses, Tensor) else losses

    def step(job: _Job, scores: Tensor) -> None:
        mask = keep(scores)
        if not (isinstance(mask, Tensor) and mask.dtype == torch.bool and mask.shape == scores.shape):
            got = (mask.dtype, tuple(mask.shape)) if isinstance(mask, Tensor) else type(mask).__name__
            raise ScoringError(f"keep(scores) must return a bool Tensor of shape {tuple(scores.shape)}, got {got}")
        mask = mask.to(job.losses.device)
        grads = job.kept_grads(mask)
        for name, param in job.plan.params.items():
            g = grads.get(name)
            if g is None:
                continue
            g = g.to(param.dtype)
            param.grad = g.clone() if param.grad is None else param.grad + g
        result.update(keep=mask, losses=job.losses.detach())

    scores, _ = _score(model, joint, None, params=params, dtype=dtype, check_locality=check_locality,
                       deterministic=deterministic, backend=backend, _after=step)
    return scores, result["keep"], result["losses"]


@dataclass
class Explanation:
    """What fastattr.score did: the scores and, per selected parameter, the path that scored it and why."""

    scores: Tensor
    paths: dict[str, str]
    """parameter name -> 'linear' | 'conv' | 'embedding' (a fast path) or 'general: <why it left its fast path>'"""

    def general(self) -> dict[str, str]:
        """The parameters scored by the general (JVP) path, with the reason."""
        return {k: v for k, v in self.paths.items() if v.startswith("general")}


def explain(model: nn.Module, record_loss, target_loss=None, **kwargs) -> Explanation:
    """fastattr.score's scores together with the path each parameter took (same arguments as score)."""
    scores, plan = _score(model, record_loss, target_loss, **kwargs)
    paths = {}
    fast = {id(p): layer.kind for layer in plan.layers for p in layer.params()}
    for name, p in plan.params.items():
        if id(p) in fast:
            paths[name] = fast[id(p)]
        else:
            paths[name] = "general: " + plan.why.get(name, "not a Linear, Conv or Embedding parameter")
    return Explanation(scores, paths)


def _score(model, record_loss, target_loss=None, *, params=None, reduce="none", units=None, chunk_size=4096,
           dtype=None, check=False, check_locality=True, deterministic=True, process_group=None, backend="auto",
           _after=None):
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
    if backend not in ops.BACKENDS:
        raise ScoringError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
    inner, sync = _unwrap(model)
    plan = _plan(inner, params)
    dtype = dtype or next(iter(plan.params.values())).dtype
    if not dtype.is_floating_point:
        raise ScoringError(f"dtype must be a floating-point dtype, got {dtype}")
    device = next(iter(plan.params.values())).device
    missing = [op for op in ("grad_dot", "grad_sim_reduce") if not ops.has_kernel(op, device)]
    if backend == "kernel" and missing:
        raise ScoringError(f"backend='kernel' but no {device.type} kernel for {', '.join(missing)} is built; rebuild "
                           "fastattr (pip install --no-build-isolation -e .) or use backend='auto'")
    job = _Job(inner, plan, record_loss, target_loss, reduce=reduce, units=units, chunk=chunk_size, dtype=dtype,
               check_locality=check_locality, process_group=process_group, backend=backend)
    with pinned(deterministic), _RequireGrad(plan.params.values()), torch.enable_grad(), sync:
        error = None
        try:
            job.capture()
            job.route()
        except ScoringError as e:
            error = e
        _agree(process_group, error)
        target = job.target
        single = target.dim() == 0 or reduce in ("sum", "mean")
        # check=True with max / min: the check needs the [N, M] scores, so reduce after it
        inner_reduce = "none" if check and reduce in ("max", "min") else reduce
        if single:
            agg = target if target.dim() == 0 else (target.sum() if reduce == "sum" else target.mean())
            result = job.aggregated(agg)
            if _after is not None:  # score_and_backward: the kept records' gradient from the same passes
                _after(job, result)
        else:
            result = job.pairwise(inner_reduce)
        if check:
            job.verify(result, inner_reduce)
        if not single and inner_reduce != reduce:
            result = reference.reduce_sim(result, reduce)
        result = _to_units(job, result)
    return result, plan


def _to_units(job: _Job, result: Tensor) -> Tensor:
    """Scores per scored row -> the returned shape: per unit (summed), per position [N, T(, M)], or per record."""
    units = job.units
    if units is None:
        if len(job.raw_shape) == 2 and not job.sum_positions:
            return result.reshape(tuple(job.raw_shape) + tuple(result.shape[1:]))
        return result
    flat = units.reshape(-1)
    n_units = int(flat.max()) + 1 if flat.numel() else 0
    out = torch.zeros((n_units,) + tuple(result.shape[1:]), dtype=result.dtype, device=result.device)
    return out.index_add_(0, flat.to(result.device), result)


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
