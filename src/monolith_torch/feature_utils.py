"""Monolith's ``feature_utils``: the step API (apply_gradients_with_var_optimizer, apply_gradients).

Kept under Monolith's module name; the code lives in ``monolith_torch.step.api``.
"""

import importlib
import sys

# The same module object under both names, so every name (and a monkeypatch) is shared.
sys.modules[__name__] = importlib.import_module("monolith_torch.step.api")
