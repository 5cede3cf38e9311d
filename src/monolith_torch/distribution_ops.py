"""Monolith's ``distribution_ops``: aligned flat concat/split of tensor lists.

Kept under Monolith's module name; the code lives in ``monolith_torch.distributed.flat_buffers``.
"""

import importlib
import sys

# The same module object under both names, so every name (and a monkeypatch) is shared.
sys.modules[__name__] = importlib.import_module("monolith_torch.distributed.flat_buffers")
