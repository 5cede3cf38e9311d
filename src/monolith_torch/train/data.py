"""Criteo-format data: a deterministic generator with a planted signal; what every reader shares.

A Criteo line is ``label \\t I1..I13 \\t C1..C26``: a 0/1 label, 13 integer
counts and 26 categorical features as hex ids, any field but the label may be
empty. ``generate_criteo`` writes such files (the default run's data);
``generate_criteo_stream`` writes a folder of them that drifts (new ids
appear, popularity shifts), for real-time training. They are read like any
other data, by ``train.readers.read_schema_batches`` with the Criteo preset
schema (``train.schema.criteo_schema``).

What the readers share lives here: ``DataError`` (an unreadable file, or a
malformed line under ``strict``), ``ReadStats`` (rows read and malformed lines
by reason) and ``expand_paths`` (the files a ``--data`` argument names).
"""

from __future__ import annotations

import glob
import gzip
import math
import numbers
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from monolith_torch.core.fileio import atomic_write
from monolith_torch.core.hashing import MASK64, splitmix64_np

__all__ = [
    "NUM_INT",
    "NUM_CAT",
    "INT_COLUMNS",
    "CAT_COLUMNS",
    "COLUMNS",
    "SEQ_FEATURE",
    "DataError",
    "ReadStats",
    "expand_paths",
    "generate_criteo",
    "generate_criteo_stream",
]

NUM_INT = 13
NUM_CAT = 26
INT_COLUMNS = [f"I{i}" for i in range(1, NUM_INT + 1)]
CAT_COLUMNS = [f"C{i}" for i in range(1, NUM_CAT + 1)]
COLUMNS = ["label", *INT_COLUMNS, *CAT_COLUMNS]
# The Criteo preset's sequence feature: the non-empty ids of C14..C26 in order.
SEQ_FEATURE = "seq"


class DataError(ValueError):
    """A data file that cannot be read, or a malformed line under ``strict``."""


@dataclass
class ReadStats:
    """Counts of what a reader saw; ``malformed`` maps a reason to its count."""

    rows: int = 0
    malformed: dict[str, int] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.malformed.values())

    def add(self, reason: str, count: int = 1) -> None:
        self.malformed[reason] = self.malformed.get(reason, 0) + count

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.rows} rows read, no malformed lines"
        detail = ", ".join(f"{n} {reason}" for reason, n in sorted(self.malformed.items()))
        return f"{self.rows} rows read, {self.skipped} malformed lines skipped ({detail})"


# ---------------------------------------------------------------- paths


def expand_paths(data: str | Sequence[str]) -> list[str]:
    """Files named by a path, a directory, a glob, or a list of those; sorted, deduplicated.

    Raises:
        DataError: a pattern that matches nothing.
    """
    patterns = [data] if isinstance(data, str) else list(data)
    out: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            matches = sorted(
                os.path.join(pattern, f) for f in os.listdir(pattern) if not f.startswith(".")
            )
        else:
            matches = sorted(glob.glob(pattern))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise DataError(f"--data: no file matches {pattern!r}")
        out.extend(m for m in matches if m not in out)
    return out


# ---------------------------------------------------------------- the generator


@dataclass(frozen=True)
class _World:
    """The hidden truth of the generator: vocabularies and per-id weights."""

    vocab: np.ndarray
    missing: np.ndarray
    weights: list[np.ndarray]
    pair: np.ndarray
    dense_w: np.ndarray
    scales: np.ndarray  # the std of each feature's weights; the stream's new ids draw theirs with it


def _make_world(seed: int) -> _World:
    rng = np.random.default_rng(seed)
    vocab = np.round(10 ** rng.uniform(1.0, 4.7, NUM_CAT)).astype(np.int64)
    missing = rng.uniform(0.0, 0.25, NUM_CAT)
    scales = rng.uniform(0.2, 0.9, NUM_CAT)
    weights = [rng.normal(0.0, s, v) for s, v in zip(scales, vocab, strict=True)]
    pair = rng.normal(0.0, 0.9, (32, 32))
    dense_w = rng.normal(0.0, 0.35, NUM_INT)
    return _World(vocab, missing, weights, pair, dense_w, scales)


def _generate_rows(
    world: _World, rng: np.random.Generator, n: int, seed: int, slide: np.ndarray | None = None
) -> dict[str, pa.Array]:
    """``n`` rows as Arrow string columns by name.

    ``slide`` (n,), the stream's drift: row i's window of active ids has slid
    by ``slide[i]`` vocabularies. A popularity rank r then names id key
    ``r - floor(slide * vocab)``: the most popular ids are the newest (negative
    keys, weights from ``_new_id_weights``), and the oldest fall off the tail.
    None: no drift (key = rank), as ``generate_criteo`` writes.
    """
    cols: dict[str, pa.Array] = {}
    logit = np.full(n, -1.2)
    idx = np.empty((n, NUM_CAT), dtype=np.int64)
    for f in range(NUM_CAT):
        # Skewed popularity: small ranks are frequent, as real id streams are.
        idx[:, f] = np.minimum((world.vocab[f] * rng.random(n) ** 2.5).astype(np.int64), world.vocab[f] - 1)
        if slide is not None:
            idx[:, f] -= np.floor(slide * world.vocab[f]).astype(np.int64)
        present = rng.random(n) >= world.missing[f]
        logit += np.where(present, _id_weights(world, f, idx[:, f], seed), 0.0)
        salt = np.uint64((seed << 20) & MASK64)
        hex_ids = splitmix64_np(idx[:, f].astype(np.uint64) * np.uint64(NUM_CAT) + np.uint64(f) + salt)
        cols[CAT_COLUMNS[f]] = _where_present(present, _hex8(hex_ids))
    # A planted interaction between the first two features (think user x item).
    logit += world.pair[idx[:, 0] % 32, idx[:, 1] % 32]
    counts = np.floor(rng.lognormal(1.0, 1.2, (n, NUM_INT))).astype(np.int64)
    logit += (np.log1p(counts) - 1.3) @ world.dense_w
    for j, name in enumerate(INT_COLUMNS):
        present = rng.random(n) >= 0.1
        cols[name] = _where_present(present, pa.array(counts[:, j]).cast(pa.string()))
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    cols["label"] = pa.array(labels).cast(pa.string())
    return cols


def _id_weights(world: _World, f: int, keys: np.ndarray, seed: int) -> np.ndarray:
    """Hidden weights of feature ``f``'s id keys: the world's table, or ``_new_id_weights`` for keys < 0."""
    table = world.weights[f]
    new = keys < 0
    if not new.any():
        return table[keys]
    return np.where(new, _new_id_weights(world, f, keys, seed), table[np.maximum(keys, 0)])


def _new_id_weights(world: _World, f: int, keys: np.ndarray, seed: int) -> np.ndarray:
    """Normal weights of the stream's scale for feature ``f``, a hash of (seed, f, key): no table, no limit.

    Box-Muller on two splitmix64 draws, so a key has the same weight in every
    file of a stream, however far the stream runs.
    """
    base = keys.astype(np.uint64) * np.uint64(NUM_CAT) + np.uint64(f)
    # A tag of its own, so a weight is not a function of the printed hex id (salted ``seed << 20``).
    h1 = splitmix64_np(base ^ np.uint64(((seed << 24) ^ 0x5EED_D21F7) & MASK64))
    h2 = splitmix64_np(h1 ^ np.uint64(0x9E37_79B9_7F4A_7C15))
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]: log(u1) is finite
    u2 = (h2 >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return world.scales[f] * np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _hex8(values: np.ndarray) -> pa.Array:
    """The low 32 bits of ``values`` as 8-digit lower-case hex strings (vectorized)."""
    shifts = np.arange(28, -1, -4, dtype=np.uint64)
    digits = _HEX_DIGITS[((values[:, None] >> shifts[None, :]) & np.uint64(0xF)).astype(np.intp)]
    return pa.array(np.ascontiguousarray(digits).view("S8").ravel()).cast(pa.string())


def _where_present(present: np.ndarray, text: pa.Array) -> pa.Array:
    return pc.if_else(pa.array(present), text, pa.scalar("", pa.string()))


def generate_criteo(path: str, num_rows: int, seed: int = 0, part: int = 0, chunk_rows: int = 100_000) -> str:
    """Writes ``num_rows`` deterministic Criteo-format lines with a learnable signal to ``path``.

    Every file generated with the same ``seed`` shares one hidden truth (ids
    and their weights), so a train and an eval file (``part`` 0 and 1) are two
    samples of the same distribution. A ``path`` ending in ``.gz`` is gzipped.
    Written with ``core.fileio.atomic_write``: an error or interrupt
    (``KeyboardInterrupt``, or an exception a signal handler raises) leaves no
    file behind, and ``path`` only ever holds a complete file.

    Returns:
        ``path``.

    Raises:
        ValueError: ``num_rows`` < 1.
        SymlinkTargetError: ``path`` is a symbolic link.
    """
    path = os.fspath(path)
    if num_rows < 1:
        raise ValueError(f"Invalid num_rows: {num_rows!r} (expected >= 1)")
    world = _make_world(seed)
    rng = np.random.default_rng([seed, part, 1])
    with atomic_write(path, "wb") as out:
        if path.endswith(".gz"):
            # The gzip header names the final file, not the temp file.
            with gzip.GzipFile(os.path.basename(path), "wb", fileobj=out) as packed:
                _write_rows(packed, world, rng, num_rows, seed, chunk_rows)
        else:
            _write_rows(out, world, rng, num_rows, seed, chunk_rows)
    return path


def _write_rows(
    out, world: _World, rng: np.random.Generator, num_rows: int, seed: int, chunk_rows: int,
    drift: float = 0.0, first_row: int = 0,
) -> None:
    for start in range(0, num_rows, chunk_rows):
        n = min(chunk_rows, num_rows - start)
        slide = None
        if drift:
            slide = drift * (first_row + start + np.arange(n, dtype=np.float64)) / _TURNOVER_ROWS
        cols = _generate_rows(world, rng, n, seed, slide)
        buf = pa.BufferOutputStream()
        pacsv.write_csv(
            pa.table({name: cols[name] for name in COLUMNS}), buf,
            pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none"),
        )
        out.write(buf.getvalue())


# ---------------------------------------------------------------- the drifting stream

# The stream's clock is its row count: at drift 1 every categorical feature's
# window of active ids slides by its whole vocabulary per this many rows.
_TURNOVER_ROWS = 500_000
_MAX_FILES = 100_000  # part-00000 .. part-99999: names sort in stream order


def generate_criteo_stream(
    out_dir: str,
    num_files: int,
    rows_per_file: int,
    seed: int = 0,
    drift: float = 1.0,
    first: int = 0,
    interval_s: float = 0.0,
    stop: threading.Event | None = None,
) -> list[str]:
    """Writes a Criteo-format stream that drifts: ``part-<k:05d>.tsv`` for k = first .. first + num_files - 1.

    Lines as ``generate_criteo`` writes them, so the Criteo preset reads them.
    Row i of file k is the stream's row ``k * rows_per_file + i``, and that
    position alone sets the drift: at ``drift`` 1 each categorical feature's
    window of active ids slides by its vocabulary per 500,000 rows. New
    ids enter as the most popular and fade as newer ones arrive (the oldest
    leave at the tail), so later files hold ids the first never did, with
    hidden weights of their own, and the frequent ids change over time.
    ``drift`` 0: every file samples ``generate_criteo``'s distribution for
    ``seed``. The dense features, the missing rates and the planted pair
    interaction do not drift. File k depends only on (seed, drift,
    rows_per_file, k): a second call with ``first`` set continues the stream.

    Each file is written with ``core.fileio.atomic_write`` (a ``.part-*.tmp-*``
    dot-file renamed into place), so a reader that skips dot-files, as
    ``expand_paths`` does, sees whole files only; an interrupt leaves the
    files already written intact and no temp file.

    Args:
        out_dir: the folder, created if missing; existing files of the same
            names are replaced.
        num_files: files to write, >= 1.
        rows_per_file: rows per file, >= 1.
        seed: the hidden truth (ids, weights), as ``generate_criteo``'s.
        drift: the drift rate, >= 0 (0: stationary).
        first: the index of the first file.
        interval_s: seconds to wait between files (a live trickle), >= 0.
        stop: ends the stream early when set (checked before each file and
            during the wait).

    Returns:
        The paths written, in stream order.

    Raises:
        ValueError: a bad ``num_files``, ``rows_per_file``, ``seed``,
            ``drift``, ``first`` or ``interval_s``; nothing is written.
        OSError: ``out_dir`` cannot be created or a file cannot be written.
    """
    _check_stream_args(num_files, rows_per_file, seed, drift, first, interval_s)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    world = _make_world(seed)
    written: list[str] = []
    for k in range(first, first + num_files):
        if written and interval_s > 0:
            if stop is None:
                time.sleep(interval_s)
            elif stop.wait(interval_s):
                break
        if stop is not None and stop.is_set():
            break
        path = os.path.join(out_dir, f"part-{k:05d}.tsv")
        with atomic_write(path, "wb") as out:
            _write_rows(out, world, np.random.default_rng([seed, k, 2]), rows_per_file, seed, 100_000,
                        float(drift), k * rows_per_file)
        written.append(path)
    return written


def _check_stream_args(num_files, rows_per_file, seed, drift, first, interval_s) -> None:
    for name, value, low in (("num_files", num_files, 1), ("rows_per_file", rows_per_file, 1),
                             ("seed", seed, 0), ("first", first, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= {low})")
    for name, value in (("drift", drift), ("interval_s", interval_s)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"Invalid {name}: {value!r} (expected a finite number >= 0)")
    if first + num_files > _MAX_FILES:
        raise ValueError(f"Invalid first: {first!r} (expected first + num_files <= {_MAX_FILES}, "
                         "so that the 5-digit file names sort in stream order)")
