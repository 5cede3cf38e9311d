"""What a run config builds: its schema and the options of its model.

The schema is the config's ``[[features]]`` list, or the Criteo preset when
there is none (shaped by ``emb_dim``, ``seq_len``, ``vec_lr`` and ``bias_lr``).
May import ``train.config``, ``train.schema`` and ``train.models``.
"""

from __future__ import annotations

import inspect

from monolith_torch.train.config import TrainConfig
from monolith_torch.train.models import resolve_model
from monolith_torch.train.schema import Schema, criteo_schema, load_schema

__all__ = ["model_options", "run_schema"]


def run_schema(cfg: TrainConfig) -> Schema:
    """The schema of the run: ``cfg.features``, or the Criteo preset.

    Raises:
        ConfigError: a bad ``[[features]]`` entry (``features[i].key`` named).
    """
    if cfg.features:
        return load_schema(list(cfg.features))
    return criteo_schema(emb_dim=cfg.emb_dim, seq_len=cfg.seq_len, vec_lr=cfg.vec_lr, bias_lr=cfg.bias_lr)


def model_options(cfg: TrainConfig) -> dict:
    """The model's keyword arguments: ``[model_options]``, plus ``hidden`` when the model takes it."""
    options = dict(cfg.model_options)
    if "hidden" in inspect.signature(resolve_model(cfg.model)).parameters:
        options.setdefault("hidden", cfg.hidden)
    return options
