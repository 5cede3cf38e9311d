"""The training job behind ``monolith-torch train``/``eval``/``predict``.

One process or many (``torchrun``): each rank reads every world-th batch,
dense gradients are averaged with the allreduce path, embedding tables are
replicated and receive identical updates (or, with ``sharded_tables``, sharded
row-wise: every rank then writes its shard of each checkpoint and evaluates
too), rank 0 writes logs and checkpoints.
Every step the ranks agree (one tiny allreduce) on whether all of them still
have data and no one was asked to stop, so they always leave the loop together.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from monolith_torch.checkpoint import (
    CheckpointError,
    remove_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from monolith_torch.core.fileio import atomic_write, check_target
from monolith_torch.embedding import table_state as ts
from monolith_torch.embedding.factory import HashTableFeatureFactory
from monolith_torch.step.api import apply_gradients_with_var_optimizer
from monolith_torch.step.context import NativeContext
from monolith_torch.step.types import GradClipType
from monolith_torch.sync.exporter import DeltaExporter, ExportError
from monolith_torch.train.build import build_run_model
from monolith_torch.train.config import ConfigError, TrainConfig
from monolith_torch.train.data import DataError, ReadStats, expand_paths, generate_criteo
from monolith_torch.train.follow import FileStream, RunClock, StreamPosition
from monolith_torch.train.metrics import StreamingAUC, auc, log_loss
from monolith_torch.train.progressive import ProgressiveValidation
from monolith_torch.train.readers import Batch, read_schema_batches
from monolith_torch.train.run_dir import (
    RunLock,
    RunPaths,
    first_restorable,
    model_settings,
    remove_orphan_temps,
    run_id,
    save_run_settings,
)

__all__ = ["Trainer", "TrainingDiverged", "state_digest", "StopRequested"]

logger = logging.getLogger("monolith_torch.train.trainer")

_KEEP_CHECKPOINTS = 3


class TrainingDiverged(RuntimeError):
    """The loss or the gradients went NaN/inf (and ``skip_nonfinite`` is off); nothing was saved after it."""

    def __init__(self, step: int, what: str, checkpoint: str | None):
        kept = f"the last good checkpoint {checkpoint!r} is kept" if checkpoint else "no checkpoint was written"
        super().__init__(
            f"training diverged at step {step}: {what} is not finite; {kept}. Lower the learning rates "
            "(dense_lr, vec_lr, bias_lr) or set skip_nonfinite = true to skip such steps"
        )
        self.step = step


class StopRequested(Exception):
    """Training stopped on SIGINT/SIGTERM after saving; ``exit_code`` is 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.exit_code = 128 + signum


def state_digest(factory: HashTableFeatureFactory, model: torch.nn.Module) -> str:
    """sha256 of the model's parameters and every table's rows (sorted by id) with optimizer state.

    Independent of the order in which rows were inserted, so replicas that
    hold the same state give the same digest. Sharded tables: a collective;
    every rank gets the digest of the union of all shards (what one process
    holding every row would give).
    """
    h = hashlib.sha256()
    group = factory.shard_group()
    for name, table in sorted(factory.tables.items()):
        full = table.state_dict()
        state = {k: full[k] for k in ts.learned_fields(full)}
        if group is not None:
            shards: list = [None] * dist.get_world_size(group)
            dist.all_gather_object(shards, state, group=group)
            state = ts.concat_states(shards)
        order = torch.argsort(state[ts.KEYS])
        h.update(name.encode())
        for key in ts.learned_fields(state):
            h.update(state[key][order].contiguous().numpy().tobytes())
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _dense_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = list(model.named_parameters())
    if cfg.dense_optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.dense_lr)
    if cfg.dense_optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.dense_lr)
    return torch.optim.SGD(params, lr=cfg.dense_lr)


class Trainer:
    """Builds the model and runs train / eval / predict for one ``TrainConfig``."""

    def __init__(self, cfg: TrainConfig, rank: int = 0, world: int = 1, show_progress: bool = True):
        self.cfg = cfg
        self.rank, self.world = rank, world
        self.paths = RunPaths(cfg.run_dir)
        self.show_progress = show_progress and rank == 0
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.follow and world > 1:
            raise ConfigError("Invalid follow: true (--follow trains in one process; see docs/REALTIME.md)")
        # The run's clock: table times (expiry, filter), export intervals.
        self.clock = RunClock(cfg.clock)
        built = build_run_model(cfg, time_fn=self.clock)
        self.schema, self.factory, self.embeddings, self.model = built.schema, built.factory, built.embeddings, built.model
        if cfg.clock == "data" and self.schema.timestamp is None:
            raise ConfigError("Invalid clock: 'data' (the schema has no timestamp feature to take the time from)")
        self.ctx = NativeContext(feature_factory=self.factory)
        self.optimizer = _dense_optimizer(cfg, self.model)
        # The run's one global step: the step increments it, the slices' learning rates read it.
        self.global_step = self.factory.global_step
        self.stats = ReadStats()
        self._stop_signal = 0
        self.last_checkpoint: str | None = None  # the newest checkpoint written or restored
        self.skipped_nonfinite = 0  # steps skipped for NaN/inf (skip_nonfinite)
        self.position = StreamPosition() if cfg.follow else None  # --follow: where the stream is
        self.progressive: ProgressiveValidation | None = None
        self.exporter: DeltaExporter | None = None

    # ------------------------------------------------------------ data

    def train_paths(self) -> list[str]:
        if self.cfg.data:
            return expand_paths(self.cfg.data)
        return [os.path.join(self.paths.data, "train.tsv")]

    def eval_paths(self) -> list[str]:
        if self.cfg.eval_data:
            return expand_paths(self.cfg.eval_data)
        if self.cfg.data:
            return []
        return [os.path.join(self.paths.data, "eval.tsv")]

    def prepare_data(self) -> None:
        """Writes the embedded default dataset on first use (rank 0; the others wait).

        SIGINT or SIGTERM while generating raises ``StopRequested`` (exit code
        130 / 143) after removing the file being written; files already
        complete stay (the next run uses them). Call from the main thread.
        """
        if not self.cfg.data and self.rank == 0:
            os.makedirs(self.paths.data, exist_ok=True)

            def stop(signum, _frame):
                # Further signals are ignored while the temp file is removed and the handlers put back.
                for s in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(s, signal.SIG_IGN)
                raise StopRequested(signum)

            handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                for name, rows, part in (
                    ("train.tsv", self.cfg.generated_train_rows, 0),
                    ("eval.tsv", self.cfg.generated_eval_rows, 1),
                ):
                    path = os.path.join(self.paths.data, name)
                    if not os.path.exists(path):
                        logger.info("generating %d rows of Criteo-format data into %s", rows, path)
                        generate_criteo(path, rows, seed=self.cfg.seed, part=part)
            except StopRequested as stop_request:
                logger.info("stopped by signal %d while generating data; no partial file left in %s",
                            stop_request.exit_code - 128, self.paths.data)
                raise
            finally:
                for s, h in handlers.items():
                    signal.signal(s, h)
        if self.world > 1:
            dist.barrier()

    def _own_batches(self, skip: int) -> Iterator[Batch]:
        """This rank's batches (its share of every block of input rows), over all epochs, after the first ``skip``."""
        paths = self.train_paths()
        own = 0
        for _ in range(self.cfg.epochs):
            for batch in self._read(paths, self.cfg.batch_size, self.stats,
                                      shard=(self.rank, self.world)):
                own += 1
                if own > skip:
                    yield batch

    # ------------------------------------------------------------ checkpoints

    def save(self) -> str | None:
        if self.rank == 0 or self.factory.shard_group() is not None:
            os.makedirs(self.paths.checkpoints, exist_ok=True)
        path = self.paths.checkpoint(int(self.global_step))
        # With several ranks a collective: replicas evict together and rank 0
        # writes; sharded tables: every rank writes its shard, rank 0 the manifest.
        save_checkpoint(path, self.ctx, self.model, self.optimizer, self.global_step, extra=self._extras())
        self.last_checkpoint = path
        if self.rank != 0:
            return path
        names = sorted(n for n in os.listdir(self.paths.checkpoints) if n.startswith("ckpt-") and n.endswith(".pt"))
        for old in names[:-_KEEP_CHECKPOINTS]:
            remove_checkpoint(os.path.join(self.paths.checkpoints, old))
        return path

    def _extras(self) -> dict:
        """What a checkpoint carries beside the state: stream position, data clock, progressive windows."""
        extra: dict = {"clock": self.clock.data_time}
        if self.position is not None:
            extra["stream"] = self.position.state_dict()
        if self.progressive is not None:
            extra["progressive"] = self.progressive.state_dict()
        return extra

    def restore_latest(self, required: bool, extra: dict | None = None) -> int:
        """Restores the newest checkpoint that is intact (warning about damaged newer ones); returns its step.

        The dense learning rate is the configured one afterwards, not the
        saved one: the printed effective config is what trains.

        Raises:
            ConfigError: no checkpoint and ``required``.
            CheckpointError: none of the checkpoints restores (the newest and why named).
        """
        candidates = self.paths.checkpoints_newest_first()
        if not candidates:
            if required:
                raise ConfigError(f"no checkpoint in {self.paths.checkpoints!r}; train first")
            return 0
        path = first_restorable(
            candidates,
            lambda p: restore_checkpoint(p, self.ctx, self.model, self.optimizer, self.global_step, extra=extra),
        )
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.dense_lr
        self.last_checkpoint = path
        logger.info("restored %s (global step %d)", path, int(self.global_step))
        return int(self.global_step)

    # ------------------------------------------------------------ training

    def _request_stop(self, signum, _frame) -> None:
        self._stop_signal = signum
        # A second signal falls through to the default behaviour.
        signal.signal(signum, signal.SIG_DFL)

    def _agree_to_continue(self, have_batch: bool) -> bool:
        go = have_batch and not self._stop_signal
        if self.world == 1:
            return go
        # One MAX over [out of data or stopping, the signal number].
        flags = torch.tensor([0 if go else 1, self._stop_signal], dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop_all, self._stop_signal = flags.tolist()
        return not stop_all

    def train(self) -> dict:
        """Trains (resuming when asked), checkpoints, evaluates; returns the final metrics.

        Rank 0 holds the run directory's lock for the whole run, and first
        removes temp files a killed run left behind.

        Raises:
            ConfigError: another trainer holds the run directory.
            TrainingDiverged: a NaN/inf loss or gradient (``skip_nonfinite`` off).
            StopRequested: SIGINT/SIGTERM, after saving.
        """
        lock = RunLock(self.paths).acquire() if self.rank == 0 else None
        try:
            if lock is not None:
                remove_orphan_temps(self.paths)
            return self._train()
        finally:
            if lock is not None:
                lock.release()

    def _restore_for_training(self) -> tuple[int, dict]:
        """--resume: the newest checkpoint; else --init-from: a checkpoint to start from. Returns (step, extras)."""
        cfg, extra = self.cfg, {}
        start = self.restore_latest(required=False, extra=extra) if cfg.resume else 0
        if self.last_checkpoint is None and cfg.init_from:
            try:
                restore_checkpoint(cfg.init_from, self.ctx, self.model, self.optimizer, self.global_step)
            except CheckpointError as e:
                raise CheckpointError(f"--init-from: {e}") from None
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.dense_lr
            logger.info("starting from %s (global step %d)", cfg.init_from, int(self.global_step))
            start = int(self.global_step)
        self.clock.data_time = int(extra.get("clock", 0))
        if self.position is not None and "stream" in extra:
            self.position = StreamPosition.from_state(extra["stream"])
        return start, extra

    def _train(self) -> dict:
        cfg = self.cfg
        self.prepare_data()
        start, extra = self._restore_for_training()
        writer = None
        if self.rank == 0:
            save_run_settings(self.paths, cfg)
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(self.paths.tensorboard)
            self.progressive = ProgressiveValidation(self.paths.progressive, cfg.progressive_window_rows,
                                                     cfg.progressive_window_seconds, writer)
            self.progressive.restore(extra.get("progressive"))
        if cfg.export_dir and (self.rank == 0 or self.factory.shard_group() is not None):
            # Replicated tables: rank 0 publishes; sharded: every rank its rows (collectives).
            try:
                self.exporter = DeltaExporter(
                    cfg.export_dir, run_id(self.paths) if self.rank == 0 else "", self.factory, self.model,
                    model_settings(cfg), cfg.sync_every, cfg.dense_sync_every, cfg.full_every, clock=self.clock)
                self.exporter.start(int(self.global_step))
            except ExportError as e:
                raise ConfigError(str(e)) from None
        handlers = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            metrics = self._train_loop(start, writer)
        except (TrainingDiverged, CheckpointError, OSError):
            raise  # a diverged state is not saved; a failed save is not retried
        except Exception:
            self._save_before_failing(start)
            raise
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        path = self.save()
        if self.exporter is not None:
            self.exporter.finish(int(self.global_step))
        if self.progressive is not None:
            self.progressive.flush(int(self.global_step))
        if self._stop_signal:
            if writer is not None:
                writer.close()
            logger.info("stopped by signal %d at step %d; checkpoint %s", self._stop_signal, int(self.global_step), path)
            raise StopRequested(self._stop_signal)
        # Sharded tables: lookups are collectives, so every rank evaluates (the same data).
        if (self.rank == 0 or self.factory.shard_group() is not None) and self.eval_paths():
            metrics.update({f"eval_{k}": v for k, v in self.evaluate().items()})
        if writer is not None:
            for key in ("eval_auc", "eval_log_loss"):
                if key in metrics:
                    writer.add_scalar(key, metrics[key], int(self.global_step))
            writer.close()
        if self.progressive is not None:
            metrics.update(self.progressive.summary())
        metrics["malformed_lines"], metrics["data_summary"] = self._data_summary()
        metrics["checkpoint"] = path
        metrics["state_digest"] = state_digest(self.factory, self.model)
        if self.rank == 0:
            with atomic_write(self.paths.metrics, "w") as f:
                json.dump(metrics, f, indent=2)
        return metrics

    def _save_before_failing(self, start: int) -> None:
        """After training started, an error (bad data under --strict, ...) first saves what was trained.

        One process only: with several ranks the others may be waiting in a
        collective, so a save (a collective) could not complete.
        """
        if self.world != 1 or int(self.global_step) <= start:
            return
        try:
            path = self.save()
            logger.warning("saved %s before stopping on an error", path)
        except Exception as e:  # the original error is the one to report
            logger.warning("could not save a checkpoint before stopping: %s", e)

    def _data_summary(self) -> tuple[int, str]:
        """Malformed-line count and summary over all ranks (each read its own share)."""
        if self.world == 1:
            return self.stats.skipped, self.stats.summary()
        totals = torch.tensor([self.stats.rows, self.stats.skipped], dtype=torch.int64)
        dist.all_reduce(totals)
        rows, skipped = totals.tolist()
        return skipped, f"{rows} rows read by {self.world} ranks, {skipped} malformed lines skipped"

    def _train_loop(self, start: int, writer) -> dict:
        cfg = self.cfg
        if self.position is not None:
            batches = self._follow_batches()
            logger.info("training from step %d, following %s", start, list(cfg.data))
        else:
            batches = self._own_batches(skip=start)
            logger.info("training from step %d on %d file(s)", start, len(self.train_paths()))
        running_auc = StreamingAUC()
        loss_sum, seen, step = 0.0, 0, start
        t0 = time.perf_counter()
        bar = tqdm(total=None, unit="ex", unit_scale=True, disable=not self.show_progress, mininterval=1.0,
                   desc="train")
        while not cfg.max_steps or step < cfg.max_steps:
            batch = next(batches, None)
            if not self._agree_to_continue(batch is not None):
                break
            self.clock.advance(batch.timestamps)
            loss, probs, applied = self._train_step(batch, writer, step)
            step += 1
            if self.position is not None:
                self.position.rows += len(batch)
            if self.exporter is not None:
                self._publish_due(step)
            if not applied:
                continue
            if self.progressive is not None:
                self.progressive.add(probs, batch.labels, batch.timestamps, step)
            loss_value = float(loss)
            loss_sum += loss_value * len(batch)
            seen += len(batch)
            running_auc.update(probs, batch.labels)
            bar.update(len(batch) * self.world)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss_value:.4f}", auc=f"{running_auc.result():.4f}", step=step)
            if writer is not None and step % cfg.summary_every == 0:
                writer.add_scalar("loss", loss_value, step)
                writer.add_scalar("train_auc", running_auc.result(), step)
                writer.add_scalar("examples_per_sec", seen * self.world / (time.perf_counter() - t0), step)
            if step % cfg.checkpoint_every == 0:
                self.save()
        bar.close()
        self.ctx.async_function_mgr.flush()
        elapsed = time.perf_counter() - t0
        return {
            "steps": int(self.global_step),
            "skipped_nonfinite": self.skipped_nonfinite,
            "train_examples": seen * self.world,
            "train_auc": running_auc.result(),
            "train_log_loss": loss_sum / seen if seen else float("nan"),
            "examples_per_sec": seen * self.world / elapsed if elapsed > 0 else 0.0,
            "seconds": elapsed,
        }

    def _publish_due(self, step: int) -> None:
        """Publishes what the clock says is due; sharded tables: rank 0's clock decides, for every rank."""
        exporter = self.exporter
        if exporter.group is None:
            exporter.maybe_publish(step)
            return
        kinds = (None, "delta", "full")
        code = torch.tensor([kinds.index(exporter.due()) if self.rank == 0 else 0], dtype=torch.int32)
        dist.all_reduce(code, op=dist.ReduceOp.MAX, group=exporter.group)
        if int(code):
            exporter.publish(kinds[int(code)], step)

    def _follow_batches(self) -> Iterator[Batch]:
        """--follow: batches of each new file in turn (a file's last batch may be short); updates ``position``.

        The loop counts the rows of each batch it trains into ``position.rows``;
        a file is done when its batches run out.
        """
        pos = self.position
        stream = FileStream(self.cfg.data, pos, self.cfg.follow_poll_s, self.cfg.follow_idle_exit,
                            should_stop=lambda: bool(self._stop_signal))
        for path in stream.files():
            if path != pos.current:
                pos.current, pos.rows = path, 0
            logger.info("reading %s%s", path, f" from row {pos.rows}" if pos.rows else "")
            yield from self._read([path], self.cfg.batch_size, self.stats, skip_rows=pos.rows)
            pos.done.add(path)
            pos.current, pos.rows = None, 0

    def _read(self, paths: list[str], batch_size: int, stats: ReadStats, shard=(0, 1),
              skip_rows: int = 0) -> Iterator[Batch]:
        cfg = self.cfg
        header = {"auto": None, "yes": True, "no": False}[cfg.header]
        return read_schema_batches(paths, self.schema, batch_size, stats, cfg.strict, shard=shard, header=header,
                                   delimiter=cfg.delimiter or None, skip_rows=skip_rows)

    def _train_step(self, batch: Batch, writer, step: int):
        summarize = writer is not None and (step + 1) % self.cfg.summary_every == 0
        self.ctx.summary_writer = writer if summarize else None
        self.model.train()
        logits = self.model(batch)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        objective = loss
        if self.position is not None and len(batch) < self.cfg.batch_size:
            # --follow: a file's short last batch weighs its rows as a full batch does
            # (the mean over fewer rows would move their ids batch_size / rows times as far).
            objective = loss * (len(batch) / self.cfg.batch_size)
        # The step checks gradients for NaN/inf before it updates anything (one
        # host sync; in several processes one tiny allreduce, so all ranks agree).
        result = apply_gradients_with_var_optimizer(
            self.ctx, [], self.optimizer, objective,
            clip_type=GradClipType.ClipByGlobalNorm, clip_norm=self.cfg.clip_norm, global_step=self.global_step,
            grads_and_vars_summary=summarize, use_allreduce=self.world > 1,
            dense_weight_decay=self.cfg.dense_weight_decay, model=self.model, skip_nonfinite=True,
        )
        if result.reason == "nonfinite":
            if not self.cfg.skip_nonfinite:
                raise TrainingDiverged(step + 1, "the loss or a gradient", self.last_checkpoint)
            self.skipped_nonfinite += 1
            logger.warning("step %d skipped: NaN/inf loss or gradient (%d so far)", step + 1,
                           self.skipped_nonfinite)
            return loss.detach(), None, False
        return loss.detach(), torch.sigmoid(logits.detach()), True

    # ------------------------------------------------------------ eval / predict

    @torch.no_grad()
    def _scores(self, paths: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        scores, labels = [], []
        self.model.eval()
        for batch in self._read(paths, self.cfg.eval_batch_size, ReadStats()):
            scores.append(torch.sigmoid(self.model(batch)))
            labels.append(batch.labels)
        if not scores:
            raise DataError(f"no rows to score in {paths}")
        return torch.cat(scores), torch.cat(labels)

    def evaluate(self, paths: list[str] | None = None) -> dict:
        """AUC and log-loss of the current model on held-out data."""
        probs, labels = self._scores(paths if paths is not None else self.eval_paths())
        return {"auc": auc(probs, labels), "log_loss": log_loss(probs, labels), "examples": int(labels.numel())}

    def predict(self, paths: list[str], output: str) -> int:
        """Writes ``score<TAB>label`` per input row to ``output`` (atomically); returns the row count.

        Raises:
            SymlinkTargetError: ``output`` is a symbolic link (checked before scoring).
            DataError: no rows to score, or an unreadable input.
        """
        check_target(output)
        probs, labels = self._scores(paths)
        with atomic_write(output, "w") as f:
            f.writelines(f"{p:.6f}\t{int(y)}\n" for p, y in zip(probs.tolist(), labels.tolist(), strict=True))
        return int(probs.numel())
