"""fastattr: exact, fast local data attribution for online RL and any PyTorch model.

    scores = fastattr.score(model, record_loss, target_loss)   # Tensor[N] (or [N, M])
    scores, keep, losses = fastattr.score_and_backward(model, record_loss, keep)   # inside a training step
"""
import torch  # noqa: F401  (torch must be loaded before the extension)

from . import ops, reference
from .ops import cuda_version, has_kernel

__version__ = "0.1.0"


def _check_cuda_build() -> None:
    built = ops.cuda_version()
    if built == -1 or torch.version.cuda is None:
        return
    built_major = built // 1000
    torch_major = int(torch.version.cuda.split(".")[0])
    if built_major != torch_major:
        raise RuntimeError(
            f"fastattr was built against CUDA {built_major}.x but torch uses CUDA {torch.version.cuda}; rebuild "
            "with `pip install --no-build-isolation -e .` against this torch."
        )


_check_cuda_build()

from .scoring import Explanation, ScoringError, explain, score, score_and_backward, select, topk  # noqa: E402

__all__ = ["score", "score_and_backward", "explain", "Explanation", "topk", "select", "ScoringError", "ops",
           "reference", "cuda_version", "has_kernel"]
