"""Types shared by the step functions: the clip modes and the step result."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

__all__ = ["GradClipType", "StepResult"]


class GradClipType(enum.Enum):
    """Monolith's clipping modes."""

    ClipByNorm = 1
    ClipByGlobalNorm = 2
    ClipByValue = 3
    ClipByDenseAndSparse = 4
    NoClip = 5


@dataclass(frozen=True)
class StepResult:
    """What one step did, for the caller to log. Norms and scales are tensors (no host sync).

    Attributes:
        applied: whether parameters were updated (or queued, when async).
        reason: why not, when ``applied`` is False ("no_gradients", "nonfinite").
        global_norm: the norm of dense + sparse gradients (``ClipByGlobalNorm``).
        dense_norm, sparse_norm: the separate norms (``ClipByDenseAndSparse``).
        dense_scale, sparse_scale: the clip factors used (1.0 when not clipping).
        num_dense, num_sparse: how many dense tensors / embedding tensors had gradients.
        allreduced: whether dense gradients were averaged across workers.
        deferred_clip: whether the dense clip was folded into the allreduce buffer.
    """

    applied: bool
    reason: str = ""
    global_norm: torch.Tensor | None = None
    dense_norm: torch.Tensor | None = None
    sparse_norm: torch.Tensor | None = None
    dense_scale: torch.Tensor | float = 1.0
    sparse_scale: torch.Tensor | float = 1.0
    num_dense: int = 0
    num_sparse: int = 0
    allreduced: bool = False
    deferred_clip: bool = False
