"""What the models share: MLPs, and the schema's id features read out of the embedding module as fields.

``FieldReader`` turns one forward of a ``HashEmbeddingBagCollection`` into
per-feature fields: a vector [B, D_f] (sequences: the masked mean of their
``FirstN`` rows, masked with ``gen_seq_mask``) and, where the table has one,
a bias [B, 1], the wide part Monolith trains with FTRL.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from monolith_torch.embedding.module import HashEmbeddingBagCollection
from monolith_torch.embedding.seq_mask import gen_seq_mask
from monolith_torch.train.readers import Batch
from monolith_torch.train.schema import Schema

__all__ = ["FieldReader", "mlp", "check_widths"]


def mlp(sizes: Sequence[int], final_activation: bool = False) -> nn.Sequential:
    """Linear layers of widths ``sizes`` (input first) with ReLU between them (and after the last if asked)."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def check_widths(name: str, value, allow_empty: bool = True) -> tuple[int, ...]:
    """A model option holding layer widths: a sequence of ints >= 1.

    Raises:
        ValueError: names the option and the value.
    """
    widths = tuple(value) if isinstance(value, list | tuple) else None
    if widths is None or (not widths and not allow_empty) or any(
        isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths
    ):
        raise ValueError(f"Invalid {name}: {value!r} (expected a list of integers >= 1, e.g. [256, 128])")
    return widths


class FieldReader:
    """Reads the schema's id features out of ``embeddings``' output as fields.

    Args:
        schema: the schema the embeddings were built from (``Schema.embedding_configs``).
        embeddings: the module holding the tables.

    Attributes:
        names: the id features, in schema order.
        dims: each feature's vector width D_f.
        has_bias: whether any feature has a bias slice.
    """

    def __init__(self, schema: Schema, embeddings: HashEmbeddingBagCollection):
        self.names: list[str] = []
        self.dims: list[int] = []
        self._layout: list[tuple[str, int, tuple[int, int] | None, tuple[int, int]]] = []
        for f in schema.embedded:
            ranges = embeddings.slice_ranges(f.name)
            bias = ranges[0] if schema.table(f.slot).bias else None
            vec = ranges[-1]
            seq_len = f.max_seq_length if f.kind == "sequence" else 0
            self._layout.append((f.name, seq_len, bias, vec))
            self.names.append(f.name)
            self.dims.append(vec[1] - vec[0])
        self.has_bias = any(b is not None for _, _, b, _ in self._layout)

    def read(self, batch: Batch, pooled: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(vectors [B, D_f] per feature, biases [B, 1] of the features that have one) from ``embeddings(batch.sparse)``.

        A sequence's rows are averaged over its valid positions (an empty
        sequence gives zeros).
        """
        vecs, biases = [], []
        for name, seq_len, bias, vec in self._layout:
            row = pooled[name]
            parts = [row[..., vec[0] : vec[1]]] + ([row[..., bias[0] : bias[1]]] if bias is not None else [])
            if seq_len:
                mask = gen_seq_mask(batch.sparse[name].row_splits, seq_len, validate=False)
                mask = mask.to(row.dtype).unsqueeze(-1)
                denom = mask.sum(1).clamp_min(1.0)
                # Per slice, as the default run always has: a reduction over a [B, L, D]
                # block rounds differently from one over the whole [B, L, 1 + D] row.
                parts = [(p * mask).sum(1) / denom for p in parts]
            vecs.append(parts[0])
            if bias is not None:
                biases.append(parts[1])
        return vecs, biases

    def common_dim(self, model: str, why: str) -> int:
        """The one vector width D of every id feature, for models that pair fields.

        Raises:
            ValueError: the features have different widths (naming ``model`` and ``why``).
        """
        if len(set(self.dims)) != 1:
            widths = dict(zip(self.names, self.dims, strict=True))
            raise ValueError(f"Invalid schema for {model}: vector widths {widths} "
                             f"(expected one dim for every id feature: {why})")
        return self.dims[0]

    @staticmethod
    def wide(biases: list[torch.Tensor], batch_size: int, like: torch.Tensor) -> torch.Tensor:
        """The sum of the biases [B] (zeros without any)."""
        if not biases:
            return like.new_zeros(batch_size)
        return torch.cat(biases, dim=1).sum(1)
