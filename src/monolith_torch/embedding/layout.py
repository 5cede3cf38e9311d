"""Fused layouts over hash tables: named concatenations of feature slices, and their gradients' way back.

``build_layout`` (behind ``HashTableFeatureFactory.lookup_layout``) looks up a
batch and concatenates feature slices into named layouts (e.g. ``"bias"``
[B, slots], ``"vec"`` [B, sum of dims]); ``HashTableLayout`` is the
``LayoutTable`` that backpropagates layout gradients to the per-feature leaves
and hands them to the factory. Re-creates the fused-layout path of Monolith's
``apply_gradients``. May import ``embedding.feature`` and torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from monolith_torch.embedding.feature import EmbeddingLayoutFactory, FeatureColumn, FeatureSlice

__all__ = ["HashTableLayout", "build_layout"]


def _check_layouts(factory, layouts) -> None:
    if not isinstance(layouts, Mapping) or not layouts:
        raise ValueError(f"Invalid layouts: {layouts!r} (expected a non-empty mapping of name -> [(column, slice)])")
    tables = list(factory.tables.values())
    for lname, parts in layouts.items():
        if not parts:
            raise ValueError(f"Invalid layouts[{lname!r}]: empty")
        for part in parts:
            if not (isinstance(part, tuple | list) and len(part) == 2 and isinstance(part[0], FeatureColumn)
                    and isinstance(part[1], FeatureSlice)):
                raise TypeError(f"layouts[{lname!r}] entries must be (FeatureColumn, FeatureSlice), got {part!r}")
            if not any(part[0].feature_slot.table is t for t in tables):
                raise ValueError(f"layouts[{lname!r}]: column {part[0].feature_name!r} is not from this factory")


def build_layout(
    factory,
    features: Mapping[str, object],
    layouts: Mapping[str, Sequence[tuple[FeatureColumn, FeatureSlice]]],
    training: bool = True,
    layout_factory: EmbeddingLayoutFactory | None = None,
) -> EmbeddingLayoutFactory:
    """``HashTableFeatureFactory.lookup_layout``: see there."""
    _check_layouts(factory, layouts)
    if layout_factory is not None and not isinstance(layout_factory.hash_table, HashTableLayout):
        raise TypeError("layout_factory must be one returned by lookup_layout")
    factory.lookup(features, training)
    combined = {}
    for lname in sorted(layouts):
        parts = [fc.embedding_lookup(s) for fc, s in layouts[lname]]
        combined[lname] = torch.cat(parts, dim=-1)
    binding = HashTableLayout(factory, combined, factory.last_batch_leaves())
    embeddings = {name: binding.leaves[name] for name in combined}
    if layout_factory is None:
        return EmbeddingLayoutFactory(binding, embeddings)
    layout_factory.hash_table = binding
    layout_factory.layout_embeddings = embeddings
    return layout_factory


class HashTableLayout:
    """The ``LayoutTable`` of a fused-layout batch: routes layout gradients to rows.

    Holds the combined layout tensors (still attached to the per-feature
    leaves) and hands out detached leaf copies; ``apply_layout_gradients``
    backpropagates layout gradients to the per-feature leaves and passes them
    to ``HashTableFeatureFactory.apply_gradients``.
    """

    # EmbeddingLayoutFactory passes the run's global step on to this store.
    takes_global_step = True

    def __init__(
        self, factory, combined: Mapping[str, torch.Tensor], feature_leaves: list[torch.Tensor]
    ):
        self.factory = factory
        self._feature_leaves = list(feature_leaves)
        self._combined = dict(combined)
        self.leaves = {name: t.detach().requires_grad_(True) for name, t in self._combined.items()}
        self._applied = False

    def flatten_layout(self, layout_embeddings: Mapping[str, object]) -> list[torch.Tensor]:
        """The layout tensors in sorted-name order (lists flattened in place)."""
        out = []
        for name in sorted(layout_embeddings):
            value = layout_embeddings[name]
            out.extend(value if isinstance(value, list | tuple) else [value])
        return out

    def apply_layout_gradients(self, grads_and_vars, scale=1, global_step=None) -> None:
        """Applies layout gradients (``None`` as zeros) to the rows behind them.

        Raises:
            ValueError: an unknown var, a grad of the wrong shape.
            RuntimeError: this batch's gradients were applied already.
        """
        by_id = {id(leaf): name for name, leaf in self.leaves.items()}
        outputs, grad_outputs = [], []
        for i, (grad, var) in enumerate(grads_and_vars):
            name = by_id.get(id(var))
            if name is None or self.leaves[name] is not var:
                raise ValueError(f"grads_and_vars[{i}]: var of shape {tuple(var.shape)} is not a layout of this batch")
            if grad is not None and grad.shape != var.shape:
                raise ValueError(
                    f"grads_and_vars[{i}]: grad shape {tuple(grad.shape)} does not match layout {name!r} "
                    f"shape {tuple(var.shape)}"
                )
            outputs.append(self._combined[name])
            grad_outputs.append(torch.zeros_like(var) if grad is None else grad.detach())
        if self._applied:
            raise RuntimeError("the gradients of this layout batch were applied already; look up a new batch")
        leaves = self._feature_leaves
        pairs = []
        if outputs:
            grads = torch.autograd.grad(outputs, leaves, grad_outputs, allow_unused=True)
            pairs = [(g, leaf) for g, leaf in zip(grads, leaves, strict=True) if g is not None]
        self._applied = True
        # Called even with nothing to apply: replicated and sharded tables update collectively.
        self.factory.apply_gradients(pairs, scale, global_step=global_step)
