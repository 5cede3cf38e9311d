"""Persistent allreduce buckets: dense gradients that live in preallocated flat buffers.

DDP's ``gradient_as_bucket_view`` for :func:`~monolith_torch.distributed.allreduce.allreduce_cond`:
:class:`GradientBuckets` lays the parameters out in 64-byte-aligned flat buffers (one
per bucket, as fusion ``"one"`` would pack them) and makes each parameter's ``.grad``
a view into its buffer. Autograd accumulates into an existing ``.grad`` in place, so
after ``backward`` the gradients already sit in the buffers, and the allreduce reduces
each buffer in place: no packing copy, no unpacking, no allocation per step.
Monolith's semantics stay: the scale (e.g. the deferred clip factor) and ``1 / world``
ride on one in-place multiply (or on the cast into the fp16/bf16 wire buffer), and
``bucket_cap_bytes`` cuts the buffers.

May import :mod:`monolith_torch.distributed.config`, ``.compression``, ``.buckets``,
``.flat_buffers``, ``.torch_backend``, ``.horovod``, :mod:`monolith_torch.core` and torch.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from monolith_torch.distributed.buckets import bucket_indices, divide_scale
from monolith_torch.distributed.compression import compressor_for
from monolith_torch.distributed.config import AllreduceConfig
from monolith_torch.distributed.flat_buffers import (
    aligned_flat_layout,
    aligned_flat_views,
    check_scale,
)
from monolith_torch.distributed.horovod import allreduce_horovod
from monolith_torch.distributed.torch_backend import launch_allreduce, wait_all

__all__ = ["GradientBuckets"]


class GradientBuckets:
    """Flat gradient buffers that parameters' ``.grad`` views point into.

    The buffers are laid out exactly as ``allreduce_cond(fusion="one")`` with ``config``
    packs gradients shaped like ``params``: grouped by (device, dtype) in order of first
    appearance, cut at ``config.bucket_cap_bytes`` of wire data, every segment 64-byte
    aligned, padding zero. The layout depends only on shapes, dtypes and devices, so
    ranks that build it from the same parameter list agree.

    Typical step::

        buckets = GradientBuckets(model.parameters(), config)   # once
        buckets.zero_grad_()                                     # instead of grad = None
        loss.backward()                                          # writes into the buffers
        grads = allreduce_cond([p.grad for p in buckets.params], clip, config,
                               buckets=buckets)                  # in place, no copy
        optimizer.step()

    ``optimizer.zero_grad()`` (``set_to_none=True``) detaches the views; the next
    :meth:`zero_grad_` (before ``backward``) attaches them again. Gradients written by
    a backward that ran without the views (``.grad`` was ``None``, or
    ``create_graph=True``, under which autograd replaces ``.grad`` out of place) are
    new tensors: :func:`allreduce_cond` then takes its packing path for them, which is
    correct but not copy-free. The next ``backward`` overwrites the views, so an
    optimizer step deferred past it (an async step) must not read them. The buffers
    hold no state that must survive a restart.

    Args:
        params: floating tensors that require grad (leaf parameters), each once.
        config: sets ``bucket_cap_bytes`` and the wire dtype that sizes the buckets;
            ``None`` means ``AllreduceConfig()``. Reducing with another config later is
            still correct.

    Raises:
        TypeError: ``params`` holds something that is not a floating tensor, or
            ``config`` is not an :class:`AllreduceConfig`.
        ValueError: a parameter does not require grad or appears twice.
    """

    def __init__(
        self, params: Iterable[torch.Tensor], config: AllreduceConfig | None = None
    ) -> None:
        params = _checked_params(params)
        if config is None:
            config = AllreduceConfig()
        elif not isinstance(config, AllreduceConfig):
            raise TypeError(
                f"config must be an AllreduceConfig or None, got {type(config).__name__}"
            )
        comp = compressor_for(config.compression)
        views: list[torch.Tensor] = [params[0]] * len(params) if params else []
        buffers: list[torch.Tensor] = []
        positions = bucket_indices(params, comp, config.bucket_cap_bytes) if params else []
        for idx in positions:
            group = [params[i] for i in idx]
            sizes, total = aligned_flat_layout(
                [p.numel() for p in group], comp.wire_dtype(group[0].dtype)
            )
            buf = torch.zeros(total, dtype=group[0].dtype, device=group[0].device)
            buffers.append(buf)
            for i, view in zip(
                idx, aligned_flat_views(buf, sizes, [p.shape for p in group]), strict=True
            ):
                views[i] = view
        self._params = tuple(params)
        self._views = tuple(views)
        self._buffers = tuple(buffers)
        self._positions = tuple(tuple(idx) for idx in positions)
        self._bucket_of = {id(views[i]): k for k, idx in enumerate(positions) for i in idx}
        self._wires: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self.attach_()

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        """The parameters, in the order given."""
        return self._params

    @property
    def views(self) -> tuple[torch.Tensor, ...]:
        """Each parameter's gradient view, in the order of :attr:`params`."""
        return self._views

    @property
    def buffers(self) -> tuple[torch.Tensor, ...]:
        """The flat buffers, one per bucket, in allreduce order."""
        return self._buffers

    @property
    def bucket_positions(self) -> tuple[tuple[int, ...], ...]:
        """Positions in :attr:`params` of each bucket's parameters."""
        return self._positions

    def __repr__(self) -> str:
        sizes = ", ".join(f"{b.numel()}x{b.dtype}@{b.device}" for b in self._buffers)
        return f"GradientBuckets({len(self._params)} params, buffers=[{sizes}])"

    def attach_(self) -> None:
        """Points every parameter's ``.grad`` at its view, keeping the gradient's value.

        A parameter whose ``.grad`` is another tensor has it copied into the view (one
        copy); one whose ``.grad`` is ``None`` gets the view with whatever it holds.
        """
        with torch.no_grad():
            for p, view in zip(self._params, self._views, strict=True):
                grad = p.grad
                if grad is view:
                    continue
                if grad is not None:
                    view.copy_(grad)
                p.grad = view

    def zero_grad_(self) -> None:
        """Zeroes every buffer (one fill per bucket) and attaches the views as ``.grad``.

        Call it before ``backward`` where a step would set the gradients to ``None``.
        """
        with torch.no_grad():
            if self._buffers:
                torch._foreach_zero_(list(self._buffers))
            for p, view in zip(self._params, self._views, strict=True):
                if p.grad is not view:
                    p.grad = view

    def holds(self, grads: Sequence[torch.Tensor | None]) -> bool:
        """Whether ``grads`` are exactly :attr:`views`, in order: an identity check, no sync."""
        return len(grads) == len(self._views) and all(map(operator.is_, grads, self._views))

    def complete_buckets(self, grads: Sequence[torch.Tensor | None]) -> list[int]:
        """The buckets whose every view appears in ``grads`` exactly once, in bucket order.

        Costs a dict lookup per entry; :meth:`holds` is the cheaper check for the
        common case.
        """
        found: dict[int, set[int]] = {}
        counts: dict[int, int] = {}
        for g in grads:
            # The views are alive (held here), so a matching id is the view itself.
            k = self._bucket_of.get(id(g))
            if k is not None:
                found.setdefault(k, set()).add(id(g))
                counts[k] = counts.get(k, 0) + 1
        return [k for k in sorted(found) if counts[k] == len(found[k]) == len(self._positions[k])]

    def allreduce_(
        self,
        scale: float | torch.Tensor = 1.0,
        config: AllreduceConfig | None = None,
        *,
        buckets: Sequence[int] | None = None,
    ) -> list[torch.Tensor]:
        """Averages the buffers over the processes in place, times ``scale``.

        What :func:`allreduce_cond` runs when its gradients are :attr:`views`: the same
        values, bit for bit, as its packing path, without the copies. Every bucket is
        one in-place allreduce whatever ``config.fusion`` (the buckets are the fusion).
        ``x * scale / world`` is one in-place multiply per buffer; with fp16/bf16
        compression it is the cast into a persistent wire buffer, which is reduced and
        cast back into the buffer. When ``config.is_active()`` is false the buffers are
        only multiplied by ``scale`` (a python ``1`` touches nothing). Horovod: the
        views go through its packing path and the result is copied back. A tensor
        ``scale`` is never read on the host.

        Args:
            scale: python number or 0-d floating tensor.
            config: as for :func:`allreduce_cond`; ``None`` means ``AllreduceConfig()``.
            buckets: reduce only these buckets (positions in :attr:`buffers`); ``None``
                reduces all. Every rank must pass the same.

        Returns:
            :attr:`views` as a list.

        Raises:
            TypeError, ValueError: a bad ``scale`` or ``config``.
            RuntimeError: a collective failed or did not finish within ``config.timeout``.
        """
        if config is None:
            config = AllreduceConfig()
        elif not isinstance(config, AllreduceConfig):
            raise TypeError(
                f"config must be an AllreduceConfig or None, got {type(config).__name__}"
            )
        check_scale(scale)
        ks = range(len(self._buffers)) if buckets is None else list(buckets)
        if buckets is not None and not all(
            isinstance(k, int) and 0 <= k < len(self._buffers) for k in ks
        ):
            raise ValueError(
                f"Invalid buckets: {buckets!r}; expected positions in 0..{len(self._buffers) - 1}"
            )
        with torch.no_grad():
            if not config.is_active():
                if not (isinstance(scale, (int, float)) and scale == 1):
                    for k in ks:
                        self._buffers[k].mul_(scale)
            elif config.backend == "horovod":
                self._allreduce_horovod_(ks, scale, config)
            else:
                self._allreduce_torch_(ks, scale, config)
        return list(self._views)

    def _allreduce_torch_(
        self, ks: Iterable[int], scale: float | torch.Tensor, config: AllreduceConfig
    ) -> None:
        prescale = divide_scale(scale, dist.get_world_size(config.group))
        prescale_is_one = isinstance(prescale, (int, float)) and prescale == 1
        comp = compressor_for(config.compression)
        what = f"in-place allreduce of {len(self._params)} gradient view(s) (GradientBuckets)"
        pending = []
        # Bucket k travels while bucket k + 1 is scaled.
        for k in ks:
            buf = self._buffers[k]
            wire_dtype = comp.wire_dtype(buf.dtype)
            if wire_dtype == buf.dtype:
                if not prescale_is_one:
                    buf.mul_(prescale)
                wire = buf
            else:
                wire = self._wire(k, wire_dtype)
                # Scales in the gradient's precision and rounds once, as the packing path.
                torch.mul(buf, prescale, out=wire)
            pending.append((buf, wire, launch_allreduce(wire, config, what)))
        wait_all([work for *_, work in pending], config.timeout, what)
        for buf, wire, _ in pending:
            if wire is not buf:
                buf.copy_(wire)

    def _allreduce_horovod_(
        self, ks: Iterable[int], scale: float | torch.Tensor, config: AllreduceConfig
    ) -> None:
        views = [self._views[i] for k in ks for i in self._positions[k]]
        if views:
            torch._foreach_copy_(views, allreduce_horovod(views, scale, config))

    def _wire(self, k: int, dtype: torch.dtype) -> torch.Tensor:
        wire = self._wires.get((k, dtype))
        if wire is None:
            buf = self._buffers[k]
            wire = self._wires[(k, dtype)] = torch.empty(buf.shape, dtype=dtype, device=buf.device)
        return wire


def _checked_params(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors, got a single torch.Tensor")
    out = list(params)
    seen: set[int] = set()
    for i, p in enumerate(out):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if not p.dtype.is_floating_point:
            raise TypeError(f"params[{i}] must have a floating dtype, got {p.dtype}")
        if not p.requires_grad:
            raise ValueError(f"params[{i}] does not require grad; leave it out of GradientBuckets")
        if id(p) in seen:
            raise ValueError(f"params[{i}] appears twice; pass each parameter once")
        seen.add(id(p))
    return out
