"""Checkpoints: bit-identical round trip, corrupt/truncated files, a process killed mid-save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import monolith_torch
from monolith_torch.checkpoint import CheckpointError, restore_checkpoint, save_checkpoint
from monolith_torch.core.ragged import RaggedTensor
from monolith_torch.embedding import entry
from monolith_torch.embedding.factory import HashTableFeatureFactory
from monolith_torch.embedding.feature import FeatureColumn, FeatureSlotConfig
from monolith_torch.step.async_functions import AsyncFunctionMgr
from monolith_torch.step.context import NativeContext

SRC = os.path.dirname(os.path.dirname(os.path.abspath(monolith_torch.__file__)))


def _build(seed=0):
    factory = HashTableFeatureFactory(seed=seed)
    slot = factory.create_feature_slot(FeatureSlotConfig(name="a", has_bias=True, occurrence_threshold=2))
    vec = slot.add_feature_slice(4)
    fc = FeatureColumn(slot, "fa")
    slot2 = factory.create_feature_slot(
        FeatureSlotConfig(name="b", default_vec_optimizer=entry.AdamOptimizer(learning_rate=0.01))
    )
    vec2 = slot2.add_feature_slice(3)
    fc2 = FeatureColumn(slot2, "fb", FeatureColumn.reduce_mean())
    ctx = NativeContext(feature_factory=factory, async_function_mgr=AsyncFunctionMgr(is_async=True))
    model = torch.nn.Linear(7, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    return ctx, factory, model, opt, (fc, vec, fc2, vec2)


def _batch(gen, b=16):
    la = torch.randint(0, 4, (b,), generator=gen)
    lb = torch.randint(1, 3, (b,), generator=gen)
    def ragged(lengths):
        splits = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        return RaggedTensor.from_row_splits(torch.randint(0, 40, (int(splits[-1]),), generator=gen), splits)
    return {"fa": ragged(la), "fb": ragged(lb)}


def _train(ctx, factory, model, opt, cols, steps, gen):
    fc, vec, fc2, vec2 = cols
    for _ in range(steps):
        factory.lookup(_batch(gen))
        x = torch.cat([fc.embedding_lookup(vec), fc2.embedding_lookup(vec2)], 1)
        loss = (model(x).squeeze(1) + fc.get_bias().squeeze(1)).square().mean()
        leaves = [fc.get_all_embeddings_concat(), fc2.get_all_embeddings_concat()]
        grads = torch.autograd.grad(loss, leaves + list(model.parameters()))
        ctx.apply_embedding_gradients(list(zip(grads[:2], leaves, strict=True)))
        for p, g in zip(model.parameters(), grads[2:], strict=True):
            p.grad = g
        ctx.add_async_function(opt.step)


def _probe(factory, cols):
    factory.lookup({"fa": RaggedTensor.from_row_lengths(torch.arange(40), torch.tensor([40])),
                    "fb": RaggedTensor.from_row_lengths(torch.arange(40), torch.tensor([40]))}, training=False)
    return [c.get_all_embeddings_concat().detach().clone() for c in (cols[0], cols[2])]


def test_round_trip_bit_identical(tmp_path):
    gen = torch.Generator().manual_seed(0)
    ctx, factory, model, opt, cols = _build()
    _train(ctx, factory, model, opt, cols, 5, gen)
    step = torch.tensor(5)
    path = tmp_path / "ckpt"
    save_checkpoint(path, ctx, model, opt, step)
    assert ctx.async_function_mgr.num_pending() == 0  # flushed before saving
    ctx2, factory2, model2, opt2, cols2 = _build()
    step2 = torch.tensor(0)
    assert restore_checkpoint(path, ctx2, model2, opt2, step2) == 5
    assert int(step2) == 5
    for a, b in zip(_probe(factory, cols), _probe(factory2, cols2), strict=True):
        assert torch.equal(a, b)
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k])
    # Training on from both gives bit-identical results (optimizer state, counts and filter restored).
    _train(ctx, factory, model, opt, cols, 3, torch.Generator().manual_seed(1))
    _train(ctx2, factory2, model2, opt2, cols2, 3, torch.Generator().manual_seed(1))
    ctx.async_function_mgr.flush()
    ctx2.async_function_mgr.flush()
    for a, b in zip(_probe(factory, cols), _probe(factory2, cols2), strict=True):
        assert torch.equal(a, b)
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k])


def test_corrupt_and_truncated_files(tmp_path):
    ctx, factory, model, opt, cols = _build()
    _train(ctx, factory, model, opt, cols, 2, torch.Generator().manual_seed(0))
    path = tmp_path / "ckpt"
    save_checkpoint(path, ctx, model, opt, 2)
    raw = path.read_bytes()
    ctx2, factory2, model2, opt2, cols2 = _build()
    before = _probe(factory2, cols2)
    weights = model2.weight.detach().clone()
    cases = {
        "truncated": raw[: len(raw) // 2],
        "flipped": raw[:-100] + bytes([raw[-100] ^ 1]) + raw[-99:],
        "header": raw[:20],
        "garbage": b"not a checkpoint at all" * 10,
    }
    for name, data in cases.items():
        bad = tmp_path / f"bad_{name}"
        bad.write_bytes(data)
        with pytest.raises(CheckpointError, match=f"bad_{name}"):
            restore_checkpoint(bad, ctx2, model2, opt2)
    with pytest.raises(CheckpointError, match="missing"):
        restore_checkpoint(tmp_path / "missing", ctx2, model2, opt2)
    # Nothing changed by the failed restores.
    assert torch.equal(model2.weight, weights)
    for a, b in zip(before, _probe(factory2, cols2), strict=True):
        assert torch.equal(a, b)


def test_mismatched_objects_change_nothing(tmp_path):
    ctx, factory, model, opt, cols = _build()
    _train(ctx, factory, model, opt, cols, 2, torch.Generator().manual_seed(0))
    path = tmp_path / "ckpt"
    save_checkpoint(path, ctx, model, opt, 2)
    ctx2, factory2, model2, opt2, cols2 = _build()
    before = _probe(factory2, cols2)
    with pytest.raises(CheckpointError, match="model"):
        restore_checkpoint(path, ctx2, torch.nn.Linear(3, 1), opt2)
    other = HashTableFeatureFactory()
    other.create_feature_slot(FeatureSlotConfig(name="zzz")).add_feature_slice(2)
    with pytest.raises(CheckpointError, match="slots"):
        restore_checkpoint(path, NativeContext(feature_factory=other))
    for a, b in zip(before, _probe(factory2, cols2), strict=True):
        assert torch.equal(a, b)


_CHILD = textwrap.dedent(
    """
    import os, sys, torch
    sys.path.insert(0, {src!r})
    from monolith_torch import checkpoint
    from monolith_torch.checkpoint import save_checkpoint
    path, mode = sys.argv[1], sys.argv[2]
    model = torch.nn.Linear(2048, 4096 if mode == "sigkill" else 4)  # sigkill: ~32 MiB per save
    with torch.no_grad():
        model.weight.fill_(2.0)
    if mode == "exit_before_rename":
        def crash(src, dst):
            os._exit(17)
        checkpoint.os.replace = crash
        save_checkpoint(path, None, model)
    else:
        print("saving", flush=True)
        while True:
            save_checkpoint(path, None, model)
    """
)


def _previous(tmp_path):
    path = tmp_path / "ckpt"
    model = torch.nn.Linear(2048, 4)
    with torch.no_grad():
        model.weight.fill_(1.0)
    save_checkpoint(path, None, model)
    return path


@pytest.mark.timeout(60)
def test_killed_between_write_and_rename_keeps_previous(tmp_path):
    path = _previous(tmp_path)
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(src=SRC))
    proc = subprocess.run([sys.executable, str(script), str(path), "exit_before_rename"], timeout=50)
    assert proc.returncode == 17
    assert any(p.name.startswith(".ckpt.tmp-") for p in tmp_path.iterdir())  # the orphaned temp file
    model = torch.nn.Linear(2048, 4)
    restore_checkpoint(path, None, model)
    assert torch.equal(model.weight, torch.ones(4, 2048))


@pytest.mark.timeout(60)
def test_sigkill_during_save_keeps_a_loadable_checkpoint(tmp_path):
    path = _previous(tmp_path)
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(src=SRC))
    proc = subprocess.Popen([sys.executable, str(script), str(path), "sigkill"], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"saving"
        deadline = time.monotonic() + 30
        # Kill while a temp file is being written.
        while not any(p.name.startswith(".ckpt.tmp-") for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline, "the child never started writing"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=20)
    assert proc.returncode == -signal.SIGKILL
    # Either the previous checkpoint or a complete new one, never a partial file.
    try:
        model = torch.nn.Linear(2048, 4)
        restore_checkpoint(path, None, model)
        assert torch.equal(model.weight, torch.ones(4, 2048))
    except CheckpointError as e:  # a completed child save has the other shape
        assert "model" in str(e)
        big = torch.nn.Linear(2048, 4096)
        restore_checkpoint(path, None, big)
        assert torch.equal(big.weight, torch.full((4096, 2048), 2.0))


def test_layout_context_round_trip(tmp_path):
    def build():
        factory = HashTableFeatureFactory(seed=2)
        slot = factory.create_feature_slot(FeatureSlotConfig(name="a", has_bias=True))
        vec = slot.add_feature_slice(2)
        fc = FeatureColumn(slot, "fa")
        layouts = {"bias": [(fc, slot.get_bias_slice())], "vec": [(fc, vec)]}
        return factory, layouts

    ids = {"fa": RaggedTensor.from_row_lengths(torch.tensor([3, 4, 3]), torch.tensor([2, 1]))}
    factory, layouts = build()
    lf = factory.lookup_layout(ids, layouts)
    ctx = NativeContext(layout_factory=lf)
    loss = lf.get_layout("vec").sum() + lf.get_layout("bias").sum()
    grads = torch.autograd.grad(loss, lf.flattened_layout())
    lf.apply_gradients(list(zip(grads, lf.flattened_layout(), strict=True)))
    save_checkpoint(tmp_path / "c", ctx, global_step=1)
    factory2, layouts2 = build()
    ctx2 = NativeContext(layout_factory=factory2.lookup_layout(ids, layouts2, training=False))
    assert restore_checkpoint(tmp_path / "c", ctx2) == 1
    q = torch.tensor([3, 4, 5])
    assert torch.equal(factory.tables["a"].lookup(q, insert=False), factory2.tables["a"].lookup(q, insert=False))


def test_remove_checkpoint_leaves_other_checkpoints_shards(tmp_path):
    from monolith_torch.checkpoint import remove_checkpoint

    mine = tmp_path / "ckpt"
    other = tmp_path / "ckpt.5"
    files = {
        "mine": tmp_path / "ckpt.0123456789ab.shard-00000-of-00002",
        "other": tmp_path / "ckpt.5.0123456789ab.shard-00000-of-00002",
    }
    for f in (mine, other, *files.values()):
        f.write_text("x")
    remove_checkpoint(str(mine))
    assert not mine.exists() and not files["mine"].exists()
    assert other.exists() and files["other"].exists()


def test_bad_global_step_changes_nothing_before_saving(tmp_path):
    mgr = AsyncFunctionMgr(is_async=True)
    ran = []
    mgr.add_async_function(lambda: ran.append(1))
    ctx = NativeContext(feature_factory=HashTableFeatureFactory(seed=0), async_function_mgr=mgr)
    with pytest.raises(TypeError, match="global_step"):
        save_checkpoint(str(tmp_path / "c"), ctx, global_step="7")
    assert ran == [] and mgr.num_pending() == 1
    assert not (tmp_path / "c").exists()
