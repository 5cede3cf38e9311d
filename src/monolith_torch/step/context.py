"""``NativeContext``: what a model's step needs besides its parameters.

Re-creates Monolith's ``native_task.NativeContext``: the feature factory (or
the fused-layout factory), the async function manager and, new here, the
TensorBoard summary writer that Monolith reached through TF's global summary
collection.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from monolith_torch.embedding.feature import (
    EmbeddingLayoutFactory,
    FeatureFactory,
    FeatureSlot,
    FeatureSlotConfig,
)
from monolith_torch.step.async_functions import AsyncFunctionMgr

__all__ = ["NativeContext"]


class NativeContext:
    """Holds the factories, async manager and summary writer of a training job.

    Args:
        feature_factory: makes slots and applies per-column embedding gradients.
        async_function_mgr: defers dense updates; a synchronous one by default.
        layout_factory: the fused-layout alternative to ``feature_factory``.
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter`` (or any
            object with ``add_scalar``/``add_histogram``); None writes nothing.

    Raises:
        ValueError: both ``feature_factory`` and ``layout_factory`` given.
    """

    def __init__(
        self,
        feature_factory: FeatureFactory | None = None,
        async_function_mgr: AsyncFunctionMgr | None = None,
        layout_factory: EmbeddingLayoutFactory | None = None,
        summary_writer=None,
    ):
        if feature_factory is not None and layout_factory is not None:
            raise ValueError("feature_factory and layout_factory cannot both be set")
        self.feature_factory = feature_factory
        self.layout_factory = layout_factory
        self.async_function_mgr = async_function_mgr or AsyncFunctionMgr(is_async=False)
        self.summary_writer = summary_writer
        # (key, GradientBuckets): the dense gradients' persistent allreduce buffers, made by the step.
        self.gradient_buckets = None

    def _embedding_owner(self):
        owner = self.feature_factory if self.feature_factory is not None else self.layout_factory
        if owner is None:
            raise RuntimeError("this NativeContext has neither a feature_factory nor a layout_factory")
        return owner

    @property
    def has_embeddings(self) -> bool:
        """Whether a feature or layout factory backs this context."""
        return self.feature_factory is not None or self.layout_factory is not None

    def create_feature_slot(self, config: FeatureSlotConfig) -> FeatureSlot:
        """Creates a slot through whichever factory this context holds."""
        return self._embedding_owner().create_feature_slot(config)

    def apply_embedding_gradients(self, grads_and_vars: Iterable[tuple[torch.Tensor, torch.Tensor]], scale=1,
                                  global_step=None):
        """Hands embedding gradients (multiplied by ``scale`` in the update) to the factory.

        ``global_step``: the run's step, which the slices' learning-rate
        functions then see (None: the factory's own count).
        """
        # Empty lists are passed on too: a replicated or sharded store updates
        # collectively, and every rank must take part in every step.
        extra = {} if global_step is None else {"global_step": global_step}
        return self._embedding_owner().apply_gradients(list(grads_and_vars), scale, **extra)

    def add_async_function(self, target, args=None, kwargs=None, is_async=None, queue_name="async_queue", **options):
        """Runs ``target`` now or one step later; see ``AsyncFunctionMgr.add_async_function``."""
        return self.async_function_mgr.add_async_function(target, args, kwargs, is_async, queue_name, **options)
