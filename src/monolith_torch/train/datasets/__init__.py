"""Real data sets made ready to train: files in the layout the readers take, plus their schema TOML.

``prepare_movielens_100k(out_dir)``: MovieLens-100k from the ``recbole==1.2.1``
wheel, split by time into train/valid/test Parquet files (``movielens``).
"""

from monolith_torch.train.datasets.movielens import movielens_features, prepare_movielens_100k

__all__ = ["movielens_features", "prepare_movielens_100k"]
