"""One training step: Monolith's gradient application as a pipeline of small stages.

The step API (``apply_gradients_with_var_optimizer``, ``apply_gradients``),
its stages, clipping, summaries, ``NativeContext`` and the deferred-function
queue. May import ``core``, ``distributed`` and ``embedding``.
"""

from monolith_torch.step.api import apply_gradients, apply_gradients_with_var_optimizer
from monolith_torch.step.context import NativeContext
from monolith_torch.step.types import GradClipType, StepResult

__all__ = ["GradClipType", "NativeContext", "StepResult", "apply_gradients", "apply_gradients_with_var_optimizer"]
