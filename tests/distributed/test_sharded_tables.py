"""Sharded hash tables over real gloo processes (127.0.0.1): 2 and 3 ranks.

A small model over four slots, one per optimizer (SGD vec + FTRL bias, Adagrad
with an occurrence filter, FTRL with a one-day expiry, Adam), two features on
one slot, ids spread over the whole int64 range (negative ones included), is
trained for a few steps with a per-rank mean loss, evicting expired rows after
every step on a fake clock. The parent checks that

- every rank holds only rows it owns (``shard_owner``), and the union of the
  shards equals ONE process trained on the concatenated batches: same ids,
  occurrence counts, filter candidates and update times exactly; values and
  optimizer state within fp32 tolerance (sums over ranks in another order);
- a checkpoint written by 2 ranks, restored onto 3, saved again and restored
  onto 1 process gives bit-identical lookups;
- a rank that dies mid-exchange makes the other fail with ``ShardExchangeError``
  well within the timeout, and one that dies while saving leaves no manifest
  while the previous checkpoint stays loadable.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from monolith_torch.checkpoint import CheckpointError, restore_checkpoint, save_checkpoint
from monolith_torch.core.ragged import RaggedTensor
from monolith_torch.embedding import entry
from monolith_torch.embedding.factory import HashTableFeatureFactory
from monolith_torch.embedding.feature import FeatureColumn, FeatureSlotConfig
from monolith_torch.embedding.placement.sharded import ShardExchangeError, shard_owner
from monolith_torch.step.context import NativeContext

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable"),
    pytest.mark.skipif(sys.platform == "win32", reason="gloo over tcp on POSIX only"),
]

STEPS = 5
PER_RANK = 8
T0 = 1_700_000_000
DAY = 86400
FEATURES = ("a", "a2", "b", "c", "d")
VOCAB = torch.randint(-(2**62), 2**62, (64,), generator=torch.Generator().manual_seed(7))


class Clock:
    def __init__(self):
        self.now = T0

    def __call__(self):
        return self.now


def build(clock, sharded=True, timeout=None):
    factory = HashTableFeatureFactory(seed=11, time_fn=clock, sharded=sharded, exchange_timeout_s=timeout)
    cols = {}
    specs = {
        "sgd": dict(has_bias=True, default_vec_optimizer=entry.SgdOptimizer(learning_rate=0.5)),
        "adagrad": dict(
            default_vec_optimizer=entry.AdagradOptimizer(learning_rate=0.3, initial_accumulator_value=0.1),
            occurrence_threshold=3,
        ),
        "ftrl": dict(
            default_vec_optimizer=entry.FtrlOptimizer(
                learning_rate=0.2, initial_accumulator_value=0.1, beta=1.0, l1_regularization=0.001,
                l2_regularization=0.01,
            ),
            expire_time=1,
        ),
        "adam": dict(default_vec_optimizer=entry.AdamOptimizer(learning_rate=0.05)),
    }
    dims = {"sgd": 3, "adagrad": 4, "ftrl": 2, "adam": 3}
    feats = {"sgd": ("a", "a2"), "adagrad": ("b",), "ftrl": ("c",), "adam": ("d",)}
    for i, (name, kw) in enumerate(specs.items()):
        slot = factory.create_feature_slot(
            FeatureSlotConfig(name=name, slot_id=i + 1,
                              default_vec_initializer=entry.RandomUniformInitializer(-0.3, 0.3), **kw)
        )
        vec = slot.add_feature_slice(dims[name])
        for f in feats[name]:
            cols[f] = (FeatureColumn(slot, f), vec, dims[name])
    return factory, cols


def global_batch(step: int, world: int):
    g = torch.Generator().manual_seed(100 * world + step)
    n = world * PER_RANK
    feats = {}
    for j, f in enumerate(FEATURES):
        lengths = torch.randint(0, 4, (n,), generator=g)
        lo = 6 * step if f == "c" else 0  # "c" drifts: old ids stop being updated and expire
        idx = torch.randint(lo, lo + (12 if f == "c" else 40), (int(lengths.sum()),), generator=g)
        feats[f] = (VOCAB[idx % VOCAB.numel()] + j, lengths)
    y = torch.randn(n, generator=g)
    return feats, y


def rank_batch(step: int, world: int, rank: int | None):
    feats, y = global_batch(step, world)
    n = world * PER_RANK
    lo, hi = (0, n) if rank is None else (rank * PER_RANK, (rank + 1) * PER_RANK)
    out = {}
    for f, (ids, lengths) in feats.items():
        splits = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        out[f] = RaggedTensor.from_row_lengths(ids[int(splits[lo]):int(splits[hi])], lengths[lo:hi])
    return out, y[lo:hi]


def train_step(factory, cols, clock, step, batch):
    feats, y = batch
    clock.now = T0 + step * DAY * 35 // 100
    factory.lookup(feats)
    pred = cols["a"][0].get_bias().squeeze(1)
    leaves = []
    for k, f in enumerate(FEATURES):
        fc, vec, d = cols[f]
        w = torch.linspace(-1.0, 1.0, d) * (k + 1) / 3
        pred = pred + fc.embedding_lookup(vec) @ w
        leaves.append(fc.get_all_embeddings_concat())
    loss = (pred - y).square().mean()  # a per-rank mean
    grads = torch.autograd.grad(loss, leaves)
    factory.apply_gradients(list(zip(grads, leaves, strict=True)))
    factory.evict_expired()


def probe_batch():
    ids = torch.cat([VOCAB[:40] + j for j in range(3)] + [torch.tensor([5, -9])])  # a few never-seen ids
    lengths = torch.ones(ids.numel(), dtype=torch.int64)
    return {f: RaggedTensor.from_row_lengths(ids, lengths) for f in FEATURES}


def probe(factory, cols):
    factory.lookup(probe_batch(), training=False)
    return {f: cols[f][0].get_all_embeddings_concat().detach().clone() for f in FEATURES}


# --- workers ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank, world, port, timeout_s=60):
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _train_worker(rank, world, port, out, restore_from):
    _init(rank, world, port)
    try:
        clock = Clock()
        factory, cols = build(clock)
        for s in range(STEPS):
            train_step(factory, cols, clock, s, rank_batch(s, world, rank))
        result = {"state": factory.state_dict(), "probe": probe(factory, cols)}
        save_checkpoint(os.path.join(out, f"ckpt{world}.pt"), NativeContext(feature_factory=factory),
                        global_step=STEPS)
        # Same world size: each rank reads only its own shard.
        same, same_cols = build(clock)
        restore_checkpoint(os.path.join(out, f"ckpt{world}.pt"), NativeContext(feature_factory=same))
        result["same_world_probe"] = probe(same, same_cols)
        result["same_world_rows"] = {n: len(t) for n, t in same.tables.items()}
        if restore_from:
            factory2, cols2 = build(clock)
            ctx2 = NativeContext(feature_factory=factory2)
            restore_checkpoint(os.path.join(out, restore_from), ctx2)
            result["restored_probe"] = probe(factory2, cols2)
            result["restored_rows"] = {n: len(t) for n, t in factory2.tables.items()}
            save_checkpoint(os.path.join(out, f"resharded{world}.pt"), ctx2, global_step=STEPS)
        torch.save(result, os.path.join(out, f"w{world}_rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _fault_worker(rank, world, port, out, mode):
    _init(rank, world, port, timeout_s=30)
    clock = Clock()
    factory, cols = build(clock, timeout=3 if mode == "stall" else 10)
    ctx = NativeContext(feature_factory=factory)
    train_step(factory, cols, clock, 0, rank_batch(0, world, rank))
    save_checkpoint(os.path.join(out, "good.pt"), ctx, global_step=1)
    t0 = time.monotonic()
    try:
        if mode in ("exchange", "stall"):
            feats, _ = rank_batch(1, world, rank)
            factory.lookup(feats)
            if rank == 1 and mode == "exchange":
                os._exit(3)  # dies between the lookup and the gradient exchange
            if rank == 1:
                time.sleep(8)  # alive but silent: only the timeout can end rank 0's wait
                os._exit(3)
            factory.apply_gradients([])
        else:
            if rank == 1:
                import monolith_torch.checkpoint as ck

                real = ck._write_file

                def die_in_shard(path, payload):
                    if ".shard-" in path:
                        os._exit(3)  # killed while writing its shard
                    return real(path, payload)

                ck._write_file = die_in_shard
            save_checkpoint(os.path.join(out, "bad.pt"), ctx, global_step=2)
        msg = "no error"
    except (ShardExchangeError, OSError, RuntimeError) as e:
        msg = f"{type(e).__name__}: {e}"
    with open(os.path.join(out, f"fault_rank{rank}.txt"), "w") as f:
        f.write(f"{time.monotonic() - t0:.3f}\n{msg}")
    os._exit(0)  # the group is broken; skip its teardown


def _mismatch_worker(rank, world, port, out):
    _init(rank, world, port, timeout_s=30)
    factory, cols = build(Clock(), timeout=10)
    if rank == 1:
        factory.create_feature_slot(FeatureSlotConfig(name="extra", slot_id=9)).add_feature_slice(2)
    try:
        factory.lookup(rank_batch(0, world, rank)[0])
        msg = "no error"
    except RuntimeError as e:
        msg = str(e)
    with open(os.path.join(out, f"mismatch_rank{rank}.txt"), "w") as f:
        f.write(msg)
    torch.distributed.destroy_process_group()


def _step_model(clock, sharded):
    factory, cols = build(clock, sharded=sharded)
    ctx = NativeContext(feature_factory=factory)
    dense = torch.nn.Linear(sum(cols[f][2] for f in FEATURES), 1)
    with torch.no_grad():
        dense.weight.copy_(torch.linspace(-1.0, 1.0, dense.weight.numel()).view_as(dense.weight))
        dense.bias.fill_(0.1)
    return factory, cols, ctx, dense, torch.optim.SGD(dense.parameters(), lr=0.1, momentum=0.9)


def _train_with_step_function(clock, model, batches, use_allreduce):
    from monolith_torch.step.api import GradClipType, apply_gradients_with_var_optimizer

    factory, cols, ctx, dense, opt = model
    for s, (feats, y) in enumerate(batches):
        clock.now = T0 + s * DAY * 35 // 100
        factory.lookup(feats)
        x = torch.cat([cols[f][0].embedding_lookup(cols[f][1]) for f in FEATURES], 1)
        pred = dense(x).squeeze(1) + cols["a"][0].get_bias().squeeze(1)
        loss = (pred - y).square().mean()
        apply_gradients_with_var_optimizer(
            ctx, [cols[f][0] for f in FEATURES], opt, loss, clip_type=GradClipType.NoClip,
            use_allreduce=use_allreduce, model=dense,
        )
    return {"tables": factory.state_dict()["tables"], "dense": {k: v.clone() for k, v in dense.state_dict().items()}}


def _step_worker(rank, world, port, out):
    _init(rank, world, port)
    try:
        clock = Clock()
        result = _train_with_step_function(
            clock, _step_model(clock, True), [rank_batch(s, world, rank) for s in range(STEPS)], True)
        torch.save(result, os.path.join(out, f"step_rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _spawn(target, world, args, timeout=100):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
        return [p.exitcode for p in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)


# --- checks -------------------------------------------------------------------


def _sorted(state):
    order = torch.argsort(state["keys"])
    corder = torch.argsort(state["cand_keys"])
    out = {}
    for k, v in state.items():
        if k == "slices":
            continue
        out[k] = v[corder] if k.startswith("cand_") else v[order]
    return out


def _union(states):
    return {k: torch.cat([s[k] for s in states]) for k in states[0] if k != "slices"}


def _reference():
    clock = Clock()
    factory, cols = build(clock, sharded=False)
    return factory, cols, clock


def _check_equal_single_process(world, results):
    ref, cols, clock = _reference()
    for s in range(STEPS):
        train_step(ref, cols, clock, s, rank_batch(s, world, None))
    ref_state = ref.state_dict()["tables"]
    assert ref.tables["ftrl"].evict_expired(clock.now) == 0
    for name, expected in ref_state.items():
        shards = [r["state"]["tables"][name] for r in results]
        for rank, sh in enumerate(shards):
            assert bool((shard_owner(sh["keys"], world) == rank).all()), f"{name}: rank {rank} holds foreign rows"
            assert bool((shard_owner(sh["cand_keys"], world) == rank).all())
        got, want = _sorted(_union(shards)), _sorted(expected)
        assert torch.equal(got["keys"], want["keys"]), name
        for k in ("counts", "times", "cand_keys", "cand_counts", "cand_times"):
            assert torch.equal(got[k], want[k]), (name, k)
        for k in want:
            if k == "values" or k.startswith("state."):
                scale = float(want[k].abs().max()) if want[k].numel() else 1.0
                torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6 * scale, msg=f"{name} {k}")
    # The scenario exercises what it claims to.
    assert ref_state["adagrad"]["cand_keys"].numel() > 0, "occurrence filter never held an id back"
    assert ref_state["ftrl"]["keys"].numel() < torch.unique(
        torch.cat([rank_batch(s, world, None)[0]["c"].values for s in range(STEPS)])).numel(), "nothing expired"
    ref_probe = probe(ref, cols)
    for r in results:
        assert r["same_world_rows"] == {n: len(t["keys"]) for n, t in r["state"]["tables"].items()}
        for f in FEATURES:
            assert torch.equal(r["same_world_probe"][f], r["probe"][f]), f
        for f in FEATURES:
            torch.testing.assert_close(r["probe"][f], ref_probe[f], rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(240)
def test_two_then_three_ranks_equal_one_process_and_reshard(tmp_path):
    codes = _spawn(_train_worker, 2, (str(tmp_path), None))
    assert codes == [0, 0], codes
    w2 = [torch.load(tmp_path / f"w2_rank{r}.pt") for r in range(2)]
    _check_equal_single_process(2, w2)

    codes = _spawn(_train_worker, 3, (str(tmp_path), "ckpt2.pt"))
    assert codes == [0, 0, 0], codes
    w3 = [torch.load(tmp_path / f"w3_rank{r}.pt") for r in range(3)]
    _check_equal_single_process(3, w3)

    # 2 -> 3: every rank's lookups of the restored tables equal the 2-rank lookups bit for bit.
    for r in w3:
        for f in FEATURES:
            assert torch.equal(r["restored_probe"][f], w2[0]["probe"][f]), f
    total_rows = {n: sum(len(r["state"]["tables"][n]["keys"]) for r in w2) for n in w2[0]["state"]["tables"]}
    assert {n: sum(r["restored_rows"][n] for r in w3) for n in total_rows} == total_rows
    assert all(0 < r["restored_rows"]["adam"] < total_rows["adam"] for r in w3)  # really split three ways
    # 3 -> 1: one process restores the 3-shard checkpoint; same lookups again.
    one, cols = build(Clock(), sharded=False)
    restore_checkpoint(tmp_path / "resharded3.pt", NativeContext(feature_factory=one))
    got = probe(one, cols)
    for f in FEATURES:
        assert torch.equal(got[f], w2[0]["probe"][f]), f
    shard_files = sorted(tmp_path.glob("resharded3.pt.*.shard-*-of-00003"))
    assert len(shard_files) == 3

    # A shard replaced by another valid file, or missing: a clear error naming it, nothing restored.
    fresh, _ = build(Clock(), sharded=False)
    before = fresh.state_dict()["tables"]["sgd"]["keys"].clone()
    other = sorted(tmp_path.glob("ckpt3.pt.*.shard-00001-of-00003"))[0]
    good = shard_files[1].read_bytes()
    shard_files[1].write_bytes(other.read_bytes())
    with pytest.raises(CheckpointError, match=r"shard .*shard-00001-of-00003.* does not match the manifest"):
        restore_checkpoint(tmp_path / "resharded3.pt", NativeContext(feature_factory=fresh))
    shard_files[1].write_bytes(good)
    shard_files[2].unlink()
    with pytest.raises(CheckpointError, match="shard-00002-of-00003"):
        restore_checkpoint(tmp_path / "resharded3.pt", NativeContext(feature_factory=fresh))
    assert torch.equal(fresh.state_dict()["tables"]["sgd"]["keys"], before)


@pytest.mark.timeout(90)
def test_step_function_on_two_ranks_equals_one_process(tmp_path):
    # apply_gradients_with_var_optimizer unchanged: dense allreduce + sharded embedding updates.
    assert _spawn(_step_worker, 2, (str(tmp_path),)) == [0, 0]
    ranks = [torch.load(tmp_path / f"step_rank{r}.pt") for r in range(2)]
    clock = Clock()
    ref = _train_with_step_function(
        clock, _step_model(clock, False), [rank_batch(s, 2, None) for s in range(STEPS)], False)
    for k, v in ref["dense"].items():
        assert torch.equal(ranks[0]["dense"][k], ranks[1]["dense"][k]), k
        torch.testing.assert_close(ranks[0]["dense"][k], v, rtol=1e-5, atol=1e-6)
    for name, expected in ref["tables"].items():
        got, want = _sorted(_union([r["tables"][name] for r in ranks])), _sorted(expected)
        assert torch.equal(got["keys"], want["keys"]) and torch.equal(got["counts"], want["counts"]), name
        scale = float(want["values"].abs().max())
        torch.testing.assert_close(got["values"], want["values"], rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.timeout(90)
def test_rank_dying_mid_exchange_fails_the_others_quickly(tmp_path):
    _spawn(_fault_worker, 2, (str(tmp_path), "exchange"), timeout=60)
    seconds, msg = (tmp_path / "fault_rank0.txt").read_text().split("\n", 1)
    assert msg.startswith("ShardExchangeError: sharded tables: gradients"), msg
    assert float(seconds) < 15.0, seconds  # exchange_timeout_s is 10


@pytest.mark.timeout(90)
def test_silent_rank_fails_the_others_within_the_exchange_timeout(tmp_path):
    _spawn(_fault_worker, 2, (str(tmp_path), "stall"), timeout=60)
    seconds, msg = (tmp_path / "fault_rank0.txt").read_text().split("\n", 1)
    assert msg.startswith("ShardExchangeError: sharded tables: gradients"), msg
    assert "timeout of 3 s" in msg
    assert 2.5 < float(seconds) < 7.0, seconds


@pytest.mark.timeout(90)
def test_ranks_with_different_slots_fail_clearly(tmp_path):
    codes = _spawn(_mismatch_worker, 2, (str(tmp_path),), timeout=60)
    assert codes == [0, 0], codes
    for rank in range(2):
        msg = (tmp_path / f"mismatch_rank{rank}.txt").read_text()
        assert msg.startswith("sharded tables: ranks [1] registered other slots than rank 0"), msg


@pytest.mark.timeout(90)
def test_rank_dying_while_saving_leaves_no_manifest(tmp_path):
    _spawn(_fault_worker, 2, (str(tmp_path), "save"), timeout=60)
    seconds, msg = (tmp_path / "fault_rank0.txt").read_text().split("\n", 1)
    assert msg != "no error" and float(seconds) < 35.0, (seconds, msg)
    assert not (tmp_path / "bad.pt").exists()
    one, _ = build(Clock(), sharded=False)
    assert restore_checkpoint(tmp_path / "good.pt", NativeContext(feature_factory=one)) == 1
    assert len(one.tables["sgd"]) > 0


# --- the CLI under torchrun -----------------------------------------------------------

SMALL = ["--batch-size", "256", "--hidden", "32,16", "--emb-dim", "8", "--eval-batch-size", "1024"]


@pytest.mark.timeout(240)
def test_torchrun_sharded_tables_end_consistent(tmp_path):
    import json
    import re
    import subprocess

    from monolith_torch.checkpoint import load_checkpoint_file
    from monolith_torch.train.config import load_config
    from monolith_torch.train.data import generate_criteo
    from monolith_torch.train.trainer import Trainer, state_digest

    train = generate_criteo(str(tmp_path / "train.tsv"), 3000, seed=3, part=0)
    evaluation = generate_criteo(str(tmp_path / "eval.tsv"), 600, seed=3, part=1)
    run = tmp_path / "run"
    flags = ["--run-dir", str(run), "--data", train, "--eval-data", evaluation, *SMALL]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "monolith_torch", "train", *flags, "--sharded-tables", "--max-steps", "5",
           "--checkpoint-every", "2", "--dist-timeout-s", "60"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=220)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d) state digest ([0-9a-f]{64})", proc.stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 5 and 0.0 <= metrics["eval_auc"] <= 1.0

    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    manifests = [n for n in ckpts if n.endswith(".pt")]
    assert manifests == ["ckpt-0000000002.pt", "ckpt-0000000004.pt", "ckpt-0000000005.pt"], ckpts
    assert len(ckpts) == 3 * 3, ckpts  # a manifest and two shards each, no strays
    manifest = load_checkpoint_file(str(run / "checkpoints" / manifests[-1]))
    assert manifest["shards"]["world"] == 2 and manifest["tables"] is None
    shards = [load_checkpoint_file(str(run / "checkpoints" / f))["tables"] for f in manifest["shards"]["files"]]
    for rank, shard in enumerate(shards):
        for table in shard["tables"].values():
            assert table["keys"].numel() > 0
            assert bool((shard_owner(table["keys"], 2) == rank).all())

    # One process restores the shards: the union is exactly the state the ranks reported.
    cfg = load_config(None, {"run_dir": str(run), "batch_size": 256, "hidden": "32,16", "emb_dim": 8})
    trainer = Trainer(cfg, show_progress=False)
    assert trainer.restore_latest(required=True) == 5
    assert state_digest(trainer.factory, trainer.model) == digests["0"]
