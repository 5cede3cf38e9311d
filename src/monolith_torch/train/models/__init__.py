"""The model zoo: one module per model, each built from the schema's features, and a registry.

``model = "deepfm"`` (the default run's model), ``"dcn_v2"``, ``"dlrm"`` or
``"wide_deep"`` picks a built-in model; ``model = "mypackage.module:MyModel"``
loads a user's own ``nn.Module`` subclass. Every model, built-in or not,
follows one protocol:

- Constructor: ``Model(schema, embeddings, **options)``. ``schema`` is the
  run's ``train.schema.Schema``; ``embeddings`` a ``HashEmbeddingBagCollection``
  built from ``schema.embedding_configs()`` (``build_embeddings``), holding
  one table per slot; ``options`` the model's settings as plain values (ints,
  floats, strings, lists), e.g. ``hidden = [256, 128]``. The model keeps
  ``embeddings`` as a submodule (``self.embeddings = embeddings``) so the
  training step and checkpoints find its tables. Raise ``ValueError`` naming
  an option and its value for a bad one.
- ``forward(batch) -> logits``: ``batch`` is a ``train.readers.Batch``
  (``labels`` [B], ``dense`` [B, n_dense] in ``schema.dense`` order,
  ``sparse``: feature name -> ragged int64 ids, ``timestamps`` [B] or None).
  The model calls ``self.embeddings(batch.sparse)`` once, which gives each id
  feature's rows, [B, D] pooled or [B, L, D] for a sequence, D the table's
  full row width with the bias column first when the table has one
  (``embeddings.slice_ranges(name)``; ``models.common.FieldReader`` splits
  and masks them). It returns logits [B] (before the sigmoid); the trainer
  applies ``binary_cross_entropy_with_logits``.

Every built-in model adds the id features' bias slices to its logit (the
wide part, FTRL-trained by default).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from types import MappingProxyType

from torch import nn

from monolith_torch.embedding.factory import HashTableFeatureFactory
from monolith_torch.embedding.module import HashEmbeddingBagCollection
from monolith_torch.train.config import ConfigError
from monolith_torch.train.models.common import FieldReader, mlp
from monolith_torch.train.models.dcn_v2 import DCNv2
from monolith_torch.train.models.deepfm import DeepFM
from monolith_torch.train.models.dlrm import DLRM
from monolith_torch.train.models.wide_deep import WideDeep
from monolith_torch.train.schema import Schema

__all__ = [
    "MODELS",
    "DCNv2",
    "DLRM",
    "DeepFM",
    "FieldReader",
    "WideDeep",
    "build_embeddings",
    "build_model",
    "mlp",
    "resolve_model",
]

MODELS: Mapping[str, type[nn.Module]] = MappingProxyType({
    "deepfm": DeepFM,
    "dcn_v2": DCNv2,
    "dlrm": DLRM,
    "wide_deep": WideDeep,
})


def build_embeddings(schema: Schema, factory: HashTableFeatureFactory | None = None, seed: int = 0,
                     fused: bool = True) -> HashEmbeddingBagCollection:
    """The ``HashEmbeddingBagCollection`` of ``schema``: one table per slot, one feature per id feature."""
    tables, features = schema.embedding_configs()
    return HashEmbeddingBagCollection(tables, features, factory=factory, seed=seed, fused=fused)


def resolve_model(name_or_path: str) -> type[nn.Module]:
    """The class ``build_model`` would use: a built-in name, or ``"package.module:Class"``.

    Raises:
        ConfigError: an unknown name, a module that does not import, a missing
            attribute, or one that is not an ``nn.Module`` subclass.
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ConfigError(f"Invalid model: {name_or_path!r} (expected one of {sorted(MODELS)} or 'module:Class')")
    if ":" not in name_or_path:
        if name_or_path not in MODELS:
            raise ConfigError(f"Invalid model: {name_or_path!r} (expected one of {sorted(MODELS)}, "
                              "or 'package.module:Class' for your own)")
        return MODELS[name_or_path]
    module_name, _, attr = name_or_path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"Invalid model: {name_or_path!r} (expected 'package.module:Class')")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"Invalid model: {name_or_path!r} (cannot import {module_name!r}: {err})") from err
    cls = module
    for part in attr.split("."):
        if not hasattr(cls, part):
            raise ConfigError(f"Invalid model: {name_or_path!r} (module {module_name!r} has no {attr!r})")
        cls = getattr(cls, part)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ConfigError(f"Invalid model: {name_or_path!r} (expected a torch.nn.Module subclass, "
                          f"got {type(cls).__name__} {cls!r})")
    return cls


def build_model(name_or_path: str, schema: Schema, embeddings: HashEmbeddingBagCollection,
                **options) -> nn.Module:
    """Builds a model of the zoo, or a user's, following the protocol in this package's docstring.

    Args:
        name_or_path: ``"deepfm"``, ``"dcn_v2"``, ``"dlrm"``, ``"wide_deep"``,
            or ``"package.module:Class"``.
        schema: the run's schema.
        embeddings: its ``HashEmbeddingBagCollection`` (``build_embeddings``).
        options: the model's keyword arguments.

    Raises:
        ConfigError: an unknown model or option, or a bad option value
            (the model's ``ValueError``, naming the model).
    """
    cls = resolve_model(name_or_path)
    try:
        inspect.signature(cls).bind(schema, embeddings, **options)
    except TypeError as err:
        known = [p for p in inspect.signature(cls).parameters if p not in ("schema", "embeddings")]
        raise ConfigError(f"Invalid options for model {name_or_path!r}: {sorted(options)} ({err}); "
                          f"it takes {known}") from None
    try:
        return cls(schema, embeddings, **options)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"model {name_or_path!r}: {err}") from err
