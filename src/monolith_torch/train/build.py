"""What a run config builds: its schema, its tables and model, and the options of its model.

The schema is the config's ``[[features]]`` list, or the Criteo preset when
there is none (shaped by ``emb_dim``, ``seq_len``, ``vec_lr`` and ``bias_lr``).
``build_run_model`` is the one place a config becomes tables and a model: the
trainer and the server (``monolith-torch serve``) both call it.
May import ``embedding``, ``train.config``, ``train.schema`` and ``train.models``.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable

import torch

from monolith_torch.embedding.factory import HashTableFeatureFactory
from monolith_torch.embedding.module import HashEmbeddingBagCollection
from monolith_torch.train.config import TrainConfig
from monolith_torch.train.models import build_embeddings, build_model, resolve_model
from monolith_torch.train.schema import Schema, criteo_schema, load_schema

__all__ = ["RunModel", "build_run_model", "model_options", "run_schema"]


@dataclasses.dataclass
class RunModel:
    """A run's schema, its hash-table factory, the embedding module over it and the model."""

    schema: Schema
    factory: HashTableFeatureFactory
    embeddings: HashEmbeddingBagCollection
    model: torch.nn.Module


def build_run_model(cfg: TrainConfig, time_fn: Callable[[], float] = time.time) -> RunModel:
    """Builds the tables and model ``cfg`` describes (dense weights seeded with ``cfg.seed``).

    Raises:
        ConfigError: a bad schema, model name or model option.
    """
    torch.manual_seed(cfg.seed)
    schema = run_schema(cfg)
    factory = HashTableFeatureFactory(seed=cfg.seed, sharded=cfg.sharded_tables, time_fn=time_fn)
    embeddings = build_embeddings(schema, factory, fused=cfg.fused_embeddings)
    # Checkpoints carry the tables and the global step through the factory, once.
    embeddings.state_dict_tables = False
    model = build_model(cfg.model, schema, embeddings, **model_options(cfg))
    return RunModel(schema, factory, embeddings, model)


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
