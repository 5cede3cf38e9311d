"""Deferred execution of per-step functions: Monolith's ``AsyncFunctionMgr``.

Monolith runs such functions one session step late through prefetch queues,
so a step's dense update overlaps the next step's forward pass. In eager
PyTorch the same schedule is an explicit queue: calls queued during step k run
when step k+1 calls ``run_pending()`` (the step function does this right after
its gradients are computed), on a snapshot of their arguments.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils._pytree import tree_map

__all__ = ["AsyncFunctionMgr"]

logger = logging.getLogger(__name__)


def _snapshot(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return value


@dataclass
class _Call:
    target: Callable
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def run(self):
        return self.target(*self.args, **self.kwargs)


class AsyncFunctionMgr:
    """Runs functions now, or one step later when asynchronous.

    Args:
        is_async: default for ``add_async_function(is_async=None)``.
    """

    def __init__(self, is_async: bool = True):
        self._is_async = bool(is_async)
        self._queues: OrderedDict[str, list[_Call]] = OrderedDict()

    @property
    def is_async(self) -> bool:
        return self._is_async

    def add_async_function(
        self,
        target: Callable,
        args=None,
        kwargs=None,
        is_async: bool | None = None,
        queue_name: str = "async_queue",
        *,
        snapshot: bool = True,
    ):
        """Calls ``target(*args, **kwargs)`` now, or queues it for the next step.

        Args:
            target: the function.
            args, kwargs: its arguments; tensors among them are copied when
                queued (``snapshot=True``), so later in-place changes by the
                caller do not reach the deferred call.
            is_async: overrides the manager's default for this call.
            queue_name: calls of one queue run in the order they were added.
            snapshot: pass False when the caller hands over tensors it will
                never touch again (saves a copy).

        Returns:
            The function's result when run now; None when queued.
        """
        if not callable(target):
            raise TypeError(f"target must be callable, got {type(target).__name__}")
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        run_async = self._is_async if is_async is None else bool(is_async)
        if not run_async:
            return target(*args, **kwargs)
        if snapshot:
            args, kwargs = tree_map(_snapshot, (args, kwargs))
        self._queues.setdefault(queue_name, []).append(_Call(target, args, kwargs))
        return None

    def num_pending(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def run_pending(self) -> int:
        """Runs every queued call, queue by queue in insertion order; returns how many ran."""
        ran = 0
        while self._queues:
            name, calls = next(iter(self._queues.items()))
            # Pop before running, so a call that raises is not retried, and the
            # calls after it stay queued for the next run_pending/flush.
            call = calls.pop(0)
            if not calls:
                del self._queues[name]
            call.run()
            ran += 1
        return ran

    def flush(self) -> int:
        """Runs what is pending; call it before saving or reading final values."""
        ran = self.run_pending()
        if ran:
            logger.debug("AsyncFunctionMgr.flush ran %d deferred call(s)", ran)
        return ran
