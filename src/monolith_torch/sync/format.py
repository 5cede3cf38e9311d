"""The parameter-sync file format: full snapshots and deltas of a model, as folders of Arrow files.

Monolith pushes the embedding rows that changed to serving every few seconds
and the dense parameters less often. monolith-torch writes the same pushes as
*publications* into an export folder; any process (``monolith-torch serve``, or
a reader in another language) applies them in order. The layout, version 1::

    EXPORT_DIR/
      00000000000000000001.full/      a full snapshot: every row, dense parameters, model settings
        manifest.json
        dense.arrow
        table-0000.part-0000.arrow    ...one file per table (and part)
      00000000000000000002.delta/     the rows changed since publication 1, ids removed since
        manifest.json
        table-0000.part-0000.arrow
        removed-0000.part-0000.arrow
        dense.arrow                   only when the dense parameters went out with it

A publication is a folder named ``<20-digit seq>.<kind>``; the sequence
numbers of one run increase by one. It is written under a dot-name
(``.<name>.tmp-<hex>``), every file fsynced, then renamed into place, so a
reader never sees half of one; names starting with a dot are never
publications. ``manifest.json`` (UTF-8 JSON) holds::

    format "monolith-torch-sync", version 1, run_id, seq, kind ("full" | "delta"),
    base_seq (delta: the publication it applies on, always seq - 1; full: null),
    global_step, clock (the trainer's clock when written: seconds, wall or data
    time), wall_time, model_settings (full: what shapes the model; else null),
    tables: {slot name: {dim, rows (total after applying), parts: [FILE],
             removed: [FILE]}},
    dense: FILE or null,
    FILE = {file, sha256 (hex of the file's bytes), rows}

Every data file is an Arrow IPC *file* (``pyarrow.ipc``; readers exist for
C++, Java, Go, Rust, JavaScript, ...). Table parts: columns ``id`` (int64) and
``value`` (fixed_size_list<float32>[dim]), ids distinct within a table.
Removed parts: column ``id`` (int64). Dense: ``name`` (utf8), ``dtype``
(numpy name, e.g. ``float32``), ``shape`` (list<int64>), ``data``
(large_binary, the little-endian bytes in C order).

To apply a delta: check it is of the same run and ``base_seq`` is the
sequence number applied last; remove the ``removed`` ids, then upsert the
rows; replace the dense parameters it carries. A full snapshot replaces
everything. Trainers with sharded tables write one part per rank (the part
number is the rank).

May import ``monolith_torch.core``, numpy and pyarrow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from monolith_torch.core.fileio import read_limited

__all__ = [
    "FORMAT",
    "VERSION",
    "Publication",
    "SyncError",
    "TableRows",
    "begin_publication",
    "finish_publication",
    "folder_key",
    "list_publications",
    "newest_run_id",
    "prune_publications",
    "read_publication",
    "remove_temp_publications",
    "write_parts",
    "write_publication",
]

FORMAT = "monolith-torch-sync"
VERSION = 1
KINDS = ("full", "delta")
_NAME_RE = re.compile(r"^(?P<seq>[0-9]{20})\.(?P<kind>full|delta)$")
_TEMP_RE = re.compile(r"^\.[0-9]{20}\.(full|delta)\.tmp-[0-9a-f]{16}$")
_MAX_MANIFEST_BYTES = 16 << 20


class SyncError(ValueError):
    """A publication that is incomplete, corrupt, of an unknown version or out of place."""


@dataclasses.dataclass(frozen=True)
class TableRows:
    """One table's part of a publication: ``ids`` [n] int64, ``values`` [n, dim] float32, ``removed`` [m] int64."""

    ids: np.ndarray
    values: np.ndarray
    removed: np.ndarray


@dataclasses.dataclass(frozen=True)
class Publication:
    """A publication as read back: its manifest's fields and its arrays."""

    path: str
    seq: int
    kind: str
    run_id: str
    base_seq: int | None
    global_step: int
    clock: float
    wall_time: float
    model_settings: dict | None
    tables: dict[str, TableRows]
    table_rows: dict[str, int]  # rows per table after applying
    dense: dict[str, np.ndarray] | None


def publication_name(seq: int, kind: str) -> str:
    return f"{seq:020d}.{kind}"


def list_publications(export_dir: str) -> list[tuple[int, str, str]]:
    """(seq, kind, path) of every publication in ``export_dir``, by sequence number; [] when it does not exist."""
    try:
        names = os.listdir(export_dir)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        m = _NAME_RE.match(name)
        if m:
            out.append((int(m["seq"]), m["kind"], os.path.join(export_dir, name)))
    return sorted(out)


def folder_key(seq: int, path: str) -> tuple[int, int, int]:
    """Names one publication folder: seq, inode and change time (an inode alone is reused after a removal).

    For remembering a refused publication: a folder replaced later gets another key.
    """
    try:
        st = os.stat(path)
        return seq, st.st_ino, st.st_ctime_ns
    except OSError:
        return seq, -1, -1


def newest_run_id(export_dir: str) -> str | None:
    """The run id of the newest readable manifest in ``export_dir`` (None: no publication)."""
    for _, _, path in reversed(list_publications(export_dir)):
        try:
            return _read_manifest(path)["run_id"]
        except SyncError:
            continue
    return None


# ---------------------------------------------------------------- writing


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_arrow(folder: str, name: str, table: pa.Table) -> dict:
    path = os.path.join(folder, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as f:
        with ipc.new_file(f, table.schema) as writer:
            writer.write_table(table)
        f.flush()
        os.fsync(f.fileno())
    return {"file": name, "sha256": _sha256(path), "rows": table.num_rows}


def _rows_table(ids: np.ndarray, values: np.ndarray) -> pa.Table:
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    values = np.ascontiguousarray(values, dtype=np.float32)
    dim = values.shape[1]
    flat = pa.array(values.reshape(-1), type=pa.float32())
    return pa.table({"id": pa.array(ids, type=pa.int64()),
                     "value": pa.FixedSizeListArray.from_arrays(flat, dim)})


def _dense_table(dense: Mapping[str, np.ndarray]) -> pa.Table:
    arrays = {name: np.asarray(a).copy(order="C") for name, a in dense.items()}
    return pa.table({
        "name": pa.array(list(arrays), type=pa.utf8()),
        "dtype": pa.array([a.dtype.name for a in arrays.values()], type=pa.utf8()),
        "shape": pa.array([list(a.shape) for a in arrays.values()], type=pa.list_(pa.int64())),
        "data": pa.array([a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes() for a in arrays.values()],
                         type=pa.large_binary()),
    })


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def begin_publication(export_dir: str, seq: int, kind: str) -> str:
    """Makes the dot-folder a publication is written into (then ``write_parts``, ``finish_publication``).

    Raises:
        ValueError: a bad kind.
        FileExistsError: the publication exists already.
    """
    if kind not in KINDS:
        raise ValueError(f"Invalid kind: {kind!r} (expected one of {KINDS})")
    name = publication_name(seq, kind)
    if os.path.lexists(os.path.join(export_dir, name)):
        raise FileExistsError(f"publication {os.path.join(export_dir, name)!r} exists already")
    tmp = os.path.join(export_dir, f".{name}.tmp-{secrets.token_hex(8)}")
    os.mkdir(tmp, 0o755)
    return tmp


def write_parts(folder: str, kind: str, tables: Mapping[str, TableRows], part: int = 0) -> dict[str, dict]:
    """Writes one part (one rank's rows) of every table into ``folder``; returns slot -> its file entries.

    Tables are numbered in the order of ``tables`` (the same on every rank).
    ``removed`` is written for deltas only.

    Raises:
        ValueError: values that do not fit their ids.
    """
    out = {}
    for i, (slot, rows) in enumerate(tables.items()):
        if rows.values.ndim != 2 or rows.values.shape[0] != rows.ids.shape[0]:
            raise ValueError(f"table {slot!r}: values {rows.values.shape} do not fit ids {rows.ids.shape}")
        entry = {"dim": int(rows.values.shape[1]),
                 "parts": [_write_arrow(folder, f"table-{i:04d}.part-{part:04d}.arrow", _rows_table(rows.ids, rows.values))],
                 "removed": []}
        if kind == "delta":
            removed = pa.table({"id": pa.array(np.ascontiguousarray(rows.removed, dtype=np.int64))})
            entry["removed"].append(_write_arrow(folder, f"removed-{i:04d}.part-{part:04d}.arrow", removed))
        out[slot] = entry
    return out


def finish_publication(
    export_dir: str,
    folder: str,
    seq: int,
    kind: str,
    run_id: str,
    parts: Sequence[Mapping[str, dict]],
    table_rows: Mapping[str, int],
    dense: Mapping[str, np.ndarray] | None,
    global_step: int,
    clock: float,
    wall_time: float,
    model_settings: dict | None = None,
) -> str:
    """Writes the dense parameters and the manifest into ``folder`` and renames it into place; returns the path.

    Args:
        parts: ``write_parts``' result of each part, in part (rank) order.
        table_rows: per slot, its row count after applying (all parts).
        dense: parameter name -> array, or None (a delta without dense parameters).
        model_settings: a full snapshot's model settings (JSON-able).

    Raises:
        ValueError: a full snapshot without dense parameters. The folder is removed on any error.
        OSError: the write failed; no publication is left.
    """
    try:
        if kind == "full" and dense is None:
            raise ValueError("a full snapshot needs the dense parameters")
        tables = {}
        for slot in parts[0] if parts else {}:
            tables[slot] = {"dim": parts[0][slot]["dim"], "rows": int(table_rows[slot]),
                            "parts": [e for p in parts for e in p[slot]["parts"]],
                            "removed": [e for p in parts for e in p[slot]["removed"]]}
        manifest = {
            "format": FORMAT, "version": VERSION, "run_id": run_id, "seq": int(seq), "kind": kind,
            "base_seq": int(seq) - 1 if kind == "delta" else None,
            "global_step": int(global_step), "clock": float(clock), "wall_time": float(wall_time),
            "model_settings": model_settings if kind == "full" else None,
            "tables": tables,
            "dense": _write_arrow(folder, "dense.arrow", _dense_table(dense)) if dense is not None else None,
        }
        path = os.path.join(folder, "manifest.json")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(folder)
        final = os.path.join(export_dir, publication_name(seq, kind))
        os.rename(folder, final)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    _fsync_dir(export_dir)
    return final


def write_publication(
    export_dir: str,
    seq: int,
    kind: str,
    run_id: str,
    tables: Mapping[str, TableRows],
    table_rows: Mapping[str, int],
    dense: Mapping[str, np.ndarray] | None,
    global_step: int,
    clock: float,
    wall_time: float,
    model_settings: dict | None = None,
) -> str:
    """Writes a one-part publication atomically (temp folder, fsync, rename); returns its path.

    Raises:
        ValueError: a bad kind, a full snapshot without dense parameters, shapes that do not fit.
        FileExistsError: the publication exists already.
        OSError: the write failed; no publication is left (a killed writer leaves a dot-folder,
            which ``remove_temp_publications`` removes).
    """
    folder = begin_publication(export_dir, seq, kind)
    try:
        parts = [write_parts(folder, kind, tables)]
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return finish_publication(export_dir, folder, seq, kind, run_id, parts, table_rows, dense, global_step,
                              clock, wall_time, model_settings)


def remove_temp_publications(export_dir: str) -> list[str]:
    """Removes the dot-folders of publications a killed writer left; returns them."""
    removed = []
    for name in os.listdir(export_dir) if os.path.isdir(export_dir) else []:
        path = os.path.join(export_dir, name)
        if _TEMP_RE.match(name) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def prune_publications(export_dir: str, keep_fulls: int = 2) -> list[str]:
    """Removes publications older than the ``keep_fulls``-th newest full snapshot; returns them.

    What is left replays from its oldest full snapshot. Each folder is first
    renamed to a dot-name (readers stop seeing it at once), then deleted.
    """
    pubs = list_publications(export_dir)
    fulls = [seq for seq, kind, _ in pubs if kind == "full"]
    if len(fulls) <= keep_fulls:
        return []
    oldest_kept = fulls[-keep_fulls]
    removed = []
    for seq, _kind, path in pubs:
        if seq >= oldest_kept:
            break
        doomed = os.path.join(export_dir, f".{os.path.basename(path)}.tmp-{secrets.token_hex(8)}")
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(path)
    return removed


# ---------------------------------------------------------------- reading


def _read_manifest(path: str) -> dict:
    m = _NAME_RE.match(os.path.basename(path))
    if m is None:
        raise SyncError(f"{path!r} is not a publication (expected <20-digit seq>.full or .delta)")
    file = os.path.join(path, "manifest.json")
    try:
        manifest = json.loads(read_limited(file, _MAX_MANIFEST_BYTES).decode("utf-8"))
    except (OSError, ValueError) as e:
        raise SyncError(f"{file!r}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SyncError(f"{file!r}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise SyncError(f"{file!r}: format version {manifest.get('version')!r}, this reader reads {VERSION}")
    seq, kind = manifest.get("seq"), manifest.get("kind")
    if seq != int(m["seq"]) or kind != m["kind"]:
        raise SyncError(f"{file!r}: says seq {seq!r} kind {kind!r}, but the folder is {os.path.basename(path)!r}")
    if kind == "delta" and manifest.get("base_seq") != seq - 1:
        raise SyncError(f"{file!r}: a delta whose base_seq {manifest.get('base_seq')!r} is not {seq - 1}")
    if not isinstance(manifest.get("run_id"), str) or not isinstance(manifest.get("tables"), dict):
        raise SyncError(f"{file!r}: run_id or tables missing")
    return manifest


def _read_arrow(folder: str, entry, columns: tuple[str, ...]) -> pa.Table:
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or "/" in entry["file"] \
            or entry["file"].startswith("."):
        raise SyncError(f"{folder!r}: a bad file entry {entry!r}")
    path = os.path.join(folder, entry["file"])
    try:
        if os.path.islink(path):
            raise SyncError(f"{path!r} is a symbolic link")
        if _sha256(path) != entry.get("sha256"):
            raise SyncError(f"{path!r}: checksum mismatch (corrupt or changed)")
        with pa.memory_map(path) as source:
            table = ipc.open_file(source).read_all()
    except (OSError, pa.ArrowException) as e:
        raise SyncError(f"{path!r}: unreadable ({e})") from None
    if table.column_names != list(columns) or table.num_rows != entry.get("rows"):
        raise SyncError(f"{path!r}: columns {table.column_names} / {table.num_rows} rows do not fit the manifest")
    return table


def _ids(table: pa.Table, path: str) -> np.ndarray:
    col = table.column("id")
    if col.type != pa.int64() or col.null_count:
        raise SyncError(f"{path!r}: ids must be non-null int64")
    return col.to_numpy().astype(np.int64, copy=False)


def _table_rows(path: str, slot: str, entry) -> tuple[TableRows, int]:
    if not isinstance(entry, dict) or not isinstance(entry.get("dim"), int) or not isinstance(entry.get("rows"), int):
        raise SyncError(f"{path!r}: table {slot!r}: dim or rows missing")
    dim = entry["dim"]
    ids, values, removed = [], [], []
    for part in entry.get("parts") or []:
        t = _read_arrow(path, part, ("id", "value"))
        col = t.column("value").combine_chunks() if t.num_rows else None
        if col is not None and (col.type != pa.list_(pa.float32(), dim) or col.null_count):
            raise SyncError(f"{path!r}: table {slot!r}: values are not fixed_size_list<float32>[{dim}]")
        ids.append(_ids(t, path))
        flat = col.flatten().to_numpy() if col is not None else np.zeros(0, np.float32)
        values.append(flat.reshape(-1, dim))
    for part in entry.get("removed") or []:
        removed.append(_ids(_read_arrow(path, part, ("id",)), path))
    cat_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    if np.unique(cat_ids).size != cat_ids.size:
        raise SyncError(f"{path!r}: table {slot!r} holds an id twice")
    rows = TableRows(cat_ids, np.concatenate(values) if values else np.zeros((0, dim), np.float32),
                     np.concatenate(removed) if removed else np.zeros(0, np.int64))
    return rows, entry["rows"]


def _dense(path: str, entry) -> dict[str, np.ndarray]:
    t = _read_arrow(path, entry, ("name", "dtype", "shape", "data"))
    out = {}
    for name, dtype, shape, data in zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True):
        try:
            array = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
        except (TypeError, ValueError) as e:
            raise SyncError(f"{path!r}: dense parameter {name!r}: {e}") from None
        out[name] = array.astype(np.dtype(dtype), copy=True)
    return out


def read_publication(path: str, run_id: str | None = None) -> Publication:
    """Reads and checks one publication (manifest, checksums, shapes).

    Args:
        run_id: when given, a publication of another run is refused.

    Raises:
        SyncError: anything that does not check out; the message names the file.
    """
    manifest = _read_manifest(path)
    if run_id is not None and manifest["run_id"] != run_id:
        raise SyncError(f"{path!r} belongs to run {manifest['run_id']!r}, not {run_id!r}")
    tables, table_rows = {}, {}
    for slot, entry in manifest["tables"].items():
        tables[slot], table_rows[slot] = _table_rows(path, slot, entry)
    try:
        return Publication(
            path=path, seq=manifest["seq"], kind=manifest["kind"], run_id=manifest["run_id"],
            base_seq=manifest.get("base_seq"), global_step=int(manifest["global_step"]),
            clock=float(manifest["clock"]), wall_time=float(manifest["wall_time"]),
            model_settings=manifest.get("model_settings"), tables=tables, table_rows=table_rows,
            dense=_dense(path, manifest["dense"]) if manifest.get("dense") is not None else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, SyncError):
            raise
        raise SyncError(f"{path!r}: bad manifest field ({e})") from None
