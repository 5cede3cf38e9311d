"""Monolith's ``native_task.NativeContext``: the context of a training job.

Kept under Monolith's module name; the code lives in ``monolith_torch.step.context``.
"""

import importlib
import sys

# The same module object under both names, so every name (and a monkeypatch) is shared.
sys.modules[__name__] = importlib.import_module("monolith_torch.step.context")
