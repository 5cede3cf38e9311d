"""TensorBoard summaries of a training step, with Monolith's tags.

Writes through any object with ``add_scalar(tag, value, step)`` and
``add_histogram(tag, values, step)`` (a ``torch.utils.tensorboard.SummaryWriter``).
Writing forces host syncs, so it only happens when the caller asks for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["write_norm_summaries", "write_gradient_summaries"]


def _tag_name(name: str) -> str:
    # Monolith replaces ':' of TF variable names; '/' keeps TensorBoard's grouping.
    return name.replace(":", "_")


def write_norm_summaries(writer, step: int, norms: dict[str, torch.Tensor | None]) -> None:
    """Writes the global norms (``global_gradient_norm``, ``.../dense``, ``.../sparse``) that were computed."""
    for tag, value in norms.items():
        if value is not None:
            writer.add_scalar(tag, float(value), step)


def write_gradient_summaries(
    writer,
    step: int,
    dense_names: Sequence[str],
    dense_params: Sequence[torch.Tensor],
    dense_grads: Sequence[torch.Tensor],
    feature_names: Sequence[str],
    sparse_grads: Sequence[torch.Tensor],
) -> None:
    """Monolith's ``grads_and_vars_summary``: per-variable norms and histograms.

    Tags: ``variable_gradient``, ``trainable_variable_norm/<name>``,
    ``trainable_variable/<name>``, ``gradient_norm/<name>``, ``gradient/<name>``,
    ``dense_grad_sizes``, ``dense_grad_total_size``, ``dense_grad_total_num`` and
    ``<feature_name>_gradient``.
    """
    if dense_grads:
        flat = torch.cat([g.detach().reshape(-1).float().cpu() for g in dense_grads])
        writer.add_histogram("variable_gradient", flat, step)
        param_norms = torch.stack(torch._foreach_norm([p.detach() for p in dense_params])).cpu().tolist()
        grad_norms = torch.stack(torch._foreach_norm([g.detach() for g in dense_grads])).cpu().tolist()
        for name, param, grad, pn, gn in zip(dense_names, dense_params, dense_grads, param_norms, grad_norms, strict=True):
            tag = _tag_name(name)
            writer.add_scalar(f"trainable_variable_norm/{tag}", pn, step)
            writer.add_histogram(f"trainable_variable/{tag}", param.detach().float().cpu(), step)
            writer.add_scalar(f"gradient_norm/{tag}", gn, step)
            writer.add_histogram(f"gradient/{tag}", grad.detach().float().cpu(), step)
        sizes = torch.tensor([g.numel() for g in dense_grads], dtype=torch.float64)
        writer.add_histogram("dense_grad_sizes", sizes, step)
        writer.add_scalar("dense_grad_total_size", int(sizes.sum().item()), step)
        writer.add_scalar("dense_grad_total_num", len(dense_grads), step)
    for name, grad in zip(feature_names, sparse_grads, strict=True):
        writer.add_histogram(f"{_tag_name(name)}_gradient", grad.detach().float().cpu(), step)
