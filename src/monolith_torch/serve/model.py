"""``ServedModel``: the model a trainer publishes, rebuilt from its newest full snapshot and kept current.

The first full snapshot in the export folder carries the run's model settings
(``train.run_dir.model_settings``); ``build_run_model`` turns them into the
same tables and model the trainer built, and a ``sync.Replica`` over them
applies the snapshot and every delta after it. Scoring and applying share
the replica's lock, so every forward sees one whole version.

May import ``monolith_torch.sync``, ``train`` and ``core``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading

import torch

from monolith_torch.sync.format import SyncError, folder_key, list_publications, read_publication
from monolith_torch.sync.replica import Replica
from monolith_torch.train.build import build_run_model
from monolith_torch.train.config import ConfigError, TrainConfig
from monolith_torch.train.readers import batch_from_records
from monolith_torch.train.run_dir import model_settings_from_json
from monolith_torch.train.schema import Schema

__all__ = ["ServedModel", "config_from_settings"]

logger = logging.getLogger("monolith_torch.serve")


def config_from_settings(settings) -> TrainConfig:
    """The ``TrainConfig`` whose model a full snapshot's ``model_settings`` describe.

    Raises:
        ConfigError: settings that are not a dict, or a bad value (the key named).
    """
    if not isinstance(settings, dict):
        raise ConfigError(f"Invalid model_settings: {settings!r} (expected a table of settings)")
    known = model_settings_from_json(settings)
    try:
        return dataclasses.replace(TrainConfig(), **known)
    except TypeError as e:
        raise ConfigError(f"Invalid model_settings: {e}") from None


class ServedModel:
    """The newest version of a model that ``export_dir`` offers, ready to score.

    Nothing is loaded until ``refresh`` finds a full snapshot; until then
    ``ready`` is False. ``refresh`` (called by ``serve.watch.Watcher``) builds
    the model once and then applies every publication that is due.

    Attributes:
        export_dir: the folder the trainer publishes into.
        schema: the run's schema (None before the first snapshot).
        lock: held while a publication is applied and while a batch is scored.
    """

    def __init__(self, export_dir: str):
        self.export_dir = export_dir
        self.lock = threading.Lock()
        self.schema: Schema | None = None
        self.replica: Replica | None = None
        self._caught_up = False
        self._load_error: str | None = None  # why no full snapshot could be built into a model yet
        self._load_refused: set[tuple[int, int, int]] = set()  # folder_key()s, as the replica keys refusals

    @property
    def ready(self) -> bool:
        """Whether scoring works: a version is applied and the first catch-up (every delta due) is done."""
        return self._caught_up

    def refresh(self) -> int:
        """Builds the model from the newest usable full snapshot if needed, then applies what is due.

        Returns:
            Publications applied.
        """
        if self.replica is None and not self._build():
            return 0
        applied = self.replica.poll(self.export_dir)
        # Ready only after a whole poll: a server starting on a snapshot and its deltas never
        # answers with the snapshot alone while it catches up.
        self._caught_up = self._caught_up or self.replica.seq is not None
        return applied

    def _build(self) -> bool:
        for seq, kind, path in reversed(list_publications(self.export_dir)):
            key = folder_key(seq, path)
            if kind != "full" or key in self._load_refused:
                continue
            try:
                # Reads (and checks) the whole snapshot for its settings; the replica reads it again to apply.
                settings = read_publication(path).model_settings
                # The fused embedding path whatever the trainer used: one process, CPU tables, the
                # same scores bit for bit, and a forward 25-28% faster (1 and 256 rows).
                cfg = dataclasses.replace(config_from_settings(settings), fused_embeddings=True, sharded_tables=False)
                run = build_run_model(cfg)
            except (SyncError, ConfigError) as e:
                if not os.path.isdir(path):
                    continue  # compacted away while it was read
                self._load_refused.add(key)
                self._load_error = f"{path!r}: cannot build its model: {e}" if isinstance(e, ConfigError) else str(e)
                logger.warning("full snapshot %d not usable: %s", seq, self._load_error)
                continue
            run.model.eval()  # for good: lookups then never create rows, dropout is off
            self.schema = run.schema
            self.replica = Replica(run.factory.tables, run.model, self.lock)
            logger.info("model built from %s (%s, %d tables)", path, type(run.model).__name__,
                        len(run.factory.tables))
            return True
        return False

    @torch.no_grad()
    def score_records(self, records: list[dict]) -> tuple[list[float], dict]:
        """Scores JSON rows (``train.readers.batch_from_records``): the click probabilities and the version.

        Parsing runs outside the lock; the forward inside it, so the whole
        batch sees one version.

        Raises:
            RowError: a row that does not parse (nothing is scored).
            RuntimeError: no version yet (check ``ready`` first).
        """
        if not self.ready:
            raise RuntimeError("no model yet: no full snapshot applied")
        batch = batch_from_records(records, self.schema)
        with self.lock:
            version = self._version()
            logits = self.replica.model(batch) if len(batch) else None
        return ([] if logits is None else torch.sigmoid(logits).tolist()), version

    def _version(self) -> dict:
        return {"seq": self.replica.seq, "global_step": self.replica.global_step, "run_id": self.replica.run_id}

    def status(self) -> dict:
        """A consistent picture for /healthz and /metrics.

        Keys: ready, seq, global_step, run_id, wall_time (of the publication
        applied), refused, last_error, table_rows (slot -> rows), newest_seq and
        newest_mtime (the newest publication in the folder, and when its folder
        was last changed; None when there is none).
        """
        pubs = list_publications(self.export_dir)
        newest_seq, newest_mtime = None, None
        if pubs:
            newest_seq = pubs[-1][0]
            try:
                newest_mtime = os.stat(pubs[-1][2]).st_mtime
            except OSError:
                pass  # compacted away since it was listed
        out = {"ready": self.ready, "seq": None, "global_step": None, "run_id": None, "wall_time": None,
               "refused": len(self._load_refused), "last_error": self._load_error, "table_rows": {},
               "newest_seq": newest_seq, "newest_mtime": newest_mtime}
        replica = self.replica
        if replica is None:
            return out
        with self.lock:
            out.update(seq=replica.seq, global_step=replica.global_step, run_id=replica.run_id,
                       table_rows={name: len(table) for name, table in replica.tables.items()})
            if replica.seq is not None:
                out["wall_time"] = replica.wall_time
            if replica.refused or replica.last_error:
                out.update(refused=replica.refused, last_error=replica.last_error)
        return out
