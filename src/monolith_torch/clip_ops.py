"""Monolith's ``clip_ops``: gradient clipping with TF semantics.

Kept under Monolith's module name; the code lives in ``monolith_torch.step.clip_ops``.
"""

import importlib
import sys

# The same module object under both names, so every name (and a monkeypatch) is shared.
sys.modules[__name__] = importlib.import_module("monolith_torch.step.clip_ops")
