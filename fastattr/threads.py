"""Intra-op thread control, so results never depend on the thread count.

BLAS splits long reductions (e.g. a weight gradient summed over N records) across threads, so the same inputs give
bit-different sums with 1 and 2 threads. fastattr runs the model's own forward/backward passes on one thread when
asked for determinism (`pinned`), while its kernels, whose fixed-size blocks make them thread-count independent, get
the caller's threads back (`for_kernels`).
"""
from __future__ import annotations

import torch


class use_threads:
    """Context manager: torch.set_num_threads(n) inside, the previous count restored after (n=None: no change)."""

    def __init__(self, n: int | None = 1):
        self.n = n

    def __enter__(self):
        if self.n is not None:
            self.saved = torch.get_num_threads()
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        if self.n is not None:
            torch.set_num_threads(self.saved)


class pinned:
    """Context manager: the model's passes run on one intra-op thread (when enabled); `for_kernels()` inside it gives
    fastattr's kernels the caller's thread count back."""

    caller: int | None = None

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def __enter__(self):
        if self.enabled:
            self.saved_caller = pinned.caller
            self.saved = torch.get_num_threads()
            pinned.caller = self.saved
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            torch.set_num_threads(self.saved)
            pinned.caller = self.saved_caller


def for_kernels() -> use_threads:
    """Context for fastattr kernels: the caller's thread count while the passes are pinned, else a no-op."""
    return use_threads(pinned.caller)
