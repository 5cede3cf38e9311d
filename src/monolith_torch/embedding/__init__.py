"""Embeddings: feature slots and columns, collisionless hash tables, and where their rows live.

Entry configs (``entry``), combiners, ragged ids and sequence masks, the
feature API (slots, slices, columns, factories), the hash index and its
kernels, the table, its slice optimizers and initializers, and the placements
(local, replicated, sharded) behind ``HashTableFeatureFactory``. May import
``monolith_torch.core`` and ``monolith_torch.distributed``.
"""

from monolith_torch.embedding.factory import HashTableFeatureFactory
from monolith_torch.embedding.module import (
    EmbeddingFeatureConfig,
    EmbeddingTableConfig,
    HashEmbeddingBagCollection,
)
from monolith_torch.embedding.table import EmbeddingTable

__all__ = [
    "EmbeddingFeatureConfig",
    "EmbeddingTable",
    "EmbeddingTableConfig",
    "HashEmbeddingBagCollection",
    "HashTableFeatureFactory",
]
