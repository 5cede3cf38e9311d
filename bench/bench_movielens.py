"""Test AUC on MovieLens-100k's temporal split: our DeepFM vs DeepCTR-Torch 0.3.0's DeepFM, side by side.

Question: on real data, does monolith-torch's DeepFM (collisionless hash
tables, Monolith's FTRL/Adagrad slices, the schema readers) reach at least the
test AUC of an established PyTorch CTR library's DeepFM on identical rows and
features? And what do collisionless tables buy over ids folded into 1,000
hashed buckets per feature?

- ours: ``train.models.DeepFM`` over ``prepare_movielens_100k``'s schema, read
  with ``read_schema_batches`` (file order, i.e. time order), trained with
  ``apply_gradients_with_var_optimizer`` (global-norm clip 10, dense Adam),
  as ``monolith-torch train`` does (``--step torch``: backward, Adam,
  ``sparse_step``, no clip).
- ours, 1,000 buckets: the same with ``schema.with_buckets(1000)``.
- peer: DeepCTR-Torch 0.3.0's ``DeepFM`` (linear + FM + DNN (256, 128)) on the
  same rows, the same features label-encoded (vocabularies over all splits, as
  its examples do), embedding dim 16, its defaults otherwise (Adam 1e-3,
  L2 1e-5 on embeddings and the linear part, shuffled batches).

Each model trains epoch by epoch on ``train``; after each epoch it scores
``valid`` and ``test``; training stops after ``--patience`` epochs without a
better validation AUC, and the test AUC of the best validation epoch is
reported, per seed, with the mean over seeds. The protocol and the measured
table are in docs/movielens.md.

    python bench/bench_movielens.py [--data DIR] [--wheel-dir DIR] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
import tomllib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import add_threads_argument, apply_threads, machine_line  # noqa: E402
from monolith_torch.step.api import apply_gradients_with_var_optimizer  # noqa: E402
from monolith_torch.step.context import NativeContext  # noqa: E402
from monolith_torch.step.types import GradClipType  # noqa: E402
from monolith_torch.train.datasets import movielens_features, prepare_movielens_100k  # noqa: E402
from monolith_torch.train.metrics import auc  # noqa: E402
from monolith_torch.train.models import build_embeddings, build_model  # noqa: E402
from monolith_torch.train.readers import read_schema_batches  # noqa: E402
from monolith_torch.train.schema import Schema, load_schema  # noqa: E402

SPLITS = ("train", "valid", "test")
ID_COLUMNS = ("user_id", "item_id", "age_bucket", "gender", "occupation", "zip_prefix", "release_year")


# ---------------------------------------------------------------- ours


def _scores(model, path: str, schema: Schema, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    scores, labels = [], []
    with torch.no_grad():
        for batch in read_schema_batches([path], schema, batch_size):
            scores.append(torch.sigmoid(model(batch)))
            labels.append(batch.labels)
    model.train()
    return torch.cat(scores), torch.cat(labels)


def run_ours(schema: Schema, paths: dict, seed: int, args) -> dict:
    torch.manual_seed(seed)
    embeddings = build_embeddings(schema, seed=seed)
    model = build_model("deepfm", schema, embeddings, hidden=(256, 128))
    ctx = NativeContext(feature_factory=embeddings.factory)
    opt = torch.optim.Adam(model.parameters(), lr=args.dense_lr)
    step = torch.zeros((), dtype=torch.int64)
    rng = np.random.default_rng(seed)
    train = pq.read_table(paths["train"]) if args.shuffle else None

    def train_epoch():
        path = paths["train"]
        if args.shuffle:
            # This epoch's order: the training rows permuted, written where the reader streams them from.
            path = os.path.join(args.scratch, f"train-shuffled-{os.getpid()}.parquet")
            pq.write_table(train.take(rng.permutation(train.num_rows)), path)
        for batch in read_schema_batches([path], schema, args.batch_size):
            loss = F.binary_cross_entropy_with_logits(model(batch), batch.labels)
            if args.step == "monolith":
                apply_gradients_with_var_optimizer(ctx, [], opt, loss, clip_type=GradClipType.ClipByGlobalNorm,
                                                   clip_norm=10.0, global_step=step, model=model)
            else:  # PyTorch's way: no clip
                opt.zero_grad()
                loss.backward()
                opt.step()
                embeddings.sparse_step()

    def score(split):
        return auc(*_scores(model, paths[split], schema, 8192))

    return _early_stopping(train_epoch, score, args)


# ---------------------------------------------------------------- the peer


def import_peer():
    """DeepCTR-Torch's DeepFM and inputs, or None with the reason.

    deepctr_torch starts a thread at import that asks PyPI for its latest
    version; the bench is offline, so ``requests.get`` fails at once here
    (for the rest of the process: the thread may call it late).
    """
    try:
        import requests

        def offline(*_args, **_kwargs):
            raise requests.ConnectionError("bench_movielens: no network calls")

        requests.get = offline
        from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
        from deepctr_torch.models import DeepFM
    except ImportError as err:
        return None, f"{err} (install with: pip install -c constraints.txt 'monolith-torch[peers]')"
    return (DeepFM, SparseFeat, VarLenSparseFeat), ""


def _encode(tables: dict) -> tuple[dict, dict, int]:
    """Label-encoded inputs per split (0 = missing; genres padded with 0), vocabulary sizes, genre maxlen."""
    inputs = {split: {} for split in tables}
    vocab = {}
    for column in ID_COLUMNS:
        values = [np.asarray(pc.cast(tables[s][column], pa.string()).fill_null("<missing>").to_pylist(), dtype=object)
                  for s in SPLITS]
        uniques, codes = np.unique(np.concatenate(values), return_inverse=True)
        vocab[column] = len(uniques) + 1
        start = 0
        for split, v in zip(SPLITS, values, strict=True):
            inputs[split][column] = codes[start : start + len(v)] + 1
            start += len(v)
    genres = {s: tables[s]["genres"].to_pylist() for s in SPLITS}
    names = sorted({g for s in SPLITS for row in genres[s] for g in row or []})
    index = {g: i + 1 for i, g in enumerate(names)}
    maxlen = max(len(row or []) for s in SPLITS for row in genres[s])
    for split in SPLITS:
        padded = np.zeros((len(genres[split]), maxlen), dtype=np.int64)
        for r, row in enumerate(genres[split]):
            padded[r, : len(row or [])] = [index[g] for g in row or []]
        inputs[split]["genres"] = padded
    vocab["genres"] = len(names) + 1
    return inputs, vocab, maxlen


def run_peer(peer, tables: dict, seed: int, args) -> dict:
    DeepFM, SparseFeat, VarLenSparseFeat = peer
    inputs, vocab, maxlen = _encode(tables)
    columns = [SparseFeat(c, vocabulary_size=vocab[c], embedding_dim=args.dim) for c in ID_COLUMNS]
    columns.append(VarLenSparseFeat(SparseFeat("genres", vocabulary_size=vocab["genres"], embedding_dim=args.dim),
                                    maxlen=maxlen, combiner="mean"))
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = DeepFM(columns, columns, task="binary", seed=seed, device="cpu", dnn_hidden_units=(256, 128))
    model.compile(torch.optim.Adam(model.parameters(), lr=args.peer_lr), "binary_crossentropy")
    fit_shuffle = getattr(args, "shuffle", True)
    labels = {s: tables[s]["label"].to_numpy().astype(np.float32) for s in SPLITS}

    def train_epoch():
        with contextlib.redirect_stdout(io.StringIO()):  # fit prints a header even with verbose=0
            model.fit(inputs["train"], labels["train"], batch_size=args.batch_size, epochs=1, verbose=0,
                      shuffle=fit_shuffle)

    def score(split):
        probs = model.predict(inputs[split], batch_size=8192).reshape(-1)
        return auc(torch.from_numpy(probs.astype(np.float64)), torch.from_numpy(labels[split]))

    return _early_stopping(train_epoch, score, args)


# ---------------------------------------------------------------- the protocol


def _early_stopping(train_epoch, score, args) -> dict:
    best = {"valid_auc": -1.0, "test_auc": float("nan"), "epoch": 0}
    waited = 0
    t0 = time.perf_counter()
    for epoch in range(1, args.max_epochs + 1):
        train_epoch()
        valid, test = score("valid"), score("test")
        if valid > best["valid_auc"]:
            best, waited = {"valid_auc": valid, "test_auc": test, "epoch": epoch}, 0
        else:
            waited += 1
            if waited >= args.patience:
                break
    best["seconds"] = time.perf_counter() - t0
    return best


def _prepare(args) -> dict:
    paths = {s: os.path.join(args.data, f"{s}.parquet") for s in SPLITS}
    paths["schema"] = os.path.join(args.data, "schema.toml")
    if not all(os.path.isfile(p) for p in paths.values()):
        print(f"preparing MovieLens-100k into {args.data} ...", flush=True)
        paths = prepare_movielens_100k(args.data, wheel_dir=args.wheel_dir)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.path.join("runs", "movielens-100k"), help="prepared data (made if missing)")
    parser.add_argument("--wheel-dir", default=None, help="where the recbole wheel is or is downloaded to")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dim", type=int, default=16, help="embedding width of every feature, both models")
    parser.add_argument("--vec-lr", type=float, default=0.5, help="ours: Adagrad learning rate of the vectors")
    parser.add_argument("--bias-lr", type=float, default=0.05, help="ours: FTRL learning rate of the biases")
    parser.add_argument("--dense-lr", type=float, default=1e-3, help="ours: Adam learning rate of the MLPs")
    parser.add_argument("--peer-lr", type=float, default=1e-3, help="peer: Adam learning rate (its default)")
    parser.add_argument("--buckets", type=int, default=1000)
    parser.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                        help="train in file (time) order; default: both models shuffle the rows every epoch")
    parser.add_argument("--step", choices=("monolith", "torch"), default="monolith",
                        help="ours: apply_gradients_with_var_optimizer (clip 10, as the trainer) or "
                             "backward + Adam + sparse_step (no clip)")
    parser.add_argument("--only", choices=("ours", "hashed", "peer"), nargs="+", default=["ours", "hashed", "peer"])
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    apply_threads(args)
    paths = _prepare(args)
    args.scratch = args.data
    # The schema as prepared, with this run's dims and learning rates.
    with open(paths["schema"], "rb") as f:
        prepared = load_schema(tomllib.load(f)["features"])
    schema = load_schema(movielens_features(dim=args.dim, vec_lr=args.vec_lr, bias_lr=args.bias_lr))
    if schema.columns != prepared.columns:
        raise SystemExit(f"{paths['schema']}: columns {prepared.columns} differ from this bench's {schema.columns}")
    tables = {s: pq.read_table(paths[s]) for s in SPLITS}
    print(machine_line())
    print("rows: " + ", ".join(f"{s} {tables[s].num_rows}" for s in SPLITS))
    candidates = {}
    if "ours" in args.only:
        candidates["ours (collisionless)"] = lambda seed: run_ours(schema, paths, seed, args)
    if "hashed" in args.only:
        hashed = schema.with_buckets(args.buckets)
        candidates[f"ours, {args.buckets} buckets"] = lambda seed: run_ours(hashed, paths, seed, args)
    peer, why = import_peer() if "peer" in args.only else (None, "not asked for")
    if peer is not None:
        candidates["DeepCTR-Torch 0.3.0 DeepFM"] = lambda seed: run_peer(peer, tables, seed, args)
    elif "peer" in args.only:
        print(f"peer skipped: deepctr-torch is not installed ({why})")
    results: dict[str, list[dict]] = {name: [] for name in candidates}
    for seed in args.seeds:
        for name, run in candidates.items():
            r = run(seed)
            results[name].append(r)
            print(f"seed {seed}  {name:<28} test AUC {r['test_auc']:.4f}  (valid {r['valid_auc']:.4f}, "
                  f"epoch {r['epoch']}, {r['seconds']:.0f}s)", flush=True)
    print()
    print(f"{'model':<28} " + " ".join(f"seed {s:<3}" for s in args.seeds) + "   mean     std")
    means = {}
    for name, rs in results.items():
        tests = [r["test_auc"] for r in rs]
        means[name] = statistics.fmean(tests)
        spread = statistics.stdev(tests) if len(tests) > 1 else 0.0
        print(f"{name:<28} " + " ".join(f"{t:.4f}  " for t in tests) + f" {means[name]:.4f}  {spread:.4f}")
    baseline = "DeepCTR-Torch 0.3.0 DeepFM"
    if baseline in means:
        for name, m in means.items():
            if name != baseline:
                print(f"{name}: mean test AUC {m - means[baseline]:+.4f} vs {baseline} "
                      f"(ratio {m / means[baseline]:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
