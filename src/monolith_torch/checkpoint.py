"""Crash-safe checkpoints of embedding tables, dense model, dense optimizer and global step.

Plays the part of Monolith's hash-table checkpoint saver/restorer hooks. One
file per checkpoint::

    b"MTCKPT1\\n" | 64 hex chars of sha256(payload) | b"\\n" | 20-digit payload length | b"\\n" | payload

where the payload is ``torch.save`` of a dict of tensors and plain values.
A save writes a temporary file in the same directory, fsyncs it, renames it
over the target (``os.replace`` is atomic on POSIX) and fsyncs the directory,
so a process killed mid-save leaves the previous checkpoint intact. A load
checks the length and checksum before unpickling anything, and a restore
validates every part against the live objects before changing any of them.

Sharded tables (``HashTableFeatureFactory(sharded=True)`` over several
processes): ``save_checkpoint`` is then a collective. Each rank writes its own
rows to ``<path>.<token>.shard-<rank>-of-<world>`` (same file format, written
atomically), then rank 0 writes the manifest at ``path`` (world size, shard file
names and their sha256, dense model, optimizer, global step), last, by rename:
a save that dies part-way leaves no manifest, and the previous checkpoint at
``path`` (if any) keeps its own shard files, since ``token`` is new for every
save. The directory must be shared by all ranks (one machine or a shared file
system). ``restore_checkpoint`` of a manifest reads the shards, checks each
one's checksum against the manifest, and loads onto any number of ranks: each
keeps the rows it owns under the new world size (re-hashing), reading only its
own shard when the world size is unchanged.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import re
import secrets
from collections.abc import Mapping

import torch
import torch.distributed as dist

from monolith_torch.embedding.placement.sharded import merge_table_states

__all__ = ["save_checkpoint", "restore_checkpoint", "load_checkpoint_file", "remove_checkpoint", "CheckpointError"]

_MAGIC = b"MTCKPT1\n"
_HEADER_LEN = len(_MAGIC) + 64 + 1 + 20 + 1
_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, corrupt or does not fit the objects."""


def _table_owner(ctx):
    """The object whose ``state_dict`` holds the embedding tables, or None."""
    if ctx is None:
        return None
    factory = getattr(ctx, "feature_factory", None)
    if factory is not None and hasattr(factory, "state_dict"):
        return factory
    layout = getattr(ctx, "layout_factory", None)
    if layout is not None:
        owner = getattr(getattr(layout, "hash_table", None), "factory", None)
        if owner is not None and hasattr(owner, "state_dict"):
            return owner
    return None


def _step_value(global_step) -> int | None:
    if global_step is None:
        return None
    if isinstance(global_step, torch.Tensor):
        if global_step.numel() != 1:
            raise ValueError(f"Invalid global_step: shape {tuple(global_step.shape)} (expected one element)")
        return int(global_step.reshape(()).item())
    if isinstance(global_step, int) and not isinstance(global_step, bool):
        return global_step
    raise TypeError(f"global_step must be an int or a one-element tensor, got {type(global_step).__name__}")


def _the_global_step(owner, global_step):
    """The run's global step: the one passed in, else the table owner's own count."""
    if global_step is not None or owner is None:
        return global_step
    return getattr(owner, "global_step", None)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path, ctx, model=None, optimizer=None, global_step=None, extra: Mapping | None = None) -> str:
    """Writes tables, dense model, dense optimizer and global step to ``path`` atomically.

    Pending async functions of ``ctx`` run first, so the file holds the state
    after every queued update; then expired rows are evicted from the tables
    (as Monolith does when it saves).

    Args:
        path: the checkpoint file; its directory must exist.
        ctx: a ``NativeContext`` (its hash-table factory is saved), or None.
        model: a ``torch.nn.Module`` whose ``state_dict`` is saved.
        optimizer: a ``torch.optim.Optimizer`` whose ``state_dict`` is saved.
        global_step: an int or a one-element tensor: the run's one global
            step. None saves the factory's own count (``factory.global_step``).
        extra: plain values (and tensors) saved beside the state, e.g. a data
            stream's position; ``restore_checkpoint(extra=...)`` returns them.

    With a factory over several processes this is a collective: every rank
    calls it with the same ``path``. Replicated tables: every replica evicts
    the same expired rows (at rank 0's clock) and rank 0 writes the file.
    Sharded tables: each rank writes its shard, rank 0 the manifest at
    ``path`` (see the module docstring).

    Returns:
        The path written.

    Raises:
        TypeError: a bad ``global_step``.
        OSError: the write failed (sharded: on any rank, reported on every rank);
            the previous file at ``path`` is untouched and no manifest is written.
    """
    path = os.fspath(path)
    owner = _table_owner(ctx)
    step = _step_value(_the_global_step(owner, global_step))
    if ctx is not None and getattr(ctx, "async_function_mgr", None) is not None:
        ctx.async_function_mgr.flush()
    placement = getattr(owner, "placement", None)
    if owner is not None and hasattr(owner, "evict_expired"):
        # As Monolith: rows past their expire_time are dropped when saving
        # (replicas: a collective, so every replica drops the same rows).
        owner.evict_expired()
    kind = getattr(placement, "kind", "local")
    if kind == "sharded":
        return _save_sharded(path, owner, placement.group, model, optimizer, step, extra)
    if kind == "replicated" and dist.get_rank(placement.group) != 0:
        return path  # rank 0 writes the replicas' common state
    payload = {
        "format": _FORMAT,
        "tables": owner.state_dict() if owner is not None else None,
        "model": model.state_dict() if model is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "global_step": step,
        "extra": dict(extra) if extra else None,
    }
    _write_file(path, payload)
    return path


def _write_file(path: str, payload: dict) -> str:
    """Writes ``payload`` atomically in the checkpoint format; returns its sha256 (hex)."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getbuffer()
    digest = hashlib.sha256(data).hexdigest().encode()
    header = _MAGIC + digest + b"\n" + b"%020d" % len(data) + b"\n"
    from monolith_torch.core.fileio import atomic_write

    # A new temp file under an unguessable name (.<name>.tmp-<hex>), fsync, rename, fsync the directory.
    with atomic_write(path, "wb") as f:
        f.write(header)
        f.write(data)
    return digest.decode()


def _shard_name(path: str, token: str, rank: int, world: int) -> str:
    return f"{os.path.basename(path)}.{token}.shard-{rank:05d}-of-{world:05d}"


def _save_sharded(path: str, owner, group, model, optimizer, step, extra) -> str:
    """Each rank writes its shard; rank 0 writes the manifest last. A collective."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    token = [secrets.token_hex(6) if rank == 0 else None]
    dist.broadcast_object_list(token, src=dist.get_global_rank(group, 0), group=group)
    directory = os.path.dirname(os.path.abspath(path))
    name = _shard_name(path, token[0], rank, world)
    try:
        digest = _write_file(os.path.join(directory, name), {"format": _FORMAT, "tables": owner.state_dict()})
        mine = (name, digest, None)
    except Exception as e:  # reported to every rank below, so none of them waits forever
        mine = (name, None, f"{type(e).__name__}: {e}")
    shards: list = [None] * world
    dist.all_gather_object(shards, mine, group=group)
    failed = [f"rank {r}: {s[2]}" for r, s in enumerate(shards) if s[2] is not None]
    if failed:
        raise OSError(f"sharded checkpoint {path!r} not written (no manifest): {'; '.join(failed)}")
    error = [None]
    if rank == 0:
        manifest = {
            "format": _FORMAT,
            "tables": None,
            "shards": {"world": world, "files": [s[0] for s in shards], "sha256": [s[1] for s in shards]},
            "model": model.state_dict() if model is not None else None,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "global_step": step,
            "extra": dict(extra) if extra else None,
        }
        try:
            _write_file(path, manifest)
            _remove_stale_shards(path, {s[0] for s in shards})
        except Exception as e:
            error[0] = f"{type(e).__name__}: {e}"
    dist.broadcast_object_list(error, src=dist.get_global_rank(group, 0), group=group)
    if error[0] is not None:
        raise OSError(f"sharded checkpoint {path!r}: the manifest was not written: {error[0]}")
    return path


def _shard_files(path: str) -> list[str]:
    base = os.path.abspath(path)
    # Exactly <path>.<12 hex token>.shard-NNNNN-of-NNNNN, not the shards of a
    # checkpoint whose name merely starts with "<path>.".
    pattern = re.compile(re.escape(os.path.basename(base)) + r"\.[0-9a-f]{12}\.shard-\d{5}-of-\d{5}")
    return [f for f in glob.glob(glob.escape(base) + ".*.shard-*-of-*") if pattern.fullmatch(os.path.basename(f))]


def _remove_stale_shards(path: str, keep: set[str]) -> None:
    for f in _shard_files(path):
        if os.path.basename(f) not in keep:
            os.unlink(f)


def remove_checkpoint(path) -> None:
    """Deletes the checkpoint at ``path`` and, for a sharded one, its shard files."""
    path = os.fspath(path)
    if os.path.exists(path):
        os.unlink(path)
    _remove_stale_shards(path, set())


def load_checkpoint_file(path) -> dict:
    """Reads and verifies a checkpoint file; returns its payload dict.

    Raises:
        CheckpointError: missing, truncated, not a checkpoint, or checksum mismatch;
            the message names the file.
    """
    return _read_file(path)[0]


def _read_file(path) -> tuple[dict, str]:
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {e}") from e
    if len(raw) < _HEADER_LEN or not raw.startswith(_MAGIC):
        raise CheckpointError(f"{path!r} is not a monolith-torch checkpoint or its header is truncated")
    digest = raw[len(_MAGIC): len(_MAGIC) + 64].decode("ascii", "replace")
    try:
        length = int(raw[len(_MAGIC) + 65: _HEADER_LEN - 1])
    except ValueError:
        raise CheckpointError(f"checkpoint {path!r} has a corrupt header") from None
    data = memoryview(raw)[_HEADER_LEN:]
    if len(data) != length:
        raise CheckpointError(
            f"checkpoint {path!r} is truncated or has trailing bytes: payload {len(data)} bytes, header says {length}"
        )
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: sha256 mismatch")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a checksummed payload torch cannot read: wrong version or writer bug
        raise CheckpointError(f"checkpoint {path!r} could not be unpickled: {e}") from e
    if not isinstance(payload, Mapping) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"checkpoint {path!r} has an unknown format")
    return dict(payload), digest


def _sharded_tables(path: str, payload: Mapping, owner) -> dict:
    """The table state of a manifest: the shards this process needs, merged; checksums checked."""
    shards = payload["shards"]
    world, files, digests = shards["world"], shards["files"], shards["sha256"]
    info = owner.shard_info() if hasattr(owner, "shard_info") else None
    wanted = [info[0]] if info is not None and info[1] == world else range(world)
    directory = os.path.dirname(os.path.abspath(path))
    states = []
    for r in wanted:
        shard_path = os.path.join(directory, files[r])
        shard, digest = _read_file(shard_path)
        if digest != digests[r]:
            raise CheckpointError(f"checkpoint {path!r}: shard {shard_path!r} does not match the manifest's sha256")
        states.append(shard["tables"])
    try:
        names = states[0]["tables"].keys()
        return {
            **{k: v for k, v in states[0].items() if k not in ("tables", "shard")},
            "tables": {n: merge_table_states([s["tables"][n] for s in states]) for n in names},
        }
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path!r}: its shards do not fit together: {e}") from e


def _check_model(path: str, model, saved) -> None:
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"checkpoint {path!r} holds no model state")
    current = model.state_dict()
    if set(current) != set(saved):
        missing, extra = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
        raise CheckpointError(f"checkpoint {path!r}: model keys differ (missing {missing}, unexpected {extra})")
    for k, v in current.items():
        if not isinstance(v, torch.Tensor):
            continue
        got = saved[k]
        if not isinstance(got, torch.Tensor):
            raise CheckpointError(f"checkpoint {path!r}: model {k!r} is a {type(got).__name__}, expected a tensor")
        if got.shape != v.shape:
            raise CheckpointError(
                f"checkpoint {path!r}: model {k!r} has shape {tuple(got.shape)}, expected {tuple(v.shape)}"
            )
        if got.dtype != v.dtype:
            raise CheckpointError(f"checkpoint {path!r}: model {k!r} has dtype {got.dtype}, expected {v.dtype}")


def _check_optimizer(path: str, optimizer, saved) -> None:
    """The saved optimizer state must be the same kind of optimizer over parameters of the same shapes."""
    if saved is None:
        raise CheckpointError(f"checkpoint {path!r} holds no optimizer state")
    where = f"checkpoint {path!r}: optimizer state"
    saved_groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    saved_state = saved.get("state") if isinstance(saved, Mapping) else None
    if not isinstance(saved_groups, list) or not isinstance(saved_state, Mapping) or not all(
        isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in saved_groups
    ):
        raise CheckpointError(f"{where} is malformed (expected 'state' and 'param_groups')")
    groups = optimizer.param_groups
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in saved_groups]:
        raise CheckpointError(f"checkpoint {path!r}: optimizer parameter groups do not match")
    for g, sg in zip(groups, saved_groups, strict=True):
        missing = sorted(set(g) - set(sg))
        if missing:
            raise CheckpointError(
                f"{where} lacks the settings {missing} of {type(optimizer).__name__}: it was saved by another "
                "kind of optimizer"
            )
    params = {i: p for g, sg in zip(groups, saved_groups, strict=True) for i, p in zip(sg["params"], g["params"], strict=True)}
    for i, entry in saved_state.items():
        if i not in params or not isinstance(entry, Mapping):
            raise CheckpointError(f"{where} for parameter {i!r} does not belong to any parameter group")
        p = params[i]
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                if value.dim() and (value.shape != p.shape or not value.is_floating_point()):
                    raise CheckpointError(
                        f"{where} {name!r} of parameter {i} has shape {tuple(value.shape)} and dtype "
                        f"{value.dtype}, expected {tuple(p.shape)} floating point"
                    )
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise CheckpointError(f"{where} {name!r} of parameter {i} is a {type(value).__name__}")


def _saved_step(path: str, payload: Mapping) -> int | None:
    """The saved global step (None if none); raises ``CheckpointError`` on one that is not an int >= 0."""
    # Written before the global step had one home, the factory's state held its own count too.
    tables = payload.get("tables")
    old = tables.get("global_step") if isinstance(tables, Mapping) else None
    for where, step in (("global_step", payload.get("global_step")), ("tables.global_step", old)):
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise CheckpointError(f"checkpoint {path!r}: {where} is {step!r}, expected an int >= 0")
    return payload.get("global_step") if payload.get("global_step") is not None else old


def _checked_payload(path: str, owner, model, optimizer, global_step) -> tuple[dict, int | None]:
    """Reads ``path`` and checks it against the live objects; raises ``CheckpointError``, changes nothing."""
    payload = load_checkpoint_file(path)
    if owner is not None and payload.get("shards") is not None:
        payload["tables"] = _sharded_tables(path, payload, owner)
    if owner is not None:
        if payload.get("tables") is None:
            raise CheckpointError(f"checkpoint {path!r} holds no embedding tables")
        try:
            owner.check_state_dict(payload["tables"])
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path!r}: {e}") from e
    if model is not None:
        _check_model(path, model, payload.get("model"))
    if optimizer is not None:
        _check_optimizer(path, optimizer, payload.get("optimizer"))
    step = _saved_step(path, payload)
    if isinstance(global_step, torch.Tensor) and step is None:
        raise CheckpointError(f"checkpoint {path!r} holds no global step")
    return payload, step


def restore_checkpoint(path, ctx, model=None, optimizer=None, global_step=None, extra: dict | None = None) -> int | None:
    """Restores what ``save_checkpoint`` wrote; validates everything before changing anything.

    Pending async functions of ``ctx`` run first (flushed), then their results are replaced (they
    belong to the state being replaced).

    Args:
        path: the checkpoint file.
        ctx, model, optimizer: the live objects to restore into (None: skip).
        global_step: a tensor restored in place (ints cannot be; use the return
            value). None restores the factory's own count (``factory.global_step``).
        extra: a dict that receives the ``extra`` values the checkpoint holds (on success only).

    Returns:
        The saved global step (None if none was saved).

    Raises:
        CheckpointError: a bad file, or state that does not fit the objects;
            the message names the file. Nothing is changed then.
    """
    path = os.fspath(path)
    owner = _table_owner(ctx)
    placement = getattr(owner, "placement", None)
    group = placement.group if getattr(placement, "kind", None) == "sharded" else None
    error = payload = step = None
    try:
        payload, step = _checked_payload(path, owner, model, optimizer, global_step)
    except CheckpointError as e:
        error = e
    if group is not None:
        # Sharded: every rank must restore or none, else the job is half-restored.
        errors: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(errors, None if error is None else str(error), group=group)
        failed = [(r, m) for r, m in enumerate(errors) if m]
        if failed and error is None:
            rank, message = failed[0]
            raise CheckpointError(f"checkpoint {path!r}: rank {rank} cannot restore it ({message}); nothing restored")
    if error is not None:
        raise error
    if ctx is not None and getattr(ctx, "async_function_mgr", None) is not None:
        ctx.async_function_mgr.flush()
    if owner is not None:
        owner.load_state_dict(payload["tables"])
    if model is not None:
        model.load_state_dict(payload["model"])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    target = _the_global_step(owner, global_step)
    if isinstance(target, torch.Tensor) and step is not None:
        target.fill_(step)
    if extra is not None:
        extra.update(payload.get("extra") or {})
    return step
