"""Monolith's ``embedding_combiners``: how a feature's ids are pooled.

Kept under Monolith's module name; the code lives in ``monolith_torch.embedding.combiners``.
"""

import importlib
import sys

# The same module object under both names, so every name (and a monkeypatch) is shared.
sys.modules[__name__] = importlib.import_module("monolith_torch.embedding.combiners")
