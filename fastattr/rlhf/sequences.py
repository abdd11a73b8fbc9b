"""Prompt-completion batches of a causal LM: sampling, masks and per-token log-probabilities.

A batch holds left-padded prompts [N, P] and right-padded completions [N, C]; `completion_mask` is 1 on the tokens a
completion generated, up to and including its end-of-sequence token, and 0 on the padding after it. This is the layout
TRL's GRPOTrainer uses, so the same record losses serve our PPO loop and the TRL adapter.

Log-probabilities are taken through the model's ordinary forward (`model(input_ids, attention_mask, position_ids)`),
so fastattr.score sees every Linear / Embedding call. `position_ids=True` passes padding-aware positions
(cumsum(attention_mask) - 1), the positions `generate` used while sampling; TRL's loss passes none (positions 0..T-1
whatever the padding), and the TRL adapter scores with `position_ids=False` to match it. The two agree when no prompt
is left-padded, which is the case for the task's fixed-length prompts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Sequences:
    """N prompt-completion pairs (all tensors on one device)."""

    prompt_ids: Tensor
    """[N, P] long, left-padded"""
    prompt_mask: Tensor
    """[N, P] long, 1 on prompt tokens"""
    completion_ids: Tensor
    """[N, C] long, right-padded"""
    completion_mask: Tensor
    """[N, C] long, 1 on generated tokens up to and including the first end-of-sequence token"""

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], 1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], 1)

    @property
    def position_ids(self) -> Tensor:
        """Padding-aware positions, as `generate` assigns them: the first real token of each row is position 0."""
        return (self.attention_mask.cumsum(1) - 1).clamp_min(0)

    def lengths(self) -> Tensor:
        """[N] completion lengths in tokens (end-of-sequence included)."""
        return self.completion_mask.sum(1)

    def select(self, index: Tensor) -> Sequences:
        """The pairs at `index` (a long index or a bool mask over N)."""
        return Sequences(self.prompt_ids[index], self.prompt_mask[index], self.completion_ids[index],
                         self.completion_mask[index])

    def logprobs(self, model: nn.Module, *, position_ids: bool = True, temperature: float = 1.0) -> Tensor:
        """[N, C] log pi(y_t | x, y_<t) of every completion token through `model`'s forward; padded positions hold 0.

        The logits are divided by `temperature` (TRL's GRPO loss does the same with its sampling temperature)."""
        n_prompt = self.prompt_ids.shape[1]
        kwargs = {"position_ids": self.position_ids} if position_ids else {}
        logits = model(input_ids=self.input_ids, attention_mask=self.attention_mask, **kwargs).logits
        logits = logits[:, n_prompt - 1:-1] / temperature
        logp = torch.log_softmax(logits, -1).gather(-1, self.completion_ids[..., None]).squeeze(-1)
        return logp * self.completion_mask.to(logp.dtype)


def completion_mask(completion_ids: Tensor, eos_token_id: int) -> Tensor:
    """[N, C] long: 1 up to and including the first `eos_token_id` of each row (the whole row when there is none)."""
    is_eos = completion_ids == eos_token_id
    before = is_eos.long().cumsum(1) - is_eos.long()  # end-of-sequence tokens strictly before position t
    return (before == 0).long()


def pad_rows(rows: list[list[int]], pad_token_id: int, side: str = "left") -> tuple[Tensor, Tensor]:
    """Token lists -> ([N, W] ids, [N, W] mask), padded on `side` ('left' or 'right') to the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cols] = torch.tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


@torch.no_grad()
def sample(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int, seed: int,
           pad_token_id: int, eos_token_id: int, num_samples: int = 1, temperature: float = 1.0) -> Sequences:
    """Samples `num_samples` completions per prompt (pure sampling: no top-k / top-p), rows grouped by prompt.

    The draws come from torch's RNG seeded with `seed` inside `torch.random.fork_rng`, so sampling neither depends on
    nor advances the caller's random state: the same seed gives the same completions wherever it is called."""
    if num_samples > 1:
        prompt_ids = prompt_ids.repeat_interleave(num_samples, 0)
        prompt_mask = prompt_mask.repeat_interleave(num_samples, 0)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[prompt_ids.device] if prompt_ids.is_cuda else []):
            torch.manual_seed(seed)
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, top_k=0,
                                 top_p=1.0, temperature=temperature, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    finally:
        model.train(was_training)
    completion = out[:, prompt_ids.shape[1]:]
    mask = completion_mask(completion, eos_token_id)
    completion = completion.masked_fill(mask == 0, pad_token_id)
    return Sequences(prompt_ids, prompt_mask, completion, mask)
