"""DeepFM (Guo et al., 2017) over hash-table embeddings: the default run's model.

Fields: a bottom MLP maps the dense features to one D-wide field; each id
feature is one field (its vector slice; a sequence is the masked mean of
its first ``max_seq_length`` rows). The logit is the sum of

- the wide part: every bias slice (FTRL-trained, Monolith's default),
- the FM second-order term over the fields, ``0.5 * ((sum f)^2 - sum f^2)``,
- a top MLP over all fields concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from monolith_torch.embedding.module import HashEmbeddingBagCollection
from monolith_torch.train.models.common import FieldReader, check_widths, mlp
from monolith_torch.train.readers import Batch
from monolith_torch.train.schema import Schema

__all__ = ["DeepFM"]


class DeepFM(nn.Module):
    """DeepFM; with ``criteo_schema()`` the default run's model (bit for bit the former ``CtrModel``).

    Args:
        schema: the input schema; every id feature's table needs the same vector width D.
        embeddings: the module built from ``schema.embedding_configs()``.
        hidden: widths of the top MLP (default (256, 128)); its output is 1.
        bottom_hidden: widths of the dense bottom MLP before its D-wide output (default (64,)).

    Raises:
        ValueError: tables of different widths (FM pairs every two fields), bad widths.
    """

    def __init__(self, schema: Schema, embeddings: HashEmbeddingBagCollection,
                 hidden: Sequence[int] = (256, 128), bottom_hidden: Sequence[int] = (64,)):
        super().__init__()
        hidden = check_widths("hidden", hidden)
        bottom_hidden = check_widths("bottom_hidden", bottom_hidden)
        self.embeddings = embeddings
        self.fields = FieldReader(schema, embeddings)
        dim = self.fields.common_dim("DeepFM", "FM pairs every two fields")
        n_dense = len(schema.dense)
        self.bottom = mlp([n_dense, *bottom_hidden, dim]) if n_dense else None
        num_fields = len(self.fields.names) + (1 if n_dense else 0)
        self.top = mlp([num_fields * dim, *hidden, 1])

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits [B]."""
        vecs, biases = self.fields.read(batch, self.embeddings(batch.sparse))
        fields = ([self.bottom(batch.dense)] if self.bottom is not None else []) + vecs
        stacked = torch.stack(fields, dim=1)  # [B, F, D]
        fm = 0.5 * (stacked.sum(1).pow(2) - stacked.pow(2).sum(1)).sum(-1)
        deep = self.top(stacked.flatten(1)).squeeze(-1)
        return deep + fm + self.fields.wide(biases, len(batch), deep)
