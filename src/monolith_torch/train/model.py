"""The default CTR model: DeepFM/DLRM-style over hash-table embeddings.

Per categorical feature one slot with a bias slice (FTRL, Monolith's default)
and a vector slice (Adagrad); one sequence feature read with ``FirstN`` and
masked with ``gen_seq_mask``; the 13 integer features through a small bottom
MLP. The logit is the sum of the wide part (biases), an FM second-order term
and a top MLP over all embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from monolith_torch.embedding import entry
from monolith_torch.embedding.combiners import FirstN
from monolith_torch.embedding.feature import FeatureColumn, FeatureSlotConfig
from monolith_torch.embedding.seq_mask import gen_seq_mask
from monolith_torch.step.context import NativeContext
from monolith_torch.train.data import CAT_COLUMNS, NUM_INT, SEQ_FEATURE, Batch

__all__ = ["CtrModel"]


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class CtrModel(nn.Module):
    """DeepFM-style model; its embeddings live in ``ctx.feature_factory``'s tables.

    Args:
        ctx: a context whose factory is a ``HashTableFeatureFactory``.
        emb_dim: width D of each vector slice.
        seq_len: L, how many ids of the sequence feature are read.
        hidden: widths of the top MLP.
        vec_optimizer, bias_optimizer: the slices' optimizer configs.
    """

    def __init__(
        self,
        ctx: NativeContext,
        emb_dim: int = 16,
        seq_len: int = 8,
        hidden: Sequence[int] = (256, 128),
        vec_optimizer: entry.Optimizer | None = None,
        bias_optimizer: entry.Optimizer | None = None,
    ):
        super().__init__()
        self.ctx = ctx
        self.emb_dim = emb_dim
        self.seq_len = seq_len
        self.feature_names = [*CAT_COLUMNS, SEQ_FEATURE]
        self.columns: list[FeatureColumn] = []
        self._vec_slices = []
        self._bias_slices = []
        vec_optimizer = vec_optimizer or entry.AdagradOptimizer(learning_rate=0.05, initial_accumulator_value=1.0)
        bias_optimizer = bias_optimizer or entry.FtrlOptimizer(
            learning_rate=0.05, initial_accumulator_value=1e-6, beta=1.0
        )
        for slot_id, name in enumerate(self.feature_names, start=1):
            config = FeatureSlotConfig(
                name=name, slot_id=slot_id, has_bias=True, bias_optimizer=bias_optimizer,
                default_vec_optimizer=vec_optimizer,
                default_vec_initializer=entry.RandomUniformInitializer(-0.05, 0.05),
            )
            slot = ctx.create_feature_slot(config)
            vec = slot.add_feature_slice(emb_dim)
            combiner = FirstN(seq_len) if name == SEQ_FEATURE else None
            self.columns.append(FeatureColumn(slot, name, combiner))
            self._vec_slices.append(vec)
            self._bias_slices.append(slot.get_bias_slice())
        self.bottom = _mlp([NUM_INT, 64, emb_dim])
        num_fields = len(self.feature_names) + 1
        self.top = _mlp([num_fields * emb_dim, *hidden, 1])

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits [B] for a batch whose ids were looked up with ``factory.lookup(batch.sparse)``."""
        fields = [self.bottom(batch.dense)]
        wide = []
        for fc, vec, bias in zip(self.columns, self._vec_slices, self._bias_slices, strict=True):
            emb = fc.embedding_lookup(vec)
            b = fc.embedding_lookup(bias)
            if fc.feature_name == SEQ_FEATURE:
                mask = gen_seq_mask(batch.sparse[SEQ_FEATURE].row_splits, self.seq_len, validate=False)
                mask = mask.to(emb.dtype).unsqueeze(-1)
                denom = mask.sum(1).clamp_min(1.0)
                emb = (emb * mask).sum(1) / denom
                b = (b * mask).sum(1) / denom
            fields.append(emb)
            wide.append(b)
        stacked = torch.stack(fields, dim=1)  # [B, F, D]
        fm = 0.5 * (stacked.sum(1).pow(2) - stacked.pow(2).sum(1)).sum(-1)
        deep = self.top(stacked.flatten(1)).squeeze(-1)
        return deep + fm + torch.cat(wide, dim=1).sum(1)
