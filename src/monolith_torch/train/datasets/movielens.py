"""MovieLens-100k, the real-data example: from the recbole wheel to Parquet splits and a ready schema.

The data comes from a registry package that ships it: the ``recbole==1.2.1``
wheel holds ``recbole/dataset_example/ml-100k/`` (``ml-100k.inter`` ratings,
``ml-100k.user`` users, ``ml-100k.item`` items: tab-separated, with typed
headers such as ``user_id:token``). ``prepare_movielens_100k`` fetches the
wheel with ``pip download --no-deps`` (or takes it from ``wheel_dir``),
checks its sha256, reads the three files straight out of the zip (nothing is
installed) and writes:

- ``train.parquet``, ``valid.parquet``, ``test.parquet``: one row per rating,
  sorted by timestamp (ties by user, then item); the first 80% of rows train
  (the last tenth of those is ``valid``), the last 20% are ``test``, so the
  model is tested on the future.
- ``schema.toml``: the ``[[features]]`` list that reads them.

Columns: ``label`` (1 when the rating is at least 4, else 0), ``timestamp``
(seconds), ``user_id``, ``item_id``, ``age_bucket`` (MovieLens-1M's
buckets: ``<18``, ``18-24``, ``25-34``, ``35-44``, ``45-49``, ``50-55``,
``56+``), ``gender``, ``occupation``, ``zip_prefix`` (the first two
characters of the zip code), ``release_year`` (null unless four digits) and
``genres`` (a list of strings). Features: user, item, age, gender,
occupation, zip, year as categorical ids, genres as a bag (mean-pooled).
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from monolith_torch.core.fileio import atomic_write, check_target
from monolith_torch.train.data import DataError
from monolith_torch.train.schema import load_schema, schema_to_toml

__all__ = [
    "RECBOLE_REQUIREMENT",
    "RECBOLE_WHEEL",
    "RECBOLE_WHEEL_SHA256",
    "SPLITS",
    "movielens_features",
    "prepare_movielens_100k",
]

RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
SPLITS = ("train", "valid", "test")
TEST_FRACTION = 0.2
VALID_FRACTION_OF_TRAIN = 0.1
_AGE_EDGES = np.array([18, 25, 35, 45, 50, 56])
_AGE_NAMES = np.array(["<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"], dtype=object)


def movielens_features(dim: int = 16, vec_lr: float = 0.5, bias_lr: float = 0.05) -> list[dict]:
    """The ``[[features]]`` list of the prepared files.

    Every id feature has its own slot: a bias slice (FTRL, ``bias_lr``,
    initial accumulator 1e-6, beta 1.0, zeros) and a vector slice of ``dim``
    (Adagrad, ``vec_lr``, initial accumulator 1.0, ``RandomUniform(-0.05, 0.05)``).
    The default ``vec_lr`` 0.5 is the best of a sweep on the validation split
    (docs/movielens.md).
    """
    table = {
        "dim": dim,
        "bias": True,
        "vec_optimizer": {"type": "adagrad", "learning_rate": vec_lr, "initial_accumulator_value": 1.0},
        "bias_optimizer": {"type": "ftrl", "learning_rate": bias_lr, "initial_accumulator_value": 1e-6, "beta": 1.0},
        "vec_initializer": {"type": "random_uniform", "minval": -0.05, "maxval": 0.05},
    }
    ids = [("user", "user_id", "int"), ("item", "item_id", "int"), ("age", "age_bucket", "string"),
           ("gender", "gender", "string"), ("occupation", "occupation", "string"),
           ("zip", "zip_prefix", "string"), ("year", "release_year", "int")]
    features: list[dict] = [{"name": "label", "kind": "label"},
                            {"name": "timestamp", "kind": "timestamp"}]
    features += [{"name": name, "kind": "categorical", "column": column, "dtype": dtype, **table}
                 for name, column, dtype in ids]
    features.append({"name": "genres", "kind": "multi", "column": "genres", "dtype": "string",
                     "combiner": "mean", **table})
    return features


# ---------------------------------------------------------------- the wheel


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(directory: str) -> str:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", RECBOLE_REQUIREMENT,
           "-d", directory]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DataError(f"cannot run {' '.join(cmd)!r}: {err}") from err
    path = os.path.join(directory, RECBOLE_WHEEL)
    if done.returncode != 0 or not os.path.isfile(path):
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise DataError(f"pip download {RECBOLE_REQUIREMENT} failed (exit {done.returncode}): {' | '.join(tail)}")
    return path


def _read_member(wheel: zipfile.ZipFile, kind: str, path: str) -> pa.Table:
    name = _MEMBER.format(kind)
    try:
        data = wheel.read(name)
    except KeyError:
        raise DataError(f"{path}: the wheel has no {name}") from None
    # "user_id:token" -> "user_id": recbole's typed headers. Every column is read
    # as text (a zip code such as 01040 keeps its leading zero).
    header = data.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace")
    names = [c.split(":", 1)[0] for c in header.split("\t")]
    return pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, use_threads=False),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in names},
                                             strings_can_be_null=False),
    )


# ---------------------------------------------------------------- the table


def _to_int(col: pa.Array, what: str) -> np.ndarray:
    try:
        return pc.cast(pc.cast(col, pa.float64()), pa.int64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid as err:
        raise DataError(f"ml-100k: {what} is not numeric ({err})") from None


def _lookup(keys: np.ndarray, table_keys: np.ndarray, what: str) -> np.ndarray:
    order = np.argsort(table_keys)
    pos = np.searchsorted(table_keys, keys, sorter=order)
    pos = np.minimum(pos, len(order) - 1)
    found = table_keys[order[pos]] == keys
    if not found.all():
        raise DataError(f"ml-100k: {int((~found).sum())} ratings name an unknown {what}")
    return order[pos]


def _ratings_table(inter: pa.Table, users: pa.Table, items: pa.Table) -> pa.Table:
    user = _to_int(inter["user_id"], "user_id")
    item = _to_int(inter["item_id"], "item_id")
    rating = pc.cast(inter["rating"], pa.float64()).to_numpy(zero_copy_only=False)
    timestamp = _to_int(inter["timestamp"], "timestamp")
    urow = _lookup(user, _to_int(users["user_id"], "user_id"), "user")
    irow = _lookup(item, _to_int(items["item_id"], "item_id"), "item")
    age = _to_int(users["age"], "age")
    age_bucket = _AGE_NAMES[np.searchsorted(_AGE_EDGES, age, side="right")]
    zip_prefix = pc.utf8_slice_codeunits(users["zip_code"], 0, 2)
    year_text = items["release_year"]
    # A few items have no year ("unkonwn", "V"): null, so the reader sees no id.
    is_year = pc.match_substring_regex(year_text, r"^[0-9]{4}$")
    year = pc.cast(pc.if_else(is_year, year_text, pa.scalar(None, pa.string())), pa.int64())
    genres = pc.split_pattern(items["class"], " ")
    order = np.lexsort((item, user, timestamp))  # by timestamp, then user, then item
    take_u, take_i = pa.array(urow[order]), pa.array(irow[order])
    return pa.table({
        "label": pa.array((rating[order] >= 4.0).astype(np.int8)),
        "timestamp": pa.array(timestamp[order]),
        "user_id": pa.array(user[order]),
        "item_id": pa.array(item[order]),
        "age_bucket": pa.array(age_bucket[urow[order]].tolist(), pa.string()),
        "gender": pc.take(users["gender"], take_u),
        "occupation": pc.take(users["occupation"], take_u),
        "zip_prefix": pc.take(zip_prefix, take_u),
        "release_year": pc.take(year, take_i),
        "genres": pc.take(genres, take_i),
    })


def split_rows(num_rows: int) -> dict[str, tuple[int, int]]:
    """Row ranges of the splits: the first 80% train+valid (valid its last tenth), the last 20% test."""
    train_valid = int(round(num_rows * (1.0 - TEST_FRACTION)))
    valid = int(round(train_valid * VALID_FRACTION_OF_TRAIN))
    return {"train": (0, train_valid - valid), "valid": (train_valid - valid, train_valid),
            "test": (train_valid, num_rows)}


def prepare_movielens_100k(out_dir: str | os.PathLike, wheel_dir: str | os.PathLike | None = None,
                           expected_sha256: str | None = RECBOLE_WHEEL_SHA256) -> dict[str, str]:
    """Writes MovieLens-100k's temporal splits as Parquet, and their schema, into ``out_dir``.

    Args:
        out_dir: created if missing; ``train.parquet``, ``valid.parquet``,
            ``test.parquet`` and ``schema.toml`` are each replaced atomically,
            ``schema.toml`` last (its presence means the set is complete).
        wheel_dir: where ``recbole-1.2.1-py3-none-any.whl`` is, or is
            downloaded to (a cache); None downloads into a temporary folder.
        expected_sha256: the wheel's sha256 (recbole 1.2.1's as published);
            None skips the check (a test's wheel).

    Returns:
        Split or ``"schema"`` -> the path written.

    Raises:
        DataError: pip cannot download the wheel, the wheel's hash differs,
            or it lacks a file or holds one that does not parse.
        SymlinkTargetError: an output path is a symbolic link (checked first).
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    outputs = {name: os.path.join(out_dir, f"{name}.parquet") for name in SPLITS}
    outputs["schema"] = os.path.join(out_dir, "schema.toml")
    for path in outputs.values():
        check_target(path)
    with tempfile.TemporaryDirectory(prefix="monolith-ml100k-") as tmp:
        directory = os.fspath(wheel_dir) if wheel_dir is not None else tmp
        os.makedirs(directory, exist_ok=True)
        wheel_path = os.path.join(directory, RECBOLE_WHEEL)
        if not os.path.isfile(wheel_path):
            wheel_path = _download_wheel(directory)
        if expected_sha256 is not None and _sha256(wheel_path) != expected_sha256:
            raise DataError(f"{wheel_path}: sha256 {_sha256(wheel_path)} is not recbole 1.2.1's ({expected_sha256})")
        try:
            with zipfile.ZipFile(wheel_path) as wheel:
                inter, users, items = (_read_member(wheel, kind, wheel_path) for kind in ("inter", "user", "item"))
        except (zipfile.BadZipFile, pa.ArrowException) as err:
            raise DataError(f"{wheel_path}: cannot read ({err})") from err
    for table, columns in ((inter, ("user_id", "item_id", "rating", "timestamp")),
                           (users, ("user_id", "age", "gender", "occupation", "zip_code")),
                           (items, ("item_id", "release_year", "class"))):
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise DataError(f"ml-100k: a file lacks columns {missing}")
    table = _ratings_table(inter, users, items)
    features = movielens_features()
    load_schema(features)  # what is written must load
    for name, (lo, hi) in split_rows(table.num_rows).items():
        with atomic_write(outputs[name], "wb") as f:
            pq.write_table(table.slice(lo, hi - lo), f)
    header = ("# MovieLens-100k (recbole 1.2.1's ml-100k), written by monolith-torch: label = rating >= 4;\n"
              "# rows sorted by timestamp; train/valid/test = 72% / 8% / 20%. See docs/movielens.md.\n\n")
    with atomic_write(outputs["schema"], "w") as f:
        f.write(header + schema_to_toml(features))
    return outputs
