"""Attribution scores of prompt-generation records against the paper's sequence target, through fastattr.score.

Records and losses (negated objectives, as in fastattr/targets.py, so a positive score means "training on this record
helps the target"):

    record loss   l_i   = -A~_i sum_t w_it log pi(y_it | x_i, y_i,<t)        the PPO / GRPO update of record i, ratio 1
    token loss    l_it  = -A~_i w_it log pi(y_it | x_i, y_i,<t)             (per-token scores; they sum to l_i's)
    target        f_seq = -(1/M) sum_j A_j sum_t log pi(y_jt | x_j, y_j,<t)  x_j in D_val, y_j ~ pi_ref (fresh)

The paper's target is E_{x ~ D_val, y ~ pi_ref}[log pi_theta(y|x) A_last(x, y)], A_last the critic's advantage at the
last token. Here A_j = r_j - mean(r) over the M target generations (the reward minus a baseline; no critic). w_it = 1
on generated tokens (padding masked) for our PPO loop; TRL's adapter passes its loss normalisation as w (see
fastattr/integrations/trl.py). A~ is the advantage as the update uses it.

Three forms of the same scores (`form=`): 'sequence' (record losses summed over tokens, [N]), 'units' (token losses
[N, C] summed per record by fastattr's `units`, [N]) and 'token' ([N, C] per-token scores). All are exact: for any
model fastattr.score either returns <grad l_i, grad f> or raises.

Parameters: LoRA's A and B matrices (`lora`, peft's get_peft_model), as the paper, or every parameter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

import fastattr

from .sequences import Sequences

FORMS = ("sequence", "units", "token")


def lora(model: nn.Module, r: int = 8, alpha: int = 16, target_modules="all-linear"):
    """`model` wrapped by peft with LoRA adapters on every Linear / Conv1D of its blocks (the output head excluded);
    only the adapters require grad. LoRA B starts at zero, so A's gradient is zero until B has moved (the tests
    perturb B first so that both matrices are scored)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules))


def record_losses(logp: Tensor, advantages: Tensor, weights: Tensor | None = None, per_token: bool = False) -> Tensor:
    """l_i = -A~_i sum_t w_it logp_it ([N]), or the token losses -A~_i w_it logp_it ([N, C]) with per_token.
    `logp` [N, C] is zero on padding (Sequences.logprobs)."""
    tokens = -advantages.detach().to(logp.dtype)[:, None] * logp
    if weights is not None:
        tokens = tokens * weights.to(logp.dtype)
    return tokens if per_token else tokens.sum(1)


def sequence_target(logp: Tensor, advantages: Tensor) -> Tensor:
    """f_seq = -(1/M) sum_j A_j sum_t logp_jt, a scalar."""
    return -(advantages.detach().to(logp.dtype) * logp.sum(1)).mean()


@dataclass
class SequenceTarget:
    """The paper's sequence target on a batch of (prompt, generation) pairs with advantages A_j: `target(model)` is
    f_seq(theta) (a scalar loss, through the model's forward)."""

    sequences: Sequences
    advantages: Tensor
    position_ids: bool = True
    temperature: float = 1.0

    def __call__(self, model: nn.Module) -> Tensor:
        logp = self.sequences.logprobs(model, position_ids=self.position_ids, temperature=self.temperature)
        return sequence_target(logp, self.advantages)


def validation_target(task, reference: nn.Module, seed: int, *, position_ids: bool = True) -> SequenceTarget:
    """f_seq on D_val (the task's `val` prompts) with fresh generations y ~ `reference` drawn with `seed` (one per
    prompt) and A_j = r_j - mean(r) under the task's reward. For a peft policy the reference is its base model:
    call this inside `with policy.disable_adapter():` with reference=policy."""
    ids, mask = task.prompt_batch("val")
    seqs = task.sample(reference, ids, mask, seed)
    rewards = task.reward(seqs)
    return SequenceTarget(seqs, rewards - rewards.mean(), position_ids=position_ids)


def score(model: nn.Module, records: Sequences, advantages: Tensor, target, *, form: str = "sequence",
          weights: Tensor | None = None, position_ids: bool = True, temperature: float = 1.0, params=None,
          **score_kwargs) -> Tensor:
    """Scores of the N records against `target`: [N] (form 'sequence' or 'units') or [N, C] (form 'token').

    Arguments:
        model: the policy (a peft model scores its trainable LoRA parameters; a plain one every parameter).
        records: the N prompt-completion pairs.
        advantages: [N] A~_i as the update uses them.
        target: `target(model) -> Tensor[]` (e.g. a SequenceTarget, or `validation_target(...)`), or "batch" for the
            records' own sequence target f = -(1/N) sum_j A~_j sum_t logp_jt, computed from the same forward pass.
        form: 'sequence' | 'units' | 'token' (see the module docstring).
        weights: [N, C] per-token weights w_it of the record losses (default 1 on generated tokens).
        position_ids, temperature: how log-probabilities are taken (Sequences.logprobs).
        params, score_kwargs: passed to fastattr.score (e.g. dtype=torch.float64, check=True).
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    per_token = form != "sequence"
    n, c = records.completion_ids.shape
    if form == "units":
        score_kwargs["units"] = torch.arange(n, device=records.completion_ids.device)[:, None].expand(n, c)

    def logp(m):
        return records.logprobs(m, position_ids=position_ids, temperature=temperature)

    if isinstance(target, str):
        if target != "batch":
            raise ValueError(f"target must be a callable target_loss(model) or 'batch', got {target!r}")

        def joint(m):
            lp = logp(m)
            losses = record_losses(lp, advantages, weights, per_token)
            if weights is None and not per_token:  # f is then the mean of the record losses: fastattr.score reads
                return losses, losses.mean()       # that off the graph and shares their backward
            return losses, sequence_target(lp, advantages)

        return fastattr.score(model, joint, params=params, **score_kwargs)
    return fastattr.score(model, lambda m: record_losses(logp(m), advantages, weights, per_token), target,
                          params=params, **score_kwargs)
