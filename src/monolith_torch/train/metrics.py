"""Binary-classification metrics for CTR models: exact AUC, log-loss and a streaming AUC.

A NaN or infinite prediction never raises: the metrics it enters are NaN.
"""

from __future__ import annotations

import torch

__all__ = ["auc", "log_loss", "StreamingAUC"]


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact ROC AUC (Mann-Whitney U with ties averaged). NaN when one class is absent or a score is not finite."""
    scores = scores.detach().double().reshape(-1)
    labels = labels.detach().reshape(-1) > 0.5
    if not bool(torch.isfinite(scores).all()):
        return float("nan")
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    # Average ranks over runs of equal scores.
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg_rank = (ends - (counts.double() - 1) / 2)[inverse]
    ranks = torch.empty_like(avg_rank)
    ranks[order] = avg_rank
    rank_sum = ranks[labels].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def log_loss(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities against 0/1 labels."""
    p = probs.detach().double().reshape(-1).clamp(eps, 1 - eps)
    y = labels.detach().double().reshape(-1)
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


class StreamingAUC:
    """AUC over everything seen so far, from per-bin counts of predicted probabilities.

    Constant memory (``num_bins`` counters per class), one ``bincount`` per
    batch; exact up to ties within a bin of width ``1 / num_bins``.
    """

    def __init__(self, num_bins: int = 2000):
        if num_bins < 2:
            raise ValueError(f"Invalid num_bins: {num_bins!r} (expected >= 2)")
        self.num_bins = num_bins
        self.pos = torch.zeros(num_bins, dtype=torch.float64)
        self.neg = torch.zeros(num_bins, dtype=torch.float64)
        self.nonfinite = 0  # predictions that were NaN or infinite

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """Adds a batch; a NaN probability makes ``result()`` NaN from then on (never an error)."""
        p = probs.detach().reshape(-1).double().cpu()
        finite = torch.isfinite(p)
        if not bool(finite.all()):
            self.nonfinite += int((~finite).sum())
            p = torch.where(finite, p, 0.0)
        bins = (p.clamp(0, 1) * (self.num_bins - 1)).round().long()
        y = labels.detach().reshape(-1).cpu().double()
        self.pos += torch.bincount(bins, weights=y, minlength=self.num_bins)
        self.neg += torch.bincount(bins, weights=1 - y, minlength=self.num_bins)

    def result(self) -> float:
        total_pos, total_neg = self.pos.sum(), self.neg.sum()
        if total_pos == 0 or total_neg == 0 or self.nonfinite:
            return float("nan")
        neg_below = torch.cumsum(self.neg, 0) - self.neg
        # Each positive beats the negatives in lower bins and ties half of its own bin.
        wins = (self.pos * (neg_below + 0.5 * self.neg)).sum()
        return float(wins / (total_pos * total_neg))
