"""A restore that fails changes nothing: every field is checked (type, dtype, shape) before anything loads.

Each case writes a checkpoint with a valid header and checksum whose payload
has one field of the wrong kind, restores it into live objects that already
hold trained state, and checks the error and that tables, model, optimizer
and global step are exactly as before.
"""

from __future__ import annotations

import copy
import hashlib
import io

import pytest
import torch

from monolith_torch.checkpoint import (
    CheckpointError,
    load_checkpoint_file,
    restore_checkpoint,
    save_checkpoint,
)
from monolith_torch.core.ragged import RaggedTensor
from monolith_torch.embedding.factory import HashTableFeatureFactory
from monolith_torch.embedding.feature import FeatureColumn, FeatureSlotConfig
from monolith_torch.step.api import apply_gradients_with_var_optimizer
from monolith_torch.step.context import NativeContext

MAGIC = b"MTCKPT1\n"  # the file format, as docs in monolith_torch.checkpoint describe it


def _write_payload(path, payload) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    header = MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + b"%020d" % len(data) + b"\n"
    with open(path, "wb") as f:
        f.write(header + data)


def _build():
    factory = HashTableFeatureFactory(seed=3)
    a = factory.create_feature_slot(FeatureSlotConfig(name="a", has_bias=True, occurrence_threshold=3))
    va = a.add_feature_slice(4)
    b = factory.create_feature_slot(FeatureSlotConfig(name="b"))
    vb = b.add_feature_slice(2)
    cols = [FeatureColumn(a, "fa"), FeatureColumn(b, "fb")]
    ctx = NativeContext(feature_factory=factory)
    model = torch.nn.Linear(6, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    step = torch.zeros((), dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        ids = {n: RaggedTensor.from_row_splits(torch.randint(0, 30, (12,), generator=gen), torch.arange(0, 13, 2))
               for n in ("fa", "fb")}
        factory.lookup(ids)
        x = torch.cat([cols[0].embedding_lookup(va), cols[1].embedding_lookup(vb)], 1)
        loss = (model(x).squeeze(1) + cols[0].get_bias().squeeze(1)).square().mean()
        apply_gradients_with_var_optimizer(ctx, cols, opt, loss, global_step=step, model=model)
    return ctx, factory, model, opt, step


def _snapshot(factory, model, opt, step):
    return (copy.deepcopy(factory.state_dict()), copy.deepcopy(model.state_dict()),
            copy.deepcopy(opt.state_dict()), int(step))


def _assert_same(a, b, where="state"):
    """Exactly equal nested state (tensors bit for bit, dtypes included)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _tamper_table(key, make):
    def edit(p):
        p["tables"]["tables"]["a"][key] = make(p["tables"]["tables"]["a"][key])
    return edit


def _tamper_model(p):
    p["model"]["weight"] = p["model"]["weight"].to(torch.int32)


def _tamper_optimizer(p):
    state = p["optimizer"]["state"]
    first = next(iter(state))
    state[first]["exp_avg"] = torch.zeros(3, 3)


def _tamper_step(p):
    p["global_step"] = "four"


def _tamper_factory_step(p):
    p["tables"]["global_step"] = "four"


CASES = {
    "table keys as float": (_tamper_table("keys", lambda t: t.double()), "keys"),
    "cand_keys as float": (_tamper_table("cand_keys", lambda t: t.float()), "cand_keys"),
    "keys as a list": (_tamper_table("keys", lambda t: t.tolist()), "keys"),
    "values as int": (_tamper_table("values", lambda t: t.long()), "values"),
    "string global_step": (_tamper_step, "global_step"),
    "string factory global_step": (_tamper_factory_step, "global_step"),
    "int model weight": (_tamper_model, "weight"),
    "optimizer state of the wrong shape": (_tamper_optimizer, "exp_avg"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_failed_restore_changes_nothing(tmp_path, case):
    tamper, named = CASES[case]
    ctx, factory, model, opt, step = _build()
    good = tmp_path / "good.pt"
    save_checkpoint(good, ctx, model, opt, step)
    payload = load_checkpoint_file(good)
    tamper(payload)
    bad = tmp_path / "bad.pt"
    _write_payload(bad, payload)

    # Live objects that hold other state than the file: a half-done restore would show.
    ctx2, factory2, model2, opt2, step2 = _build()
    with torch.no_grad():
        model2.weight.add_(1.0)
    before = _snapshot(factory2, model2, opt2, step2)
    with pytest.raises(CheckpointError) as err:
        restore_checkpoint(bad, ctx2, model2, opt2, step2)
    assert named in str(err.value) and "bad.pt" in str(err.value)
    after = _snapshot(factory2, model2, opt2, step2)
    _assert_same(before[0], after[0])
    _assert_same(before[1], after[1])
    _assert_same(before[2], after[2])
    assert before[3] == after[3]
    for table in factory2.tables.values():  # every table still reads and writes
        table.state_dict()
    # The good file still restores into the same objects.
    assert restore_checkpoint(good, ctx2, model2, opt2, step2) == int(step)


def test_optimizer_of_another_kind_is_refused_before_training(tmp_path):
    ctx, factory, model, opt, step = _build()
    path = tmp_path / "adam.pt"
    save_checkpoint(path, ctx, model, opt, step)
    ctx2, factory2, model2, _, step2 = _build()
    sgd = torch.optim.SGD(model2.parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match="momentum"):
        restore_checkpoint(path, ctx2, model2, sgd, step2)
