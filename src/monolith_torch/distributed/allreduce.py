"""Data-parallel averaging of dense gradients: Monolith's ``allreduce_cond`` on torch.distributed.

Monolith averages dense gradients with Horovod or BytePS and picks the strategy from
environment variables read at import time. Here the engine is ``torch.distributed``
(gloo on CPU, NCCL on GPU), the choices live in a frozen :class:`AllreduceConfig`, and
the environment is read only by :meth:`AllreduceConfig.from_env`.

``backend="horovod"`` runs the same strategies on Horovod (``horovodrun``), the engine
Monolith used; ``scripts/build_horovod.sh`` builds it.

Every rank must call :func:`allreduce_cond` with the same list layout: the same
positions holding ``None``, and the same shapes, dtypes and devices elsewhere, as for
any collective.

This module checks the arguments and dispatches; the work lives in one module per
concern: ``config`` (:class:`AllreduceConfig`), ``compression``, ``buckets``,
``torch_backend``, ``horovod``, ``gradient_buckets`` (persistent buffers reduced in
place). It re-exports the config and compressor names under
their old home. May import every other module of :mod:`monolith_torch.distributed`,
:mod:`monolith_torch.core` and torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from monolith_torch.distributed.buckets import scaled_copies
from monolith_torch.distributed.compression import (
    HalfCompressor,
    NoneCompressor,
    compressor_for,
)
from monolith_torch.distributed.config import (
    BACKENDS,
    COMPRESSIONS,
    FUSIONS,
    AllreduceConfig,
)
from monolith_torch.distributed.flat_buffers import check_scale
from monolith_torch.distributed.gradient_buckets import GradientBuckets
from monolith_torch.distributed.horovod import allreduce_horovod
from monolith_torch.distributed.torch_backend import allreduce_torch

__all__ = [
    "BACKENDS",
    "COMPRESSIONS",
    "FUSIONS",
    "AllreduceConfig",
    "GradientBuckets",
    "HalfCompressor",
    "NoneCompressor",
    "allreduce_cond",
    "compressor_for",
]


def _scaled(tensors: list[torch.Tensor], scale: float | torch.Tensor) -> list[torch.Tensor]:
    if isinstance(scale, (int, float)) and scale == 1:
        return list(tensors)
    return scaled_copies(tensors, scale)


def allreduce_cond(
    grads: Sequence[torch.Tensor | None],
    scale: float | torch.Tensor = 1.0,
    config: AllreduceConfig | None = None,
    *,
    buckets: GradientBuckets | None = None,
) -> list[torch.Tensor | None]:
    """Averages dense gradients over the data-parallel processes, times ``scale``.

    Re-creates Monolith's ``feature_utils.allreduce_cond``. Out of place (except for
    ``buckets``, below): the inputs are never modified. ``scale`` (e.g. a deferred
    global-norm clip factor) is applied exactly once on every path; as a tensor it is
    never read on the host (no sync). Runs under ``torch.no_grad()``: the results carry
    no autograd history. With fusion ``"one"`` the results are views into one flat
    buffer per bucket. When :meth:`AllreduceConfig.is_active` is false (no process
    group, world size 1, or ``skip``) nothing is communicated and the result is
    ``grads * scale``; with the python number ``1`` the input tensors themselves come
    back.

    With ``buckets``, gradients that are its :attr:`GradientBuckets.views` are reduced
    in place, a whole buffer at a time, and come back as themselves: no packing copy.
    ``grads`` being exactly the views in order is one identity check per entry; other
    entries, and views of a bucket that ``grads`` does not hold entirely, take the
    packing path. The values are the same as the packing path's.

    Args:
        grads: floating gradients; ``None`` entries keep their positions. Every rank
            must pass the same layout (``None`` positions, shapes, dtypes, devices,
            and, with ``buckets``, which entries are views).
        scale: python number or 0-d floating tensor multiplying the average.
        config: strategy, compression, backend, group and timeout; ``None`` means
            ``AllreduceConfig()`` (torch backend, default group, no fusion).
        buckets: persistent gradient buffers whose views may be reduced in place.

    Returns:
        A new list, same length and ``None`` positions as ``grads``.

    Raises:
        TypeError: ``grads`` is not a list of tensors/``None``, a gradient is not
            floating, or ``scale``/``config``/``buckets`` has the wrong type.
        ValueError: ``scale`` is a tensor that is not 0-d.
        RuntimeError: a collective failed or did not finish within ``config.timeout``
            (a peer died, hung or never joined); the message says which.
    """
    if config is None:
        config = AllreduceConfig()
    elif not isinstance(config, AllreduceConfig):
        raise TypeError(f"config must be an AllreduceConfig or None, got {type(config).__name__}")
    if isinstance(grads, torch.Tensor) or not isinstance(grads, Sequence):
        raise TypeError(f"grads must be a list of tensors or None, got {type(grads).__name__}")
    if buckets is not None:
        if not isinstance(buckets, GradientBuckets):
            raise TypeError(
                f"buckets must be a GradientBuckets or None, got {type(buckets).__name__}"
            )
        if buckets.holds(grads):
            # The views need none of the per-tensor checks below (0.5 ms per 1000).
            return buckets.allreduce_(scale, config)
    positions: list[int] = []
    tensors: list[torch.Tensor] = []
    for i, g in enumerate(grads):
        if g is None:
            continue
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"grads[{i}] must be a torch.Tensor or None, got {type(g).__name__}")
        if not g.dtype.is_floating_point:
            raise TypeError(f"grads[{i}] must have a floating dtype, got {g.dtype}")
        positions.append(i)
        tensors.append(g)
    check_scale(scale)
    result: list[torch.Tensor | None] = list(grads)
    if not tensors:
        return result
    # Gradients are data here: a scale that requires grad must not drag the buffers
    # into the autograd graph (and out= copies would refuse it).
    with torch.no_grad():
        complete = [] if buckets is None else buckets.complete_buckets(tensors)
        if complete:
            reduced = _reduce_partly_in_place(tensors, scale, config, buckets, complete)
        else:
            reduced = _reduce(tensors, scale, config)
    for i, t in zip(positions, reduced, strict=True):
        result[i] = t
    return result


def _reduce(
    tensors: list[torch.Tensor], scale: float | torch.Tensor, config: AllreduceConfig
) -> list[torch.Tensor]:
    if not config.is_active():
        return _scaled(tensors, scale)
    if config.backend == "horovod":
        return allreduce_horovod(tensors, scale, config)
    return allreduce_torch(tensors, scale, config)


def _reduce_partly_in_place(
    tensors: list[torch.Tensor],
    scale: float | torch.Tensor,
    config: AllreduceConfig,
    buckets: GradientBuckets,
    complete: list[int],
) -> list[torch.Tensor]:
    # Whole buckets in place first, then the rest packed: the same collectives in the
    # same order on every rank, as long as every rank passes views at the same places.
    buckets.allreduce_(scale, config, buckets=complete)
    views = buckets.views
    in_place = {id(views[i]) for k in complete for i in buckets.bucket_positions[k]}
    rest = [j for j, t in enumerate(tensors) if id(t) not in in_place]
    reduced = list(tensors)
    if rest:
        for j, r in zip(rest, _reduce([tensors[j] for j in rest], scale, config), strict=True):
            reduced[j] = r
    return reduced
