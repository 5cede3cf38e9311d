"""The training step across real processes: gloo on 127.0.0.1, 2 and 3 ranks.

A small CTR model (two dense layers, SGD with momentum; a ReduceSum column with a
bias and a FirstN sequence column on replicated hash tables; loss the per-rank mean
BCE) is trained for a few steps with ``use_allreduce=True`` through
``apply_gradients_with_var_optimizer``. The test spawns its own workers (this file,
run as a script), once per world size; each worker runs every clip mode x fusion x
compression case, rebuilding the model between cases. The parent then checks that

- every rank holds bit-identical dense parameters and embedding tables,
- without a binding clip, the ranks equal ONE process (this library, no process
  group) trained on the concatenated batch,
- in every mode, the ranks equal Monolith's clip-then-average: each rank's gradients
  clipped by that rank's own global norm, averaged, then ``dense_weight_decay`` added
  once. That reference is a mirror of the model in plain torch autograd (its own
  combiners, Adagrad and SGD updates, no monolith_torch step code); with a binding
  clip, adding the decay before the clip or the scale would change the result,
- the deferred-clip path is the one taken (``deferred_clip``, ``allreduced``), and
  summaries (writer on rank 0 only) take the non-deferred path with the same result.

Tolerances. float32: each path sums the same per-example terms in another order
(per-rank means averaged vs one global mean, a per-id index_add over gathered rows vs
one scatter), a few ulps per step: ``rtol=1e-6`` plus an ``atol`` of 1e-6 times the
tensor's largest magnitude, since entries that pass near zero (uniform [-0.1, 0.1]
embeddings) have no meaningful relative error. fp16/bf16 compression rounds only the
dense gradients on the wire: each rank's prescaled gradient and each of the
``world - 1`` partial sums is rounded once, so an averaged element is off by at most
``e = world * eps / 2`` times ``G`` (the largest dense gradient magnitude, measured on
the reference). With SGD and momentum ``m``, step k's velocity carries at most
``e * (1 + m + ... + m**(k-1))``, so after ``STEPS`` steps a dense parameter is off by
at most ``lr * e * G * sum_k (1 - m**k) / (1 - m)``; embeddings see that error only
second hand (through the dense weights in their gradients), and we allow twice the
bound for both. Measured errors are 1-15% of the bound (the bound takes every
rounding at its worst and every gradient at the largest magnitude).
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from monolith_torch.core.ragged import RaggedTensor
from monolith_torch.distributed.allreduce import AllreduceConfig
from monolith_torch.embedding import entry
from monolith_torch.embedding.factory import HashTableFeatureFactory
from monolith_torch.embedding.feature import FeatureColumn, FeatureSlotConfig
from monolith_torch.step.api import GradClipType, apply_gradients_with_var_optimizer
from monolith_torch.step.context import NativeContext

FUSIONS = ("none", "one", "grouped")
COMPRESSIONS = (None, "fp16", "bf16")
STEPS = 4
PER_RANK = 8
SEQ_LEN = 3
USER_VOCAB, HIST_VOCAB = 24, 20  # small: ranks share many ids
DENSE_LR, MOMENTUM = 0.1, 0.9
BIAS_LR, VEC_LR, VEC_ACC0 = 0.05, 0.1, 0.1
LOOSE_CLIP = 1e3  # far above every norm: clip factor exactly 1
TIGHT_CLIP = 0.05  # below every rank's norm at every step (the test checks it)
WEIGHT_DECAY = 0.05
# mode -> step keyword arguments
MODES = {
    "noclip": {"clip_type": GradClipType.NoClip},
    "loose": {"clip_type": GradClipType.ClipByGlobalNorm, "clip_norm": LOOSE_CLIP},
    "tight": {"clip_type": GradClipType.ClipByGlobalNorm, "clip_norm": TIGHT_CLIP},
    "noclip_wd": {"clip_type": GradClipType.NoClip, "dense_weight_decay": WEIGHT_DECAY},
    "tight_wd": {
        "clip_type": GradClipType.ClipByGlobalNorm, "clip_norm": TIGHT_CLIP, "dense_weight_decay": WEIGHT_DECAY,
    },
}
SUMMARY_MODE = "tight"  # the summaries case: a binding clip, so deferring or not matters


# --- data and model, shared by workers, the single process and the mirror -------------


@dataclass
class Batch:
    user: RaggedTensor  # [B, ragged] ids, ReduceSum
    hist: RaggedTensor  # [B, ragged] ids, FirstN(SEQ_LEN)
    x: torch.Tensor  # [B, 2] dense features
    y: torch.Tensor  # [B] labels in {0, 1}


def _ragged_rows(values: torch.Tensor, lengths: torch.Tensor, lo: int, hi: int) -> RaggedTensor:
    splits = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return RaggedTensor.from_row_lengths(values[int(splits[lo]) : int(splits[hi])], lengths[lo:hi])


def make_batch(step: int, world: int, rank: int | None) -> Batch:
    """Rank ``rank``'s shard of the step's global batch (``None``: the whole batch)."""
    g = torch.Generator().manual_seed(1000 * world + step)
    n = world * PER_RANK
    user_len = torch.randint(0, 4, (n,), generator=g)
    user_ids = torch.randint(0, USER_VOCAB, (int(user_len.sum()),), generator=g)
    hist_len = torch.randint(0, SEQ_LEN + 3, (n,), generator=g)  # some rows longer than SEQ_LEN
    hist_ids = torch.randint(0, HIST_VOCAB, (int(hist_len.sum()),), generator=g)
    x = torch.randn(n, 2, generator=g)
    y = torch.randint(0, 2, (n,), generator=g).float()
    lo, hi = (0, n) if rank is None else (rank * PER_RANK, (rank + 1) * PER_RANK)
    return Batch(_ragged_rows(user_ids, user_len, lo, hi), _ragged_rows(hist_ids, hist_len, lo, hi), x[lo:hi], y[lo:hi])


class Tower(torch.nn.Module):
    """Two dense layers over [user vec (4), hist sequence (SEQ_LEN * 3), x (2)]."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(4 + SEQ_LEN * 3 + 2, 8)
        self.fc2 = torch.nn.Linear(8, 1)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, user_vec, hist_seq, x, bias):
        h = torch.tanh(self.fc1(torch.cat([user_vec, hist_seq.flatten(1), x], dim=1)))
        return self.fc2(h).squeeze(1) + bias


@dataclass
class Model:
    factory: HashTableFeatureFactory
    ctx: NativeContext
    tower: Tower
    opt: torch.optim.Optimizer
    user: FeatureColumn
    hist: FeatureColumn
    user_vec: object
    user_bias: object
    hist_vec: object


def build_model(summary_writer=None) -> Model:
    factory = HashTableFeatureFactory(seed=11, time_fn=lambda: 1_700_000_000.0)
    vec_opt = entry.AdagradOptimizer(learning_rate=VEC_LR, initial_accumulator_value=VEC_ACC0)
    init = entry.RandomUniformInitializer(-0.1, 0.1)
    user_slot = factory.create_feature_slot(FeatureSlotConfig(
        name="user", slot_id=1, has_bias=True, bias_optimizer=entry.SgdOptimizer(learning_rate=BIAS_LR),
        default_vec_initializer=init, default_vec_optimizer=vec_opt,
    ))
    hist_slot = factory.create_feature_slot(FeatureSlotConfig(
        name="hist", slot_id=2, default_vec_initializer=init, default_vec_optimizer=vec_opt,
    ))
    user_vec = user_slot.add_feature_slice(4)
    hist_vec = hist_slot.add_feature_slice(3)
    user = FeatureColumn(user_slot, "user")
    hist = FeatureColumn(hist_slot, "hist", FeatureColumn.first_n(SEQ_LEN))
    tower = Tower()
    opt = torch.optim.SGD(tower.parameters(), lr=DENSE_LR, momentum=MOMENTUM)
    ctx = NativeContext(feature_factory=factory, summary_writer=summary_writer)
    return Model(factory, ctx, tower, opt, user, hist, user_vec, user_slot.get_bias_slice(), hist_vec)


def library_loss(m: Model, batch: Batch) -> torch.Tensor:
    m.factory.lookup({"user": batch.user, "hist": batch.hist})
    logits = m.tower(
        m.user.embedding_lookup(m.user_vec), m.hist.embedding_lookup(m.hist_vec), batch.x,
        m.user.get_bias().squeeze(1),
    )
    return F.binary_cross_entropy_with_logits(logits, batch.y)


def table_state(factory: HashTableFeatureFactory) -> dict:
    """Each table's ids, values and optimizer state, sorted by id (times and counts left out:
    occurrence counts are per rank by design)."""
    out = {}
    for name, table in factory.tables.items():
        st = table.state_dict()
        order = torch.argsort(st["keys"])
        out[name] = {k: v[order] for k, v in st.items() if k in ("keys", "values") or k.startswith("state.")}
    return out


class RecordingWriter:
    """A summary writer that remembers the tags it was given."""

    def __init__(self):
        self.tags: list[str] = []

    def add_scalar(self, tag, value, step):
        self.tags.append(tag)

    def add_histogram(self, tag, values, step):
        self.tags.append(tag)


def train_library(world: int, rank: int | None, mode: str, allreduce_config=None, summarize=False,
                  writer=None) -> dict:
    """STEPS steps through the library's step function; ``rank=None`` trains one process on the whole batch."""
    m = build_model(writer)
    global_step = torch.zeros((), dtype=torch.int64)
    flags = []
    for step in range(STEPS):
        loss = library_loss(m, make_batch(step, world, rank))
        res = apply_gradients_with_var_optimizer(
            m.ctx, [m.user, m.hist], m.opt, loss, global_step=global_step, use_allreduce=True,
            grads_and_vars_summary=summarize, model=m.tower, allreduce_config=allreduce_config, **MODES[mode],
        )
        norm = None if res.global_norm is None else float(res.global_norm)
        flags.append({"applied": res.applied, "allreduced": res.allreduced, "deferred_clip": res.deferred_clip,
                      "global_norm": norm})
    return {
        "dense": {k: v.detach().clone() for k, v in m.tower.state_dict().items()},
        "tables": table_state(m.factory),
        "flags": flags,
        "global_step": int(global_step),
        "summary_tags": None if writer is None else list(writer.tags),
    }


# --- the mirror: clip-then-average in plain torch -----------------------------------------


def _first_n(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[N, D] per-id rows -> [B, SEQ_LEN, D], the first SEQ_LEN of each row, zero padded."""
    out, start = [], 0
    pad = values.new_zeros(values.shape[1])
    for n in lengths.tolist():
        rows = [values[start + j] for j in range(min(n, SEQ_LEN))]
        out.append(torch.stack(rows + [pad] * (SEQ_LEN - len(rows))))
        start += n
    return torch.stack(out)


def train_mirror(world: int, mode: str) -> dict:
    """Monolith's semantics, by hand: per rank, gradients of its mean loss, clipped by its
    own global norm (dense + per-occurrence embedding gradients); then the average;
    then weight decay; then SGD-momentum on the tower, SGD on biases, Adagrad on vectors."""
    kwargs = MODES[mode]
    clip = kwargs.get("clip_norm") if kwargs["clip_type"] == GradClipType.ClipByGlobalNorm else None
    decay = kwargs.get("dense_weight_decay", 0.0)
    ref = build_model()  # for initial values and column layout only
    tower = ref.tower
    opt = torch.optim.SGD(tower.parameters(), lr=DENSE_LR, momentum=MOMENTUM)
    params = list(tower.parameters())
    tables = {
        "user": ref.factory.tables["user"].lookup(torch.arange(USER_VOCAB)),
        "hist": ref.factory.tables["hist"].lookup(torch.arange(HIST_VOCAB)),
    }
    acc = {name: torch.full_like(t, VEC_ACC0) for name, t in tables.items()}
    bias_col, user_vec, hist_vec = ref.user_bias.start, ref.user_vec, ref.hist_vec
    norms, max_dense_grad = [], 0.0
    for step in range(STEPS):
        dense_sum = [torch.zeros_like(p) for p in params]
        emb_sum = {name: torch.zeros_like(t) for name, t in tables.items()}
        step_norms = []
        for r in range(world):
            b = make_batch(step, world, r)
            leaf_u = tables["user"][b.user.values].clone().requires_grad_(True)
            leaf_h = tables["hist"][b.hist.values].clone().requires_grad_(True)
            pooled = torch.zeros(PER_RANK, leaf_u.shape[1]).index_add(0, b.user.value_rowids(), leaf_u)
            seq = _first_n(leaf_h[:, hist_vec.start : hist_vec.end], b.hist.row_lengths())
            logits = tower(pooled[:, user_vec.start : user_vec.end], seq, b.x, pooled[:, bias_col])
            loss = F.binary_cross_entropy_with_logits(logits, b.y)
            grads = torch.autograd.grad(loss, params + [leaf_u, leaf_h])
            norm = torch.sqrt(sum(g.double().square().sum() for g in grads))
            step_norms.append(float(norm))
            scale = 1.0 if clip is None else min(1.0, clip / float(norm))
            for acc_g, g in zip(dense_sum, grads[: len(params)], strict=True):
                acc_g.add_(g, alpha=scale)
                max_dense_grad = max(max_dense_grad, float(g.abs().max()))
            emb_sum["user"].index_add_(0, b.user.values, grads[-2] * scale)
            emb_sum["hist"].index_add_(0, b.hist.values, grads[-1] * scale)
        norms.append(step_norms)
        with torch.no_grad():
            for p, g in zip(params, dense_sum, strict=True):
                p.grad = g / world + decay * p
            opt.step()
            for name, total in emb_sum.items():
                g = total / world
                w, a = tables[name], acc[name]
                vec = user_vec if name == "user" else hist_vec
                cols = slice(vec.start, vec.end)
                a[:, cols] += g[:, cols].square()
                w[:, cols] -= VEC_LR * g[:, cols] / a[:, cols].sqrt()
                if name == "user":
                    w[:, bias_col] -= BIAS_LR * g[:, bias_col]
    return {"dense": {k: v.detach().clone() for k, v in tower.state_dict().items()}, "tables": tables,
            "norms": norms, "max_dense_grad": max_dense_grad}


# --- the workers ---------------------------------------------------------------------------


def _worker(rank: int, world: int, port: int, out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results, t0 = {}, time.monotonic()
        for mode in MODES:
            for fusion in FUSIONS:
                for compression in COMPRESSIONS:
                    cfg = AllreduceConfig(fusion=fusion, compression=compression,
                                          timeout=datetime.timedelta(seconds=30))
                    results[(mode, fusion, compression)] = train_library(world, rank, mode, cfg)
        for fusion in FUSIONS:
            cfg = AllreduceConfig(fusion=fusion, timeout=datetime.timedelta(seconds=30))
            writer = RecordingWriter() if rank == 0 else None
            results[("summary", fusion, None)] = train_library(world, rank, SUMMARY_MODE, cfg, True, writer)
        results["elapsed"] = time.monotonic() - t0
        torch.save(results, out / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


# --- the parent ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(world: int, out: Path, wait_s: float) -> list[dict]:
    """One process per rank; waits at most ``wait_s`` in all and always kills every one."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, __file__, str(r), str(world), str(port), str(out)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for r in range(world)
    ]
    logs = {}
    deadline = time.monotonic() + wait_s
    try:
        for r, p in enumerate(procs):
            try:
                logs[r] = p.communicate(timeout=max(deadline - time.monotonic(), 0.1))[0]
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {r} of world {world} did not finish within {wait_s}s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r].decode(errors='replace')[-3000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def trained(request, tmp_path_factory):
    """(world, per-rank results, single-process results per mode, mirror results per mode)."""
    world = request.param
    ranks = run_workers(world, tmp_path_factory.mktemp(f"step{world}"), wait_s=70.0)
    single = {mode: train_library(world, None, mode) for mode in MODES}
    mirror = {mode: train_mirror(world, mode) for mode in MODES}
    return world, ranks, single, mirror


def _close(got: torch.Tensor, want: torch.Tensor, atol_factor: float, rtol: float, what: str,
           atol: float | None = None) -> None:
    """``assert_close`` with ``atol`` (default: ``atol_factor`` times the reference's largest magnitude)."""
    if atol is None:
        atol = atol_factor * float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _compression_atol(world: int, compression: str | None, mirror_ref: dict) -> float | None:
    """Absolute bound for a 16-bit wire (module docstring); None for float32."""
    if compression is None:
        return None
    eps = torch.finfo(torch.float16 if compression == "fp16" else torch.bfloat16).eps
    momentum_sum = sum((1 - MOMENTUM**k) / (1 - MOMENTUM) for k in range(1, STEPS + 1))
    return 2 * DENSE_LR * momentum_sum * world * eps / 2 * mirror_ref["max_dense_grad"]


def _assert_matches(got: dict, want_dense: dict, want_rows, world: int, compression, mirror_ref, what: str) -> None:
    """Dense parameters and embedding values close to a reference; ``want_rows(name, keys)``
    gives the reference rows of ``keys``."""
    atol = _compression_atol(world, compression, mirror_ref)
    for name, ref in want_dense.items():
        if atol is None:
            _close(got["dense"][name], ref, 1e-6, 1e-6, f"{what} dense {name}")
        else:
            _close(got["dense"][name], ref, 0.0, 0.0, f"{what} dense {name}", atol=atol)
    for name, st in got["tables"].items():
        ref = want_rows(name, st["keys"])
        if atol is None:
            _close(st["values"], ref, 1e-6, 1e-6, f"{what} table {name}")
        else:
            _close(st["values"], ref, 0.0, 0.0, f"{what} table {name}", atol=atol)


def _assert_ranks_identical(ranks: list[dict], key) -> None:
    first = ranks[0][key]
    for r, res in enumerate(ranks[1:], start=1):
        for name, t in first["dense"].items():
            assert torch.equal(res[key]["dense"][name], t), f"{key}: rank {r} dense {name} differs from rank 0"
        for table, st in first["tables"].items():
            for field_name, t in st.items():
                assert torch.equal(res[key]["tables"][table][field_name], t), (
                    f"{key}: rank {r} table {table!r} {field_name} differs from rank 0"
                )
        assert res[key]["global_step"] == STEPS


@pytest.mark.timeout(120)
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("mode", list(MODES))
def test_ranks_identical_and_equal_reference(trained, mode):
    world, ranks, single, mirror = trained
    for fusion in FUSIONS:
        for compression in COMPRESSIONS:
            key = (mode, fusion, compression)
            _assert_ranks_identical(ranks, key)
            got = ranks[0][key]
            clip = MODES[mode].get("clip_norm")
            for r, res in enumerate(ranks):
                for s, f in enumerate(res[key]["flags"]):
                    assert f["applied"] and f["allreduced"], f"{key} rank {r} step {s}: {f}"
                    # The dense clip is folded into the allreduce exactly when there is a clip factor.
                    assert f["deferred_clip"] is (clip is not None), f"{key} rank {r} step {s}: {f}"
                    if clip == TIGHT_CLIP:
                        assert f["global_norm"] > TIGHT_CLIP, f"{key}: the clip does not bind on rank {r}"
                    elif clip == LOOSE_CLIP:
                        assert f["global_norm"] < LOOSE_CLIP
            what = f"world {world} {key}"
            for name, st in got["tables"].items():  # every id of the global batch has a row
                assert torch.equal(st["keys"], single["noclip"]["tables"][name]["keys"]), f"{what}: {name} ids"
            # Against the mirror (Monolith's clip-then-average, decay once after the average)...
            ref = mirror[mode]
            if clip is not None:  # each rank's norm is the mirror's norm of that rank's shard
                for r, res in enumerate(ranks):
                    for s, f in enumerate(res[key]["flags"]):
                        assert f["global_norm"] == pytest.approx(ref["norms"][s][r], rel=1e-5 if compression
                                                                 is None else 1e-2)
            _assert_matches(got, ref["dense"], lambda name, keys, ref=ref: ref["tables"][name][keys],
                            world, compression, mirror["noclip"], what + " vs mirror")
            if not mode.startswith("tight"):
                # ... and, where the clip does not bind, against one process on the whole batch.
                rows = {name: st["values"] for name, st in single[mode]["tables"].items()}
                _assert_matches(got, single[mode]["dense"], lambda name, keys, rows=rows: rows[name],
                                world, compression, mirror["noclip"], what + " vs one process")
            if compression is not None:
                # The 16-bit wire was really used: the result is not the float32 one.
                plain = ranks[0][(mode, fusion, None)]["dense"]["fc1.weight"]
                assert not torch.equal(got["dense"]["fc1.weight"], plain), f"{what}: no rounding from compression"
            elif not mode.startswith("tight"):
                for name, st in got["tables"].items():
                    for field_name, t in st.items():
                        if field_name.startswith("state."):
                            _close(t, single[mode]["tables"][name][field_name], 1e-6, 1e-6,
                                   f"{what} {name} {field_name}")


@pytest.mark.timeout(120)
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_mirror_matches_single_process(trained):
    # The hand-written reference agrees with the library where the two must agree (no
    # clip: the average of per-rank means is the mean over the whole batch).
    world, _, single, mirror = trained
    ref = mirror["noclip"]
    _assert_matches(single["noclip"], ref["dense"], lambda name, keys: ref["tables"][name][keys], world, None,
                    ref, f"world {world} single vs mirror")


@pytest.mark.timeout(120)
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_weight_decay_added_once_after_the_average(trained):
    world, ranks, single, mirror = trained
    # The decayed runs are compared above with a mirror that adds the decay once, after
    # the average; this makes sure the decay is large enough for that to mean something.
    for a, b in (("noclip", "noclip_wd"), ("tight", "tight_wd")):
        delta = (ranks[0][(a, "one", None)]["dense"]["fc1.weight"]
                 - ranks[0][(b, "one", None)]["dense"]["fc1.weight"]).abs().max()
        assert float(delta) > 1e-3, f"world {world}: weight decay had no visible effect ({a} vs {b})"


@pytest.mark.timeout(120)
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("fusion", FUSIONS)
def test_summaries_take_the_non_deferred_path_with_the_same_result(trained, fusion):
    world, ranks, _, mirror = trained
    key = ("summary", fusion, None)
    _assert_ranks_identical(ranks, key)
    for r, res in enumerate(ranks):
        for f in res[key]["flags"]:
            assert f["applied"] and f["allreduced"] and not f["deferred_clip"], f"rank {r}: {f}"
    tags = ranks[0][key]["summary_tags"]
    assert "global_gradient_norm" in tags and "variable_gradient" in tags
    assert all(res[key]["summary_tags"] is None for res in ranks[1:])
    ref = mirror[SUMMARY_MODE]
    _assert_matches(ranks[0][key], ref["dense"], lambda name, keys: ref["tables"][name][keys], world, None,
                    mirror["noclip"], f"world {world} {key}")
    # Same as the deferred path up to float32 rounding.
    deferred = ranks[0][(SUMMARY_MODE, fusion, None)]
    for name, t in deferred["dense"].items():
        _close(ranks[0][key]["dense"][name], t, 1e-6, 1e-6, f"{key} vs deferred {name}")


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
