"""monolith-torch: Monolith's training machinery for recommendation models, on PyTorch.

Public names keep Monolith's spelling (``apply_gradients_with_var_optimizer``,
``GradClipType``, ``NativeContext``, ``FeatureSlot``, ``gen_seq_mask``...); see
docs/MAPPING.md for where each Monolith symbol lives here and
docs/ARCHITECTURE.md for the packages behind them.
"""

from monolith_torch import clip_ops, distribution_ops, embedding_combiners, entry
from monolith_torch.checkpoint import (
    CheckpointError,
    remove_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from monolith_torch.core.hashing import hash_string_ids
from monolith_torch.core.ragged import RaggedTensor
from monolith_torch.distributed.allreduce import AllreduceConfig, allreduce_cond
from monolith_torch.embedding.combiners import FirstN, ReduceMean, ReduceSum
from monolith_torch.embedding.factory import HashTableFeatureFactory
from monolith_torch.embedding.feature import (
    EmbeddingLayoutFactory,
    FeatureColumn,
    FeatureColumnV1,
    FeatureFactory,
    FeatureFactoryFromEmbeddings,
    FeatureSlice,
    FeatureSlot,
    FeatureSlotConfig,
    create_embedding_slices,
)
from monolith_torch.embedding.module import (
    EmbeddingFeatureConfig,
    EmbeddingTableConfig,
    HashEmbeddingBagCollection,
)
from monolith_torch.embedding.placement.sharded import ShardExchangeError
from monolith_torch.embedding.seq_mask import gen_seq_mask
from monolith_torch.embedding.table import EmbeddingTable
from monolith_torch.step.api import apply_gradients, apply_gradients_with_var_optimizer
from monolith_torch.step.async_functions import AsyncFunctionMgr
from monolith_torch.step.context import NativeContext
from monolith_torch.step.types import GradClipType, StepResult

__version__ = "0.1.0"

__all__ = [
    "AllreduceConfig",
    "AsyncFunctionMgr",
    "CheckpointError",
    "EmbeddingTable",
    "EmbeddingFeatureConfig",
    "EmbeddingLayoutFactory",
    "EmbeddingTableConfig",
    "FeatureColumn",
    "FeatureColumnV1",
    "FeatureFactory",
    "FeatureFactoryFromEmbeddings",
    "FeatureSlice",
    "FeatureSlot",
    "FeatureSlotConfig",
    "FirstN",
    "GradClipType",
    "HashEmbeddingBagCollection",
    "HashTableFeatureFactory",
    "NativeContext",
    "RaggedTensor",
    "ShardExchangeError",
    "ReduceMean",
    "ReduceSum",
    "StepResult",
    "allreduce_cond",
    "apply_gradients",
    "apply_gradients_with_var_optimizer",
    "clip_ops",
    "create_embedding_slices",
    "distribution_ops",
    "embedding_combiners",
    "entry",
    "gen_seq_mask",
    "hash_string_ids",
    "remove_checkpoint",
    "restore_checkpoint",
    "save_checkpoint",
]
