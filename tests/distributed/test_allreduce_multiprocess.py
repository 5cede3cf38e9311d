"""allreduce_cond across real processes: gloo on 127.0.0.1, 2 and 3 ranks.

The test spawns its own workers (this file, run as a script), so plain ``pytest`` is
enough. Each world size is spawned once and runs every fusion x compression case;
the parent checks the saved results against an average it computes itself.

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
