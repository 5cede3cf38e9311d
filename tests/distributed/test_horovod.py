"""The Horovod backend under ``horovodrun -np 2 --gloo -H localhost:2``.

Skipped unless ``horovod.torch`` imports (build it with ``scripts/build_horovod.sh``).
The tests launch ``horovodrun`` themselves (this file, run as a script, is the worker),
each with a timeout that kills the whole process group.

The matrix worker joins Horovod and, through ``init_distributed``, a torch.distributed
gloo group with the same ranks, then averages the same gradients with both backends:
the parent checks that the ranks agree bitwise, that Horovod equals the torch backend
bitwise (see the test for why that holds on 2 ranks), and that the result is within
tolerance of an average it computes itself in float64. Tolerances as in
test_allreduce_multiprocess.py: 1e-6 relative for 32/64-bit wires, ``world * eps / 2``
for a 16-bit wire (fp16 compression, 16-bit gradients). The training test runs the CLI
under horovodrun and under torchrun on the same data and compares the state digests.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FUSIONS = ("none", "one", "grouped")
COMPRESSIONS = (None, "fp16")
WORLD = 2
SCALES = {"tensor": 0.5, "float": 2.0}
# fusion "one" also with tiny buckets, so one dtype spans several hvd.allreduce calls.
CASES = [(f, c, None) for f in FUSIONS for c in COMPRESSIONS] + [
    ("one", c, 256) for c in COMPRESSIONS
]


# --- the worker -------------------------------------------------------------------------


def make_grads(rank: int) -> list[torch.Tensor | None]:
    """Rank-specific positive gradients of every awkward kind; same layout on every rank."""
    g = torch.Generator().manual_seed(2000 + rank)

    def pos(*shape, dtype=torch.float32):
        return (0.5 + torch.rand(shape, generator=g)).to(dtype)

    return [
        pos(37),
        None,
        pos(),  # 0-d
        torch.empty(0),
        pos(4, 5, dtype=torch.float64),
        pos(3, 17, dtype=torch.float16),
        pos(9, dtype=torch.bfloat16),  # Horovod has no bfloat16: travels as float32
        pos(2, 3) * 20000.0,  # fp16 holds one; a sum of two overflows unless divided first
        pos(300),
        pos(6, 4).t(),  # non-contiguous
    ]


def _worker(out: Path) -> None:
    import horovod.torch as hvd

    from monolith_torch.distributed.allreduce import AllreduceConfig, allreduce_cond
    from monolith_torch.train.launch import init_distributed

    torch.set_num_threads(1)
    rank, world = init_distributed(60.0)
    assert (rank, world) == (hvd.rank(), hvd.size()) == (int(os.environ["HOROVOD_RANK"]), WORLD)
    grads = make_grads(rank)
    results: dict = {}
    for fusion, compression, cap in CASES:
        for backend in ("horovod", "torch"):
            cfg = AllreduceConfig(
                fusion=fusion, compression=compression, backend=backend, bucket_cap_bytes=cap
            )
            if not cfg.is_active():
                raise RuntimeError(f"{backend} config not active on rank {rank}")
            for how, scale in SCALES.items():
                s = torch.tensor(scale) if how == "tensor" else scale
                results[(fusion, compression, cap, backend, how)] = allreduce_cond(grads, s, cfg)
    results["inputs_after"] = grads
    torch.save(results, out / f"rank{rank}.pt")
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    hvd.shutdown()


# --- the parent -------------------------------------------------------------------------

try:
    import horovod.torch  # noqa: F401 - only whether it imports

    _NO_HOROVOD = None
except ImportError as err:  # not built: see scripts/build_horovod.sh
    _NO_HOROVOD = err
needs_horovod = pytest.mark.skipif(
    _NO_HOROVOD is not None,
    reason=f"horovod.torch not importable ({_NO_HOROVOD}); build it with scripts/build_horovod.sh",
)
HOROVODRUN = Path(sys.executable).with_name("horovodrun")


def _run(cmd: list[str], timeout_s: float, extra_env: dict | None = None) -> str:
    """Runs ``cmd`` in its own session; on timeout kills the session and fails.

    The environment is this one without launcher and MONOLITH_ variables, plus
    ``extra_env``. Killing horovodrun's session also ends its workers: Horovod's
    per-worker middleman kills them when horovodrun dies, even by SIGKILL.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONOLITH_", "HOROVOD_"))}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(extra_env or {}))
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd[0]} did not finish within {timeout_s}s:\n{out[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, f"{cmd[:3]} failed ({proc.returncode}):\n{out[-4000:]}"
    return out


def _horovodrun(args: list[str], timeout_s: float, extra_env: dict | None = None) -> str:
    """Runs ``horovodrun -np 2 --gloo -H localhost:2 <args>`` with :func:`_run`."""
    if not HOROVODRUN.exists():
        pytest.skip(f"{HOROVODRUN} not found (horovod installed without its launcher)")
    cmd = [str(HOROVODRUN), "-np", str(WORLD), "--gloo", "-H", f"localhost:{WORLD}", *args]
    return _run(cmd, timeout_s, extra_env)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    out = tmp_path_factory.mktemp("horovod_matrix")
    _horovodrun(
        [sys.executable, __file__, str(out)],
        timeout_s=150,
        extra_env={"MONOLITH_WITH_HOROVOD": "1"},
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _tolerance(dtype: torch.dtype, compression: str | None) -> float:
    wire = torch.float16 if compression == "fp16" and torch.finfo(dtype).bits > 16 else dtype
    if torch.finfo(wire).bits == 16:
        return WORLD * torch.finfo(wire).eps / 2
    return 1e-6


@needs_horovod
@pytest.mark.timeout(200)
@pytest.mark.parametrize(("fusion", "compression", "cap"), CASES, ids=str)
def test_horovod_matches_torch_backend_and_agrees_on_both_ranks(matrix, fusion, compression, cap):
    per_rank = [make_grads(r) for r in range(WORLD)]
    for how, scale in SCALES.items():
        hvd_outs = [matrix[r][(fusion, compression, cap, "horovod", how)] for r in range(WORLD)]
        torch_out = matrix[0][(fusion, compression, cap, "torch", how)]
        for i, ref in enumerate(per_rank[0]):
            if ref is None:
                assert hvd_outs[0][i] is None and hvd_outs[1][i] is None
                continue
            got = hvd_outs[0][i]
            assert torch.equal(hvd_outs[1][i], got), f"ranks disagree on grads[{i}]"
            assert got.dtype == ref.dtype and got.shape == ref.shape, f"grads[{i}]"
            assert torch.isfinite(got).all(), f"grads[{i}] overflowed"
            tol = _tolerance(ref.dtype, compression)
            expected = sum(g[i].double() for g in per_rank) / WORLD * scale
            torch.testing.assert_close(got.double(), expected, rtol=tol, atol=0)
            # Same data through torch.distributed: bitwise equal on 2 ranks, where the
            # Average's division by 2 is exact, a float32 sum of two bfloat16 values is
            # exact, and both backends round each fp16 value and the fp16 sum once.
            assert torch.equal(got, torch_out[i]), f"grads[{i}] differs from the torch backend"


@needs_horovod
@pytest.mark.timeout(200)
def test_horovod_leaves_inputs_untouched(matrix):
    for r in range(WORLD):
        for got, ref in zip(matrix[r]["inputs_after"], make_grads(r), strict=True):
            assert (got is None and ref is None) or torch.equal(got, ref)


TRAIN_FLAGS = ["--batch-size", "256", "--hidden", "32,16", "--emb-dim", "8", "--max-steps", "4"]
TRAIN_FLAGS += ["--dist-timeout-s", "60"]
DIGEST = re.compile(r"rank (\d) state digest ([0-9a-f]{64})")


@needs_horovod
@pytest.mark.timeout(400)
def test_train_under_horovodrun_ends_identical_on_both_ranks_and_as_torchrun(tmp_path):
    from monolith_torch.train.data import generate_criteo

    data = generate_criteo(str(tmp_path / "train.tsv"), 3000, seed=3)
    train = [sys.executable, "-m", "monolith_torch", "train", "--data", data, *TRAIN_FLAGS]
    out = _horovodrun(
        [*train, "--run-dir", str(tmp_path / "hvd")],
        timeout_s=240,
        extra_env={"MONOLITH_WITH_HOROVOD": "1", "HOROVOD_TIMELINE": str(tmp_path / "tl.json")},
    )
    digests = dict(DIGEST.findall(out))
    assert set(digests) == {"0", "1"}, out[-3000:]
    assert digests["0"] == digests["1"]
    # The dense gradients went through Horovod (allreduce_cond's op names in its timeline).
    assert "allreduce.monolith." in (tmp_path / "tl.json").read_text()
    # The same job under torchrun (torch.distributed backend) ends in the same state.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    out = _run([*torchrun, str(WORLD), *train[1:], "--run-dir", str(tmp_path / "torch")], 140)
    assert dict(DIGEST.findall(out)) == digests


@needs_horovod
@pytest.mark.timeout(60)
def test_monolith_with_horovod_outside_horovodrun_is_a_clear_error():
    # In a child process: hvd.init() starts Horovod's background thread for good.
    code = "from monolith_torch.train.launch import init_distributed; init_distributed(5.0)"
    env = dict(os.environ, MONOLITH_WITH_HOROVOD="1", WORLD_SIZE="2")
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=50
    )
    assert proc.returncode != 0
    assert "RuntimeError" in proc.stderr and "WORLD_SIZE=2" in proc.stderr, proc.stderr[-2000:]


def test_horovodrun_without_monolith_with_horovod_is_a_clear_error(monkeypatch):
    from monolith_torch.train.launch import init_distributed

    for name in ("WORLD_SIZE", "MONOLITH_WITH_HOROVOD", "MONOLITH_WITH_BYTEPS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOROVOD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"HOROVOD_SIZE=2.*MONOLITH_WITH_HOROVOD=1"):
        init_distributed(5.0)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
