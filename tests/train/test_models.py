"""The model zoo: each model learns a small synthetic schema's signal; DeepFM over the Criteo preset is,
bit for bit, the same model written against Monolith's slot API; ``build_model`` loads built-in and user
models and names bad options."""

from __future__ import annotations

import dataclasses
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monolith_torch.core.ragged import RaggedTensor
from monolith_torch.embedding import entry
from monolith_torch.embedding.combiners import FirstN
from monolith_torch.embedding.factory import HashTableFeatureFactory
from monolith_torch.embedding.feature import FeatureColumn, FeatureSlotConfig
from monolith_torch.embedding.seq_mask import gen_seq_mask
from monolith_torch.step.api import apply_gradients_with_var_optimizer
from monolith_torch.step.context import NativeContext
from monolith_torch.step.types import GradClipType
from monolith_torch.train.config import ConfigError
from monolith_torch.train.data import CAT_COLUMNS, NUM_INT, SEQ_FEATURE, generate_criteo
from monolith_torch.train.models import (
    MODELS,
    DeepFM,
    build_embeddings,
    build_model,
    mlp,
    resolve_model,
)
from monolith_torch.train.readers import read_schema_batches
from monolith_torch.train.schema import criteo_schema, load_schema

TABLE = {"dim": 8, "vec_optimizer": {"type": "adagrad", "learning_rate": 0.2}}
FEATURES = [
    {"name": "label", "kind": "label"},
    {"name": "d1", "kind": "dense"},
    {"name": "d2", "kind": "dense", "transform": "log1p"},
    {"name": "user", "kind": "categorical", **TABLE},
    {"name": "item", "kind": "categorical", "dtype": "int", "slot": 2, **TABLE},
    {"name": "tags", "kind": "multi", "separator": "|", "combiner": "mean", **TABLE},
    {"name": "hist", "kind": "sequence", "dtype": "int", "separator": " ", "max_seq_length": 4, "slot": 2},
]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """512 rows whose label follows user x item, the tags and a dense feature."""
    rng = np.random.default_rng(0)
    n = 512
    user, item = rng.integers(0, 40, n), rng.integers(0, 30, n)
    d1 = rng.normal(size=n)
    tags = ["|".join(f"t{t}" for t in rng.choice(6, rng.integers(0, 3), replace=False)) for _ in range(n)]
    hist = [" ".join(str(h) for h in rng.integers(0, 30, rng.integers(0, 6))) for _ in range(n)]
    logit = np.where((user + item) % 2 == 0, 1.5, -1.5) + d1 + np.array([1.0 if "t1" in t else 0.0 for t in tags])
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    path = tmp_path_factory.mktemp("models") / "s.parquet"
    pq.write_table(pa.table({"label": label, "d1": d1, "d2": rng.integers(0, 100, n).astype(np.float64),
                             "user": [f"u{u}" for u in user], "item": item, "tags": tags, "hist": hist}), path)
    schema = load_schema(FEATURES)
    (batch,) = read_schema_batches([str(path)], schema, n)
    return schema, batch


def _train(model, batch, steps=40, lr=0.02):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(model(batch), batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.embeddings.sparse_step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("name, options", [
    ("deepfm", {}),
    ("deepfm", {"hidden": [16], "bottom_hidden": []}),
    ("dcn_v2", {}),
    ("dcn_v2", {"structure": "parallel", "low_rank": 4, "cross_layers": 2, "hidden": [32]}),
    ("dcn_v2", {"cross_layers": 0, "hidden": []}),
    ("dlrm", {"hidden": [32, 16]}),
    ("wide_deep", {"hidden": [32]}),
])
def test_each_model_learns_the_synthetic_signal(synthetic, name, options):
    schema, batch = synthetic
    torch.manual_seed(0)
    model = build_model(name, schema, build_embeddings(schema, seed=0), **options)
    losses = _train(model, batch)
    assert losses[-1] < 0.9 * losses[0], losses
    model.eval()
    sizes = {n: len(t) for n, t in model.embeddings.tables.items()}
    unseen = dataclasses.replace(batch, sparse={k: RaggedTensor(v.values + 10**6, v.row_splits)
                                                for k, v in batch.sparse.items()})
    with torch.no_grad():
        logits = model(unseen)
    assert logits.shape == (len(batch),) and torch.isfinite(logits).all()
    assert {n: len(t) for n, t in model.embeddings.tables.items()} == sizes  # eval mode grows no table


def test_models_train_through_monolith_step_too(synthetic):
    schema, batch = synthetic
    torch.manual_seed(0)
    model = build_model("dcn_v2", schema, build_embeddings(schema, seed=0))
    ctx = NativeContext(feature_factory=model.embeddings.factory)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    step = torch.zeros((), dtype=torch.int64)
    losses = []
    for _ in range(40):
        loss = F.binary_cross_entropy_with_logits(model(batch), batch.labels)
        apply_gradients_with_var_optimizer(ctx, [], opt, loss, clip_type=GradClipType.ClipByGlobalNorm,
                                           clip_norm=10.0, global_step=step, model=model)
        losses.append(float(loss.detach()))
    assert int(step) == 40 and losses[-1] < 0.8 * losses[0]


class _SlotApiDeepFM(nn.Module):
    """The default run's DeepFM written against Monolith's slot API (``create_feature_slot``, ``FeatureColumn``,
    ``factory.lookup``): the model the trainer ran before the zoo, kept here as an independent implementation."""

    def __init__(self, ctx: NativeContext, emb_dim: int, seq_len: int, hidden):
        super().__init__()
        self.seq_len = seq_len
        self.columns, self._vec_slices, self._bias_slices = [], [], []
        vec_optimizer = entry.AdagradOptimizer(learning_rate=0.05, initial_accumulator_value=1.0)
        bias_optimizer = entry.FtrlOptimizer(learning_rate=0.05, initial_accumulator_value=1e-6, beta=1.0)
        for slot_id, name in enumerate([*CAT_COLUMNS, SEQ_FEATURE], start=1):
            slot = ctx.create_feature_slot(FeatureSlotConfig(
                name=name, slot_id=slot_id, has_bias=True, bias_optimizer=bias_optimizer,
                default_vec_optimizer=vec_optimizer, default_vec_initializer=entry.RandomUniformInitializer(-0.05, 0.05),
            ))
            self._vec_slices.append(slot.add_feature_slice(emb_dim))
            self.columns.append(FeatureColumn(slot, name, FirstN(seq_len) if name == SEQ_FEATURE else None))
            self._bias_slices.append(slot.get_bias_slice())
        self.bottom = mlp([NUM_INT, 64, emb_dim])
        self.top = mlp([(len(CAT_COLUMNS) + 2) * emb_dim, *hidden, 1])

    def forward(self, batch) -> torch.Tensor:
        fields, wide = [self.bottom(batch.dense)], []
        for fc, vec, bias in zip(self.columns, self._vec_slices, self._bias_slices, strict=True):
            emb, b = fc.embedding_lookup(vec), fc.embedding_lookup(bias)
            if fc.feature_name == SEQ_FEATURE:
                mask = gen_seq_mask(batch.sparse[SEQ_FEATURE].row_splits, self.seq_len, validate=False)
                mask = mask.to(emb.dtype).unsqueeze(-1)
                denom = mask.sum(1).clamp_min(1.0)
                emb, b = (emb * mask).sum(1) / denom, (b * mask).sum(1) / denom
            fields.append(emb)
            wide.append(b)
        stacked = torch.stack(fields, dim=1)  # [B, F, D]
        fm = 0.5 * (stacked.sum(1).pow(2) - stacked.pow(2).sum(1)).sum(-1)
        return self.top(stacked.flatten(1)).squeeze(-1) + fm + torch.cat(wide, dim=1).sum(1)


def test_deepfm_is_the_slot_api_model_exactly(tmp_path):
    """Same seed, same batches, same step: DeepFM over criteo_schema gives the slot-API model's numbers bit for bit."""
    path = generate_criteo(str(tmp_path / "c.tsv"), 1200, seed=2)
    torch.manual_seed(0)
    factory = HashTableFeatureFactory(seed=0)
    ctx_old = NativeContext(feature_factory=factory)
    old = _SlotApiDeepFM(ctx_old, emb_dim=8, seq_len=4, hidden=(32, 16))
    torch.manual_seed(0)
    schema = criteo_schema(emb_dim=8, seq_len=4)
    new = build_model("deepfm", schema, build_embeddings(schema, seed=0, fused=False), hidden=(32, 16))
    ctx_new = NativeContext(feature_factory=new.embeddings.factory)
    dense_new = {k: v for k, v in new.state_dict().items() if not k.startswith("embeddings.")}
    assert list(dense_new) == list(old.state_dict())
    for key, value in old.state_dict().items():
        assert torch.equal(value, dense_new[key]), key
    opt_old = torch.optim.Adam(old.parameters(), lr=1e-3)
    opt_new = torch.optim.Adam(new.parameters(), lr=1e-3)
    steps = [torch.zeros((), dtype=torch.int64) for _ in range(2)]
    pairs = zip(read_schema_batches([path], schema, 200), read_schema_batches([path], schema, 200), strict=True)
    for a, b in pairs:
        factory.lookup(a.sparse)
        logits_old, logits_new = old(a), new(b)
        assert torch.equal(logits_old, logits_new)
        for ctx, model, opt, columns, logits, labels, step in (
            (ctx_old, old, opt_old, old.columns, logits_old, a.labels, steps[0]),
            (ctx_new, new, opt_new, [], logits_new, b.labels, steps[1]),
        ):
            loss = F.binary_cross_entropy_with_logits(logits, labels)
            apply_gradients_with_var_optimizer(ctx, columns, opt, loss, clip_type=GradClipType.ClipByGlobalNorm,
                                               clip_norm=10.0, global_step=step, model=model)
    for key, value in old.state_dict().items():
        assert torch.equal(value, new.state_dict()[key]), key


# ---------------------------------------------------------------- the registry


def test_registry_names():
    assert sorted(MODELS) == ["dcn_v2", "deepfm", "dlrm", "wide_deep"]
    assert resolve_model("deepfm") is DeepFM


USER_MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    class Mean(nn.Module):
        """Logit: a linear layer over the mean of every id feature's pooled row."""

        def __init__(self, schema, embeddings, scale=1.0):
            super().__init__()
            if scale <= 0:
                raise ValueError(f"Invalid scale: {scale!r} (expected > 0)")
            self.embeddings = embeddings
            self.names = [f.name for f in schema.embedded]
            width = embeddings.slice_ranges(self.names[0])[-1][1]
            self.linear = nn.Linear(width, 1)
            self.scale = scale

        def forward(self, batch):
            out = self.embeddings(batch.sparse)
            # A sequence's rows are [B, L, D]: averaged over L (padding included, for brevity).
            rows = torch.stack([out[n] if out[n].dim() == 2 else out[n].mean(1) for n in self.names]).mean(0)
            return self.scale * self.linear(rows).squeeze(-1)

    NOT_A_MODEL = 3
''')


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_models"


def test_a_users_model_loads_by_module_and_class(synthetic, user_package):
    schema, batch = synthetic
    model = build_model(f"{user_package}:Mean", schema, build_embeddings(schema), scale=2.0)
    assert model.scale == 2.0
    losses = _train(model, batch, steps=30, lr=0.05)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name, shown", [
    ("xgboost", "expected one of ['dcn_v2', 'deepfm', 'dlrm', 'wide_deep']"),
    ("", "Invalid model: ''"),
    ("no_such_module_xyz:Model", "cannot import 'no_such_module_xyz'"),
    ("{pkg}:Missing", "has no 'Missing'"),
    ("{pkg}:NOT_A_MODEL", "expected a torch.nn.Module subclass"),
    ("{pkg}:", "expected 'package.module:Class'"),
])
def test_bad_model_names_are_config_errors(synthetic, user_package, name, shown):
    schema, _ = synthetic
    with pytest.raises(ConfigError) as err:
        build_model(name.format(pkg=user_package), schema, build_embeddings(schema))
    assert shown in str(err.value)


@pytest.mark.parametrize("name, options, shown", [
    ("deepfm", {"hiden": [8]}, "Invalid options for model 'deepfm': ['hiden']"),
    ("deepfm", {"hidden": [0]}, "model 'deepfm': Invalid hidden: [0]"),
    ("dcn_v2", {"structure": "tree"}, "Invalid structure: 'tree'"),
    ("dcn_v2", {"cross_layers": -1}, "Invalid cross_layers: -1"),
    ("wide_deep", {"hidden": "64"}, "Invalid hidden: '64'"),
    ("{pkg}:Mean", {"scale": -1.0}, "model '{pkg}:Mean': Invalid scale: -1.0"),
])
def test_bad_model_options_are_config_errors(synthetic, user_package, name, options, shown):
    schema, _ = synthetic
    with pytest.raises(ConfigError) as err:
        build_model(name.format(pkg=user_package), schema, build_embeddings(schema), **options)
    assert shown.format(pkg=user_package) in str(err.value)


@pytest.mark.parametrize("name", ["deepfm", "dlrm"])
def test_pairwise_models_need_one_width(name):
    schema = load_schema([{"name": "label", "kind": "label"}, {"name": "a", "kind": "categorical", "dim": 4},
                          {"name": "b", "kind": "categorical", "dim": 8}])
    with pytest.raises(ConfigError, match="expected one dim for every id feature"):
        build_model(name, schema, build_embeddings(schema))
    for other in ("dcn_v2", "wide_deep"):
        build_model(other, schema, build_embeddings(schema))
