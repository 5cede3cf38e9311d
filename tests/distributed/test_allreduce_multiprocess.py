"""allreduce_cond across real processes: gloo on 127.0.0.1, 2 and 3 ranks.

The test spawns its own workers (this file, run as a script), so plain ``pytest`` is
enough. Each world size is spawned once and runs every fusion x compression case;
the parent checks the saved results against an average it computes itself.

The persistent buckets (``GradientBuckets``) run on 2 ranks: gradients written by a
backward into their views are reduced in place and must equal the packing path bit
for bit, for every fusion x compression x bucket size x scale. On 2 ranks every
element is ``a + b`` whatever the layout, so bitwise equality is the right check; on
3 or more ranks gloo's ring sums chunks in a position-dependent order, and only
fusion ``"one"`` with the same config keeps the layout (and the bits).

Tolerances, for positive inputs (no cancellation): float32/float64 paths divide by the
world size, then sum, so each output is within a few ulps: 1e-6 relative. A 16-bit
wire (fp16/bf16 compression, or 16-bit gradients) rounds each prescaled value once and
each of the ``world - 1`` partial sums once, so the relative error is at most about
``world * eps`` with eps = 2**-11 (fp16) or 2**-8 (bf16).
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

FUSIONS = ("none", "one", "grouped")
COMPRESSIONS = (None, "fp16", "bf16")
BUCKET_CAPS = (None, 256, 8 * 2**20)
SCALE = 0.5
FAIL_TIMEOUT_S = 2.0


# --- the workers ------------------------------------------------------------------------


def make_grads(rank: int) -> list[torch.Tensor | None]:
    """Rank-specific, positive gradients of every awkward kind; same layout on every rank."""
    g = torch.Generator().manual_seed(1000 + rank)

    def pos(*shape, dtype=torch.float32):
        return (0.5 + torch.rand(shape, generator=g)).to(dtype)

    return [
        pos(37),
        None,
        pos(),  # 0-d
        torch.empty(0),  # empty
        pos(4, 5, dtype=torch.float64),
        None,
        pos(3, 17, dtype=torch.float16),
        pos(9, dtype=torch.bfloat16),
        pos(2, 3) * 20000.0,  # fp16 holds one, and the average times 2; a sum of 3 overflows
        pos(1000),
        pos(6, 4).t(),  # non-contiguous
    ]


def _init(rank: int, world: int, port: int, timeout_s: float) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _worker(
    scenario: str, rank: int, world: int, port: int, out: Path, fusion: str = "one"
) -> None:
    import torch.distributed as dist

    from monolith_torch.distributed.allreduce import AllreduceConfig, allreduce_cond

    torch.set_num_threads(1)
    if scenario == "absent":
        # One rank of `world` is never started: init itself must time out.
        t0 = time.monotonic()
        try:
            _init(rank, world, port, FAIL_TIMEOUT_S)
            result = {"error": None}
        except Exception as err:  # noqa: BLE001 - recorded for the parent to judge
            result = {"error": f"{type(err).__name__}: {err}"}
        result["elapsed"] = time.monotonic() - t0
        torch.save(result, out / f"rank{rank}.pt")
        os._exit(0)
    _init(rank, world, port, 30.0)
    grads = make_grads(rank)
    if scenario == "matrix":
        results = {}
        for fusion in FUSIONS:
            for compression in COMPRESSIONS:
                cfg = AllreduceConfig(
                    fusion=fusion, compression=compression, timeout=datetime.timedelta(seconds=20)
                )
                assert cfg.is_active()
                results[(fusion, compression, "tensor")] = allreduce_cond(
                    grads, torch.tensor(SCALE), cfg
                )
                results[(fusion, compression, "float")] = allreduce_cond(grads, 2.0, cfg)
        results["all_none"] = allreduce_cond([None, None], 3.0, AllreduceConfig(fusion="one"))
        results["inputs_after"] = grads
        torch.save(results, out / f"rank{rank}.pt")
        dist.barrier()
        dist.destroy_process_group()
        return
    if scenario == "buckets":
        torch.save(_buckets_cases(grads), out / f"rank{rank}.pt")
        dist.barrier()
        dist.destroy_process_group()
        return
    # Failure scenarios: the last rank dies or stalls; the others must fail quickly.
    victim = world - 1
    dist.barrier()
    if rank == victim:
        if scenario == "die":
            os._exit(17)
        time.sleep(30)  # "stall": never joins the collective; the parent kills it
        os._exit(0)
    cfg = AllreduceConfig(fusion=fusion, timeout=datetime.timedelta(seconds=FAIL_TIMEOUT_S))
    t0 = time.monotonic()
    try:
        allreduce_cond(grads, 1.0, cfg)
        result = {"error": None}
    except RuntimeError as err:
        result = {"error": str(err), "type": type(err).__name__}
    result["elapsed"] = time.monotonic() - t0
    torch.save(result, out / f"rank{rank}.pt")
    os._exit(0)  # the group is broken; skip teardown that could wait on the dead peer


def _backward_into(buckets, params, grads) -> None:
    """Writes ``grads`` into the parameters' ``.grad`` by a real backward."""
    buckets.zero_grad_()
    loss = sum((p * g.detach()).sum() for p, g in zip(params, grads, strict=True))
    loss.backward()


def _buckets_cases(grads: list) -> dict:
    """Persistent buckets against the packing path; results and checks for the parent."""
    from monolith_torch.distributed.allreduce import AllreduceConfig, allreduce_cond
    from monolith_torch.distributed.gradient_buckets import GradientBuckets

    dense = [g for g in grads if g is not None]
    params = [torch.zeros(g.shape, dtype=g.dtype, requires_grad=True) for g in dense]
    results: dict = {}
    for fusion in FUSIONS:
        for compression in COMPRESSIONS:
            for cap in BUCKET_CAPS:
                cfg = AllreduceConfig(
                    fusion=fusion,
                    compression=compression,
                    bucket_cap_bytes=cap,
                    timeout=datetime.timedelta(seconds=20),
                )
                buckets = GradientBuckets(params, cfg)
                for how, scale in (("tensor", torch.tensor(SCALE)), ("float", 2.0)):
                    packed = allreduce_cond(grads, scale, cfg)
                    _backward_into(buckets, params, dense)
                    views_kept = all(
                        p.grad is v for p, v in zip(params, buckets.views, strict=True)
                    )
                    got = allreduce_cond([p.grad for p in params], scale, cfg, buckets=buckets)
                    in_place = all(g is v for g, v in zip(got, buckets.views, strict=True))
                    results[(fusion, compression, cap, how)] = {
                        "packed": [g for g in packed if g is not None],
                        "buckets": [g.clone() for g in got],
                        "views_kept": views_kept,
                        "in_place": in_place,
                    }
    # One gradient that is not a view (as a stage that replaces a tensor leaves it):
    # its bucket is packed, the others stay in place, the values are the same.
    cfg = AllreduceConfig(fusion="one", bucket_cap_bytes=256)
    buckets = GradientBuckets(params, cfg)
    _backward_into(buckets, params, dense)
    mixed = [p.grad for p in params]
    mixed[-1] = mixed[-1].clone()
    got = allreduce_cond(mixed, torch.tensor(SCALE), cfg, buckets=buckets)
    owner = next(k for k, idx in enumerate(buckets.bucket_positions) if len(params) - 1 in idx)
    results["partial"] = {
        "packed": [g for g in allreduce_cond(grads, torch.tensor(SCALE), cfg) if g is not None],
        "buckets": [g.clone() for g in got],
        "in_place": [got[i] is buckets.views[i] for i in range(len(params))],
        "owner": list(buckets.bucket_positions[owner]),
    }
    # skip: nothing communicated, the views scaled in place.
    _backward_into(buckets, params, dense)
    got = allreduce_cond([p.grad for p in params], 3.0, AllreduceConfig(skip=True), buckets=buckets)
    results["skip"] = [g.clone() for g in got]
    return results


# --- the parent -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(
    scenario: str, world: int, out: Path, ranks=None, wait_s: float = 45.0, fusion: str = "one"
) -> dict:
    """Starts one process per rank, waits for the given ranks, always kills every one."""
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    procs = {
        r: subprocess.Popen(
            [sys.executable, __file__, scenario, str(r), str(world), str(port), str(out), fusion],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in (range(world) if ranks is None else ranks)
    }
    waited = [r for r in procs if not (scenario in ("die", "stall") and r == world - 1)]
    logs = {}
    deadline = time.monotonic() + wait_s
    try:
        for r in waited:
            try:
                logs[r] = procs[r].communicate(timeout=max(deadline - time.monotonic(), 0.1))[0]
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {r} of scenario {scenario!r} did not finish within {wait_s}s")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.communicate()
    for r in waited:
        assert procs[r].returncode == 0, (
            f"rank {r} failed:\n{logs[r].decode(errors='replace')[-3000:]}"
        )
    return {r: torch.load(out / f"rank{r}.pt", weights_only=False) for r in waited}


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def matrix(request, tmp_path_factory):
    world = request.param
    return world, run_workers("matrix", world, tmp_path_factory.mktemp(f"matrix{world}"))


def _tolerance(dtype: torch.dtype, compression: str | None, world: int) -> float:
    wire = dtype
    if compression is not None and torch.finfo(dtype).bits > 16:
        wire = torch.float16 if compression == "fp16" else torch.bfloat16
    if torch.finfo(wire).bits == 16:
        return world * torch.finfo(wire).eps / 2
    return 1e-6


@pytest.mark.timeout(90)
@pytest.mark.parametrize("compression", COMPRESSIONS, ids=str)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_and_compression_averages_identically_on_all_ranks(
    matrix, fusion, compression
):
    world, results = matrix
    per_rank = [make_grads(r) for r in range(world)]
    for how, scale in (("tensor", SCALE), ("float", 2.0)):
        outs = [results[r][(fusion, compression, how)] for r in range(world)]
        for i, ref in enumerate(per_rank[0]):
            if ref is None:
                assert all(o[i] is None for o in outs)
                continue
            # Bitwise identical on every rank.
            for o in outs[1:]:
                assert torch.equal(o[i], outs[0][i]), f"ranks disagree on grads[{i}]"
            got = outs[0][i]
            assert got.dtype == ref.dtype and got.shape == ref.shape
            expected = sum(per_rank[r][i].double() for r in range(world)) / world * scale
            tol = _tolerance(ref.dtype, compression, world)
            torch.testing.assert_close(got.double(), expected, rtol=tol, atol=0)
            assert torch.isfinite(got).all()


@pytest.mark.timeout(90)
def test_inputs_untouched_and_all_none_kept(matrix):
    world, results = matrix
    for r in range(world):
        assert results[r]["all_none"] == [None, None]
        for got, ref in zip(results[r]["inputs_after"], make_grads(r), strict=True):
            assert (got is None and ref is None) or torch.equal(got, ref)


@pytest.fixture(scope="module")
def buckets_results(tmp_path_factory):
    return run_workers("buckets", 2, tmp_path_factory.mktemp("buckets"), wait_s=120.0)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("cap", BUCKET_CAPS, ids=lambda c: f"cap{c}")
@pytest.mark.parametrize("compression", COMPRESSIONS, ids=str)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_buckets_in_place_equal_the_packing_path_bitwise(buckets_results, fusion, compression, cap):
    for how in ("tensor", "float"):
        per_rank = [buckets_results[r][(fusion, compression, cap, how)] for r in (0, 1)]
        for res in per_rank:
            assert res["views_kept"], "backward replaced a .grad view"
            assert res["in_place"], "allreduce_cond did not return the views"
            for got, ref in zip(res["buckets"], res["packed"], strict=True):
                assert got.dtype == ref.dtype and got.shape == ref.shape
                assert torch.equal(got, ref), f"{how} scale: in place differs from packing"
        for a, b in zip(per_rank[0]["buckets"], per_rank[1]["buckets"], strict=True):
            assert torch.equal(a, b), "ranks disagree"


@pytest.mark.timeout(150)
def test_buckets_pack_only_the_bucket_that_is_not_all_views(buckets_results):
    for r in (0, 1):
        res = buckets_results[r]["partial"]
        owner = set(res["owner"])
        assert res["in_place"] == [i not in owner for i in range(len(res["in_place"]))]
        for got, ref in zip(res["buckets"], res["packed"], strict=True):
            assert torch.equal(got, ref)


@pytest.mark.timeout(150)
def test_buckets_with_skip_scale_in_place_only(buckets_results):
    for r in (0, 1):
        dense = [g for g in make_grads(r) if g is not None]
        for got, g in zip(buckets_results[r]["skip"], dense, strict=True):
            torch.testing.assert_close(got, g * 3.0, rtol=0, atol=0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("scenario", "fusion"),
    [("die", "one"), ("stall", "one"), ("die", "grouped"), ("stall", "none")],
)
def test_peer_that_dies_or_stalls_fails_the_others_within_the_timeout(scenario, fusion, tmp_path):
    world = 3
    results = run_workers(scenario, world, tmp_path, wait_s=30.0, fusion=fusion)
    for r, res in results.items():
        assert res["error"] is not None, f"rank {r} did not fail"
        assert res["type"] == "RuntimeError"
        assert "allreduce_cond" in res["error"] and "timeout" in res["error"]
        assert res["elapsed"] < FAIL_TIMEOUT_S + 3.0, f"rank {r} took {res['elapsed']:.1f}s"


@pytest.mark.timeout(60)
def test_peer_that_never_starts_fails_init_within_its_timeout(tmp_path):
    # Not allreduce_cond's code: documents that the process group's timeout covers a
    # rank that never starts, so no rank hangs before the first collective either.
    results = run_workers("absent", 3, tmp_path, ranks=[0, 1], wait_s=30.0)
    for r, res in results.items():
        assert res["error"] is not None, f"rank {r} joined a group with a missing peer"
        assert res["elapsed"] < FAIL_TIMEOUT_S + 5.0, f"rank {r} took {res['elapsed']:.1f}s"


if __name__ == "__main__":
    _worker(
        sys.argv[1],
        int(sys.argv[2]),
        int(sys.argv[3]),
        int(sys.argv[4]),
        Path(sys.argv[5]),
        sys.argv[6],
    )
