"""Synchronous data-parallel averaging of dense gradients.

``AllreduceConfig`` (Monolith's environment switches, read by ``from_env``),
``allreduce_cond`` over torch.distributed or Horovod, fp16/bf16 compression and
the aligned flat buffers behind fusion. May import ``monolith_torch.core``.

Modules, each importing only those listed before it:
``flat_buffers`` (aligned flat concat/split, Monolith's ``distribution_ops``),
``config`` (:class:`AllreduceConfig`), ``compression``, ``buckets`` (how fusion
``"one"`` cuts a list), ``torch_backend`` and ``horovod`` (one per engine),
``gradient_buckets`` (:class:`GradientBuckets`: gradients as views into persistent
flat buffers, reduced in place), ``allreduce`` (:func:`allreduce_cond`: checks and
dispatch).
"""

from monolith_torch.distributed.allreduce import allreduce_cond
from monolith_torch.distributed.compression import HalfCompressor, NoneCompressor, compressor_for
from monolith_torch.distributed.config import AllreduceConfig
from monolith_torch.distributed.flat_buffers import (
    aligned_flat_concat,
    aligned_flat_numel,
    aligned_flat_split,
)
from monolith_torch.distributed.gradient_buckets import GradientBuckets

__all__ = [
    "AllreduceConfig",
    "GradientBuckets",
    "HalfCompressor",
    "NoneCompressor",
    "aligned_flat_concat",
    "aligned_flat_numel",
    "aligned_flat_split",
    "allreduce_cond",
    "compressor_for",
]
