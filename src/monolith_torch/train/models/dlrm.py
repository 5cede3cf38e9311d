"""DLRM (Naumov et al., 2019): a bottom MLP for the dense features, pairwise dot interactions, a top MLP.

The bottom MLP maps the dense features to one D-wide vector; with every id
feature's vector (sequences: their masked mean) that makes F vectors whose
F(F-1)/2 pairwise dot products, concatenated with the bottom output, feed
the top MLP. The bias slices add to the logit (the wide part).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from monolith_torch.embedding.module import HashEmbeddingBagCollection
from monolith_torch.train.models.common import FieldReader, check_widths, mlp
from monolith_torch.train.readers import Batch
from monolith_torch.train.schema import Schema

__all__ = ["DLRM"]


class DLRM(nn.Module):
    """DLRM with dot interaction.

    Args:
        schema: the input schema; every id feature's table needs the same vector width D.
        embeddings: the module built from ``schema.embedding_configs()``.
        hidden: widths of the top MLP (default (256, 128)); its output is 1.
        bottom_hidden: widths of the bottom MLP before its D-wide output (default (64,)).

    Raises:
        ValueError: tables of different widths (dot products pair the vectors), bad widths.
    """

    def __init__(self, schema: Schema, embeddings: HashEmbeddingBagCollection,
                 hidden: Sequence[int] = (256, 128), bottom_hidden: Sequence[int] = (64,)):
        super().__init__()
        hidden = check_widths("hidden", hidden)
        bottom_hidden = check_widths("bottom_hidden", bottom_hidden)
        self.embeddings = embeddings
        self.fields = FieldReader(schema, embeddings)
        dim = self.fields.common_dim("DLRM", "dot products pair the vectors")
        n_dense = len(schema.dense)
        # The bottom MLP ends in a ReLU, as DLRM's does.
        self.bottom = mlp([n_dense, *bottom_hidden, dim], final_activation=True) if n_dense else None
        f = len(self.fields.names) + (1 if n_dense else 0)
        rows, cols = torch.tril_indices(f, f, offset=-1)
        self.register_buffer("pair_rows", rows, persistent=False)
        self.register_buffer("pair_cols", cols, persistent=False)
        self.top = mlp([(dim if n_dense else 0) + f * (f - 1) // 2, *hidden, 1])

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits [B]."""
        vecs, biases = self.fields.read(batch, self.embeddings(batch.sparse))
        bottom = [self.bottom(batch.dense)] if self.bottom is not None else []
        z = torch.stack(bottom + vecs, dim=1)  # [B, F, D]
        dots = torch.bmm(z, z.transpose(1, 2))[:, self.pair_rows, self.pair_cols]  # [B, F(F-1)/2]
        logit = self.top(torch.cat([*bottom, dots], dim=1)).squeeze(-1)
        return logit + self.fields.wide(biases, len(batch), logit)
