"""Wide & Deep (Cheng et al., 2016): a linear wide part beside an MLP over every field.

Wide: the bias slices of the id features (one learned weight per id, FTRL as
in Monolith and in the paper) plus a linear layer over the dense features.
Deep: an MLP over every id feature's vector (sequences: their masked mean)
and the dense features, concatenated. The logit is their sum.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from monolith_torch.embedding.module import HashEmbeddingBagCollection
from monolith_torch.train.models.common import FieldReader, check_widths, mlp
from monolith_torch.train.readers import Batch
from monolith_torch.train.schema import Schema

__all__ = ["WideDeep"]


class WideDeep(nn.Module):
    """Wide & Deep.

    Args:
        schema, embeddings: as every model (see ``train.models``).
        hidden: widths of the deep MLP (default (256, 128)); its output is 1.

    Raises:
        ValueError: bad widths.
    """

    def __init__(self, schema: Schema, embeddings: HashEmbeddingBagCollection, hidden: Sequence[int] = (256, 128)):
        super().__init__()
        hidden = check_widths("hidden", hidden)
        self.embeddings = embeddings
        self.fields = FieldReader(schema, embeddings)
        n_dense = len(schema.dense)
        self.wide_dense = nn.Linear(n_dense, 1) if n_dense else None
        self.deep = mlp([sum(self.fields.dims) + n_dense, *hidden, 1])

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits [B]."""
        vecs, biases = self.fields.read(batch, self.embeddings(batch.sparse))
        deep = self.deep(torch.cat([*vecs, batch.dense], dim=1)).squeeze(-1)
        wide = self.fields.wide(biases, len(batch), deep)
        if self.wide_dense is not None:
            wide = wide + self.wide_dense(batch.dense).squeeze(-1)
        return deep + wide
