"""DCN-v2 (Wang et al., 2021): a cross network of full- or low-rank cross layers beside or below an MLP.

``x0`` is every id feature's vector (sequences: their masked mean) and the
dense features, concatenated [B, d]. Cross layer ``l``:
``x_{l+1} = x0 * (W_l x_l + b_l) + x_l``, with ``W_l = U_l V_l^T`` when
``low_rank`` > 0. ``structure = "stacked"`` runs the MLP on the cross
network's output; ``"parallel"`` runs both on ``x0`` and concatenates them.
A final linear layer gives the logit, plus the bias slices (the wide part).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from monolith_torch.embedding.module import HashEmbeddingBagCollection
from monolith_torch.train.models.common import FieldReader, check_widths, mlp
from monolith_torch.train.readers import Batch
from monolith_torch.train.schema import Schema

__all__ = ["CrossLayer", "DCNv2"]

_STRUCTURES = ("stacked", "parallel")


class CrossLayer(nn.Module):
    """One DCN-v2 cross layer: ``x0 * (W x + b) + x`` on [B, d]; ``W = U V^T`` when ``rank`` > 0."""

    def __init__(self, width: int, rank: int = 0):
        super().__init__()
        if rank:
            self.down = nn.Linear(width, rank, bias=False)
            self.up = nn.Linear(rank, width)
        else:
            self.down = None
            self.up = nn.Linear(width, width)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        inner = self.up(self.down(x)) if self.down is not None else self.up(x)
        return x0 * inner + x


class DCNv2(nn.Module):
    """DCN-v2 over the schema's fields.

    Args:
        schema, embeddings: as every model (see ``train.models``).
        cross_layers: how many cross layers (default 3).
        hidden: widths of the MLP (default (256, 128)).
        structure: ``"stacked"`` (default) or ``"parallel"``.
        low_rank: 0 (default): full-rank cross matrices; r > 0: rank-r ``U V^T``.

    Raises:
        ValueError: a bad option, naming it and its value.
    """

    def __init__(self, schema: Schema, embeddings: HashEmbeddingBagCollection, cross_layers: int = 3,
                 hidden: Sequence[int] = (256, 128), structure: str = "stacked", low_rank: int = 0):
        super().__init__()
        hidden = check_widths("hidden", hidden)
        for name, value, low in (("cross_layers", cross_layers, 0), ("low_rank", low_rank, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= {low})")
        if structure not in _STRUCTURES:
            raise ValueError(f"Invalid structure: {structure!r} (expected one of {_STRUCTURES})")
        self.embeddings = embeddings
        self.fields = FieldReader(schema, embeddings)
        self.structure = structure
        width = sum(self.fields.dims) + len(schema.dense)
        self.cross = nn.ModuleList(CrossLayer(width, low_rank) for _ in range(cross_layers))
        self.deep = mlp([width, *hidden], final_activation=True)
        deep_out = hidden[-1] if hidden else width
        self.head = nn.Linear(deep_out + (width if structure == "parallel" else 0), 1)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits [B]."""
        vecs, biases = self.fields.read(batch, self.embeddings(batch.sparse))
        x0 = torch.cat([*vecs, batch.dense], dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        if self.structure == "stacked":
            out = self.deep(x)
        else:
            out = torch.cat([x, self.deep(x0)], dim=1)
        logit = self.head(out).squeeze(-1)
        return logit + self.fields.wide(biases, len(batch), logit)
