"""A run directory: its paths, what is checked before a command writes, its lock, its saved settings.

    runs/NAME/
      .lock                 held (flock) by the one trainer writing here; holds its pid
      run.json              the settings that shape the model, saved by train, reused by eval/predict
      run_id                names the run in its exported publications (made by the first train)
      progressive.csv       progressive validation: pre-update AUC and log-loss per window
      checkpoints/ckpt-<step>.pt
      tb/                   TensorBoard events
      train.log, metrics.json, predictions.tsv, data/ (the generated default dataset)

May import ``monolith_torch.checkpoint``, ``core`` and ``train.config``.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterable

from monolith_torch.checkpoint import CheckpointError
from monolith_torch.core.fileio import atomic_write, check_target, read_limited, temp_files
from monolith_torch.train.config import ConfigError, TrainConfig

__all__ = [
    "MODEL_SETTINGS",
    "RunLock",
    "RunPaths",
    "check_outputs",
    "check_run_dir",
    "first_restorable",
    "model_settings",
    "model_settings_from_json",
    "remove_orphan_temps",
    "run_id",
    "saved_model_settings",
    "save_run_settings",
]

logger = logging.getLogger("monolith_torch.train.run_dir")

# Settings that shape the model and its tables: a checkpoint only loads into the same shapes.
MODEL_SETTINGS = ("emb_dim", "seq_len", "hidden", "dense_optimizer", "sharded_tables", "model", "model_options",
                  "features", "fused_embeddings")


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where a run's files live, under ``root``."""

    root: str

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.root, "checkpoints")

    @property
    def tensorboard(self) -> str:
        return os.path.join(self.root, "tb")

    @property
    def data(self) -> str:
        return os.path.join(self.root, "data")

    @property
    def log(self) -> str:
        return os.path.join(self.root, "train.log")

    @property
    def metrics(self) -> str:
        return os.path.join(self.root, "metrics.json")

    @property
    def settings(self) -> str:
        return os.path.join(self.root, "run.json")

    @property
    def progressive(self) -> str:
        return os.path.join(self.root, "progressive.csv")

    @property
    def run_id(self) -> str:
        return os.path.join(self.root, "run_id")

    @property
    def lock(self) -> str:
        return os.path.join(self.root, ".lock")

    def checkpoint(self, step: int) -> str:
        return os.path.join(self.checkpoints, f"ckpt-{step:010d}.pt")

    def checkpoints_newest_first(self) -> list[str]:
        if not os.path.isdir(self.checkpoints):
            return []
        names = sorted((n for n in os.listdir(self.checkpoints) if n.startswith("ckpt-") and n.endswith(".pt")),
                       reverse=True)
        return [os.path.join(self.checkpoints, n) for n in names]

    def latest_checkpoint(self) -> str | None:
        newest = self.checkpoints_newest_first()
        return newest[0] if newest else None


def check_run_dir(run_dir: str) -> None:
    """Raises ``ConfigError`` unless ``run_dir`` exists as a writable directory or can be created."""
    path = os.path.abspath(run_dir)
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(f"Invalid run_dir: {run_dir!r} ({probe!r} is not a directory)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"Invalid run_dir: {run_dir!r} ({probe!r} is not writable)")


def check_outputs(paths: RunPaths, command: str) -> None:
    """Checks every file and folder ``command`` will write under the run directory, before anything is.

    Raises:
        ConfigError: naming the path and what is wrong with it.
    """
    check_run_dir(paths.root)
    if command != "train":
        return
    for folder in (paths.checkpoints, paths.tensorboard, paths.data):
        if os.path.lexists(folder) and (os.path.islink(folder) or not os.path.isdir(folder)):
            raise ConfigError(f"Invalid run_dir: {folder!r} must be a directory (it is a file or a link)")
        if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"Invalid run_dir: {folder!r} is not writable")
    if not os.path.isdir(paths.root):
        return  # created empty: nothing in it can be in the way
    for file in (paths.log, paths.metrics, paths.settings, paths.progressive):
        try:
            check_target(file)
        except OSError as e:
            raise ConfigError(f"Invalid run_dir: {file!r} {e.strerror}") from None
        if os.path.exists(file) and not os.access(file, os.W_OK):
            raise ConfigError(f"Invalid run_dir: {file!r} is not writable")


class RunLock:
    """One writer per run directory: an exclusive ``flock`` on ``<run_dir>/.lock``, released on close or exit.

    Raises (from ``acquire``):
        ConfigError: another process holds it (its pid named).
    """

    def __init__(self, paths: RunPaths):
        self.path = paths.lock
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise ConfigError(
                    f"run_dir {os.path.dirname(self.path)!r} is in use by another trainer (pid {holder}); "
                    "use another --run-dir or wait for it to finish"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_orphan_temps(paths: RunPaths) -> list[str]:
    """Removes the temp files a killed process of this run left beside its checkpoints and outputs.

    Only ``atomic_write``'s own temp names next to this run's files are
    touched, never another file. Call with the run lock held.

    Returns:
        The paths removed.
    """
    targets: list[str] = [paths.metrics, paths.settings, paths.progressive, paths.run_id,
                          os.path.join(paths.root, "predictions.tsv")]
    targets += paths.checkpoints_newest_first()
    if os.path.isdir(paths.checkpoints):
        # Temp files of checkpoints that never got their final name.
        targets += [os.path.join(paths.checkpoints, n[1:].rsplit(".tmp-", 1)[0])
                    for n in os.listdir(paths.checkpoints) if n.startswith(".ckpt-") and ".tmp-" in n]
    if os.path.isdir(paths.data):
        targets += [os.path.join(paths.data, n) for n in ("train.tsv", "eval.tsv")]
    removed = []
    for target in dict.fromkeys(targets):
        for tmp in temp_files(target):
            try:
                os.unlink(tmp)
                removed.append(tmp)
            except FileNotFoundError:
                pass
    if removed:
        logger.warning("removed %d temp file(s) a stopped run left behind: %s", len(removed), removed)
    return removed


def model_settings(cfg: TrainConfig) -> dict:
    """The settings that shape the model (``MODEL_SETTINGS``), as saved in ``run.json`` and full snapshots."""
    return {k: v for k, v in cfg.to_dict().items() if k in MODEL_SETTINGS}


def save_run_settings(paths: RunPaths, cfg: TrainConfig) -> None:
    """Writes the settings that shape the model to ``run.json`` (atomically), for eval and predict."""
    with atomic_write(paths.settings, "w") as f:
        json.dump({"model_settings": model_settings(cfg)}, f, indent=2)


def run_id(paths: RunPaths, create: bool = True) -> str | None:
    """The run's id (``run_id`` file; made, atomically, when missing): names its exported publications.

    ``create=False``: None when the run has no id yet (nothing is written).

    Raises:
        ConfigError: the file exists but is not an id.
    """
    try:
        text = read_limited(paths.run_id, 256).decode("ascii").strip()
    except FileNotFoundError:
        if not create:
            return None
        text = secrets.token_hex(8)
        with atomic_write(paths.run_id, "w") as f:
            f.write(text + "\n")
        return text
    except (OSError, ValueError) as e:
        raise ConfigError(f"Invalid run id file {paths.run_id!r}: {e}") from None
    if not text or not text.isalnum():
        raise ConfigError(f"Invalid run id file {paths.run_id!r}: {text!r} is not an id")
    return text


def saved_model_settings(paths: RunPaths) -> dict:
    """The model settings ``train`` saved in this run directory ({} for runs made before they were saved).

    Raises:
        ConfigError: ``run.json`` exists but cannot be read.
    """
    if not os.path.exists(paths.settings):
        return {}
    try:
        saved = json.loads(read_limited(paths.settings, 1 << 20))
        settings = saved["model_settings"]
        if not isinstance(settings, dict):
            raise TypeError("model_settings is not a table")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"Invalid run settings {paths.settings!r}: {e}") from None
    return model_settings_from_json(settings)


def model_settings_from_json(settings: dict) -> dict:
    """Saved model settings (``run.json``, a full snapshot's manifest) as ``TrainConfig`` values.

    Keeps the ``MODEL_SETTINGS`` keys; JSON's lists become the tuples the config holds.
    """
    out = {k: v for k, v in settings.items() if k in MODEL_SETTINGS}
    for key in ("hidden", "features"):
        if isinstance(out.get(key), list):
            out[key] = tuple(out[key])
    return out


def first_restorable(candidates: Iterable[str], restore: Callable[[str], object]) -> str:
    """Restores the newest of ``candidates`` that restores, warning about each damaged one it skips.

    ``restore`` raises ``CheckpointError`` (changing nothing) for a file that
    cannot be restored.

    Returns:
        The path restored.

    Raises:
        CheckpointError: none restores; names the newest and why.
    """
    errors: list[CheckpointError] = []
    for path in candidates:
        try:
            restore(path)
        except CheckpointError as e:
            errors.append(e)
            continue
        for skipped in errors:
            logger.warning("skipped a damaged checkpoint, restoring an older one: %s", skipped)
        return path
    if not errors:
        raise CheckpointError("no checkpoint to restore")
    more = f" (and {len(errors) - 1} older ones)" if len(errors) > 1 else ""
    raise CheckpointError(f"{errors[0]}{more}")
