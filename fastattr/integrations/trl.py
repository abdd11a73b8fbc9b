"""IIF in TRL: `IIFGRPOTrainer`, TRL's GRPOTrainer with a per-generation-batch record filter.

    from fastattr.integrations.trl import IIFGRPOTrainer
    trainer = IIFGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=ds,
                             processing_class=tokenizer, filter="iif", p=0.5)
    trainer.train()
    trainer.last_scores, trainer.last_keep      # the last generation batch's scores and keep-mask, [B_gen]

Each time GRPO generates (`_generate_and_score_completions`: once per `steps_per_generation * num_iterations`
optimizer steps), after TRL has sampled, rewarded and computed the group advantages, at the current parameters:
  1. record = one completion (with its prompt); its loss is its term of TRL's loss at ratio 1,
         l_i = -A_i sum_t c_it log pi(o_it | q_i, o_i,<t),
     A_i TRL's advantage and c_it the per-token weight TRL's `loss_type` gives token t of completion i (0 on padding):
         dapo:    c = steps_per_generation * num_processes / (num_items_in_batch * gradient_accumulation_steps)
         grpo, sapo: c = 1 / (|o_i| * per_device_train_batch_size * gradient_accumulation_steps)
         dr_grpo: c = 1 / (per_device_train_batch_size * max_completion_length * gradient_accumulation_steps)
     (sapo's soft gate has slope 1 at ratio 1, and the importance-sampling level does not change the gradient at
     ratio 1), so the sum of the record losses has the gradient of the loss TRL optimises over the generation batch;
  2. target: `target="batch"`, the generation batch's own return target f = -(1/N) sum_j A_j sum_t log pi(o_jt | ...)
     (fastattr's joint form: one forward), or `target=callable(trainer) -> target_loss(model)`, called once per
     generation batch (fastattr.rlhf.experiment passes the paper's sequence target on D_val with fresh generations);
  3. fastattr.score gives score_i = <grad l_i, grad f> over the trainable parameters (LoRA's A and B for a peft
     model), computed with the forward TRL's loss uses (input_ids and attention_mask, logits / temperature, no
     position ids), in eval mode (dropout off; the random state is not touched);
  4. the filter (fastattr.filtering.keep_mask: iif | iif-all-neg | random | none) keeps records; a dropped record's
     `completion_mask` row is zeroed, so it contributes nothing to any loss while TRL's even split of the batch into
     `steps_per_generation` slices stays intact. TRL's normalisers are left as they are: a kept completion has the
     weight it would have had without the filter, as in the paper, whose PPO used mini-batches of one record.
With filter="none" the batch is unchanged, so training is bit-identical to GRPOTrainer (the scores are still computed).

The fused step (`fused="auto"`, on when it applies): when one optimizer step takes the whole generation batch
(steps_per_generation = 1, gradient_accumulation_steps = 1, num_iterations = 1; one process), the loss is dapo or
dr_grpo (one weight c for every token, so the batch target is the training loss divided by c N), the target is
"batch", and training runs in the parameters' dtype (no bf16/fp16 autocast), without gradient checkpointing and
without dropout, the scores come from the training step's own forward and backward
(fastattr.score_and_backward): the step's backward gives the layers' output gradients and the batch gradient, the
records are scored and filtered, and the dropped records' part is taken off the gradient layer by layer before the
optimizer step. Same scores, same kept records (for iif), the same update to rounding, without the separate scoring
passes. TRL's loss then is not computed (its gradient at ratio 1 is the kept records' record losses'), so its
clip-ratio and entropy logs are not written. `fused=False` keeps the separate scoring; `fused=True` raises when the
fused step does not apply, naming why.
The scores, the keep-mask, the records and the seconds spent land in `last_scores`, `last_keep`, `last_records`,
`last_seconds`, and TRL's logs get `attribution/kept_fraction` and `attribution/seconds`.

Supported: loss_type dapo (TRL's default), grpo, dr_grpo, sapo; beta = 0 (TRL's default; the KL term is not in the
record loss yet); no entropy bonus, entropy masking or off-policy masking; no vLLM. Others are refused at construction.
"""
from __future__ import annotations

import contextlib
import inspect
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from trl import GRPOTrainer

import fastattr
from fastattr import filtering, iif
from fastattr.rlhf import scores as rlhf_scores
from fastattr.rlhf.sequences import Sequences

FILTERS = ("iif", "iif-all-neg", "random", "none")
LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "sapo")
_SCORE_KWARGS = tuple(name for name, prm in inspect.signature(fastattr.score).parameters.items()
                      if prm.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("reduce", "units"))
_FUSED_KWARGS = tuple(name for name, prm in inspect.signature(fastattr.score_and_backward).parameters.items()
                      if prm.kind is inspect.Parameter.KEYWORD_ONLY)


@contextlib.contextmanager
def _without_input_grad_hooks(model: nn.Module):
    """The model without the input-require-grads forward hooks that transformers and peft register for activation
    checkpointing (one more each time TRL re-enables it): `output.requires_grad_()` inside a forward breaks
    forward-mode AD (fastattr's general path)."""
    saved = {}
    for m in model.modules():
        lifted = [k for k, fn in m._forward_hooks.items()
                  if "make_inputs_require_grad" in getattr(fn, "__qualname__", "")]
        if lifted:
            saved[m] = m._forward_hooks.copy()
            for k in lifted:
                del m._forward_hooks[k]
    try:
        yield
    finally:
        for m, hooks in saved.items():
            m._forward_hooks.clear()
            m._forward_hooks.update(hooks)


def _checkpointing(args, model: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on, in the trainer's arguments or the model (transformers 5
    renamed it activation checkpointing; the old names warn)."""
    for obj, names in ((args, ("activation_checkpointing", "gradient_checkpointing")),
                       (model, ("is_activation_checkpointing", "is_gradient_checkpointing"))):
        name = next((n for n in names if hasattr(type(obj), n) or n in vars(obj)), None)
        if name is not None and bool(getattr(obj, name)):
            return True
    return False


_ATTENTION_DROPOUT_KEYS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")


def _dropout(model: nn.Module) -> str | None:
    """The first dropout with a nonzero rate in the model, or None: a dropout module, or an attention dropout rate in
    its config (Llama-style attention passes it to scaled_dot_product_attention, with no module)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"module '{name}' (p={m.p})"
    config = getattr(model, "config", None)
    for k in _ATTENTION_DROPOUT_KEYS:
        v = getattr(config, k, 0.0)
        if isinstance(v, float) and v > 0:
            return f"config.{k}={v}"
    return None


@contextlib.contextmanager
def _plain_forward(model: nn.Module):
    """The model's plain forward while scoring, everything restored afterwards:
      * eval mode: no dropout, and transformers' layers skip activation checkpointing (TRL enables it by default)
        outside training, so no recomputation runs fastattr's capture hooks a second time;
      * without accelerate's mixed-precision wrapper (TRL trains under bf16 autocast by default, also on CPU): the
        scores are those of the loss in the parameters' dtype, and forward-mode AD (fastattr's general path) would not
        agree with reverse mode under autocast;
      * without the input-require-grads forward hooks (_without_input_grad_hooks)."""
    autocast_forward = model.__dict__.get("forward") if "_original_forward" in model.__dict__ else None
    if autocast_forward is not None:
        model.forward = model._original_forward
    model.eval()
    try:
        with _without_input_grad_hooks(model):
            yield
    finally:
        model.train()
        if autocast_forward is not None:
            model.forward = autocast_forward


class IIFGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with IIF's record filter (see the module docstring for the semantics).

    Takes every argument of `trl.GRPOTrainer`, plus:
        filter: iif (drop the bottom p of the negative-score completions) | iif-all-neg (drop every negative-score
            completion) | random (drop as many at random; the control) | none (keep all; scores computed).
        p: the fraction of the negative-score completions iif drops (random drops as many), in (0, 1].
        target: "batch" or a callable `target(trainer) -> target_loss`, `target_loss(model) -> Tensor[]`.
        score_kwargs: keywords for fastattr.score (e.g. {"params": ..., "dtype": torch.float64}).
        fused: "auto" (score from the training step's own passes when that applies; see the module docstring),
            True (the same, and a ValueError naming the reason when it does not apply) or False (separate passes).
    """

    def __init__(self, *args, filter: str = "iif", p: float = 0.5, target: str | Callable = "batch",
                 score_kwargs: dict | None = None, fused: str | bool = "auto", **kwargs):
        iif.check_trainer_args("IIFGRPOTrainer", filter, p, FILTERS, plain="GRPO", records="completions")
        if not (target == "batch" or callable(target)):
            raise ValueError(f"IIFGRPOTrainer: target must be 'batch' or a callable target(trainer) -> "
                             f"target_loss(model), got {target!r}")
        if fused not in ("auto", True, False):
            raise ValueError(f"IIFGRPOTrainer: fused must be 'auto', True or False, got {fused!r}")
        unknown = sorted(set(score_kwargs or {}) - set(_SCORE_KWARGS))
        if unknown:
            raise ValueError(f"IIFGRPOTrainer: score_kwargs {unknown} are not accepted; pass fastattr.score keywords "
                             f"among {', '.join(_SCORE_KWARGS)}")
        self.filter, self.p, self.target = filter, float(p), target
        self.score_kwargs = dict(score_kwargs or {})
        self.last_scores: Tensor | None = None
        self.last_keep: Tensor | None = None
        self.last_records: Sequences | None = None
        self.last_seconds = 0.0
        super().__init__(*args, **kwargs)
        unsupported = {
            f"loss_type={self.loss_type!r} (supported: {', '.join(LOSS_TYPES)})": self.loss_type not in LOSS_TYPES,
            f"beta={self.beta} (the KL term is not in the record loss; use beta=0)": self.beta != 0.0,
            "an entropy bonus (entropy_coef / adaptive entropy)": self._entropy_bonus_enabled,
            "top_entropy_quantile < 1": self.top_entropy_quantile < 1.0,
            "off_policy_mask_threshold": self.off_policy_mask_threshold is not None,
            "use_vllm": self.use_vllm,
        }
        refused = [what for what, bad in unsupported.items() if bad]
        if refused:
            raise ValueError(f"IIFGRPOTrainer does not support {'; '.join(refused)}: the record losses would not "
                             "be the terms of the loss GRPO optimises")
        self.why_not_fused = self._why_not_fused()
        if fused is True and self.why_not_fused:
            raise ValueError(f"IIFGRPOTrainer(fused=True): the fused step does not apply: {self.why_not_fused}; "
                             "pass fused='auto' to fall back to separate scoring passes")
        self.fused = fused is not False and self.why_not_fused is None

    def _why_not_fused(self) -> str | None:
        """None when one training step's own passes can score and filter the whole generation batch (module
        docstring), else the first reason why not."""
        args, model = self.args, self.accelerator.unwrap_model(self.model)
        reasons = {
            f"steps_per_generation={args.steps_per_generation} (one optimizer step must take the whole generation "
            "batch: use 1)": args.steps_per_generation != 1,
            f"gradient_accumulation_steps={args.gradient_accumulation_steps} (use 1)":
                args.gradient_accumulation_steps != 1,
            f"num_iterations={self.num_iterations} (use 1)": self.num_iterations != 1,
            f"{self.accelerator.num_processes} processes (the fused step runs in one)":
                self.accelerator.num_processes != 1,
            f"loss_type={self.loss_type!r} (its token weights differ between completions; dapo or dr_grpo)":
                self.loss_type not in ("dapo", "dr_grpo"),
            "a callable target (the fused step scores against the batch's own target)": self.target != "batch",
            f"mixed precision {self.accelerator.mixed_precision!r} (train in the parameters' dtype: bf16=False, "
            "fp16=False)": self.accelerator.mixed_precision != "no",
            "gradient checkpointing (gradient_checkpointing=False)": _checkpointing(args, model),
        }
        why = next((what for what, bad in reasons.items() if bad), None)
        other = sorted(set(self.score_kwargs) - set(_FUSED_KWARGS) | ({"params"} & set(self.score_kwargs)))
        if why is None and other:
            why = (f"score_kwargs {other} (the fused step's backward trains every trainable parameter, so it scores "
                   f"them all; it takes {', '.join(k for k in _FUSED_KWARGS if k != 'params')})")
        dropout = _dropout(model) if why is None else None
        if dropout:
            why = f"dropout in training mode: {dropout} (set it to 0)"
        return why

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.model.training and not self.fused:
            self._filter(output)
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.fused and model.training and not return_outputs:
            return self._fused_step(model, inputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def _keep(self, values: Tensor) -> Tensor:
        """The filter's keep-mask for scores `values` (every record when it would keep none, with a warning)."""
        method = "ppo" if self.filter == "none" else self.filter
        rng = np.random.default_rng([self.args.seed, self.state.global_step])
        keep = filtering.keep_mask(method, values.detach().float().cpu(), self.p, rng)
        if not keep.any():
            warnings.warn(f"the {self.filter} filter would keep no completions; training on all of them",
                          RuntimeWarning, stacklevel=3)
            keep = torch.ones_like(keep)
        return keep

    def _fused_step(self, model, inputs) -> Tensor:
        """The training step's forward and backward, scored and filtered (fastattr.score_and_backward): each kept
        trainable parameter's .grad gets the kept completions' gradient. Returns the step's loss value (TRL's loss at
        ratio 1 over the kept completions) as a leaf, so the trainer's own backward adds nothing."""
        t0 = time.perf_counter()
        records = Sequences(inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"],
                            inputs["completion_mask"])
        advantages, weights = inputs["advantages"], self.token_weights(inputs)
        mask = inputs["completion_mask"].bool()
        c = float(weights[mask].max()) if mask.any() else 1.0  # the one token weight of dapo / dr_grpo
        n = len(advantages)

        def record_loss(m):
            logp = records.logprobs(m, position_ids=False, temperature=self.temperature)
            return rlhf_scores.record_losses(logp, advantages, weights)

        seen = {}

        def keep(scores):  # the batch target is the loss divided by c N: the scores target="batch" gives
            seen["values"] = scores / (c * n)
            return self._keep(seen["values"]).to(scores.device)

        unwrapped = self.accelerator.unwrap_model(model)
        with _without_input_grad_hooks(unwrapped):
            _, kept, _ = fastattr.score_and_backward(unwrapped, record_loss, keep, **self.score_kwargs)
        kept = kept.cpu()
        self._record(seen["values"], kept, records, t0)
        value = -(advantages.detach().float()[:, None] * weights * kept.to(weights)[:, None]).sum()
        return value.detach().requires_grad_(True)

    def token_weights(self, output: dict) -> Tensor:
        """[B_gen, C] c_it: the weight of each completion token in TRL's loss at ratio 1 (module docstring)."""
        mask = output["completion_mask"].to(torch.float32)
        args, accumulation = self.args, self.current_gradient_accumulation_steps
        if self.loss_type == "dapo":
            items = output["num_items_in_batch"].clamp(min=1.0).float()
            return mask * args.steps_per_generation * self.accelerator.num_processes / (items * accumulation)
        if self.loss_type == "dr_grpo":
            return mask / (args.per_device_train_batch_size * self.max_completion_length * accumulation)
        return mask / (mask.sum(1, keepdim=True).clamp(min=1.0) * args.per_device_train_batch_size * accumulation)

    def _filter(self, output: dict) -> None:
        """Scores the generation batch at the current parameters and zeroes the dropped completions' masks."""
        t0 = time.perf_counter()
        records = Sequences(output["prompt_ids"], output["prompt_mask"], output["completion_ids"],
                            output["completion_mask"])
        target = "batch" if self.target == "batch" else self.target(self)
        model = self.accelerator.unwrap_model(self.model)
        with _plain_forward(model):
            values = rlhf_scores.score(model, records, output["advantages"], target, weights=self.token_weights(output),
                                       position_ids=False, temperature=self.temperature, **self.score_kwargs)
        keep = self._keep(values)
        if not keep.all():
            output["completion_mask"] = output["completion_mask"] * keep.to(output["completion_mask"])[:, None]
        self._record(values, keep, records, t0)

    def _record(self, values: Tensor, keep: Tensor, records: Sequences, t0: float) -> None:
        """Keeps the generation batch's scores, keep-mask and records, and logs the kept fraction and the seconds."""
        self.last_scores, self.last_keep, self.last_records = values.detach().cpu(), keep, records
        self.last_seconds = time.perf_counter() - t0
        self._metrics["train"]["attribution/kept_fraction"].append(float(keep.float().mean()))
        self._metrics["train"]["attribution/seconds"].append(self.last_seconds)

