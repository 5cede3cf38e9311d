"""Slice optimizers: one small class per ``entry`` optimizer config, found through a registry.

Each class re-creates one of Monolith's hash-table optimizer kernels
(``monolith/native_training/runtime/hash_table/optimizer/*_optimizer.cc``) on
a block of gathered rows, in the shape of torch.optim's functional
``adagrad()``/``adam()``: it names its per-row state, gives the state's
initial value, and maps (rows ``w`` [U, d], summed gradients ``g`` [U, d],
state [U, d] each, learning rate) to the new rows. ``EmbeddingTable`` gathers
and scatters the rows; nothing here knows about ids or storage.

A new optimizer is one class: subclass ``SliceOptimizer`` and decorate it
with ``register_slice_optimizer(ConfigType)``.

May import ``entry`` and torch only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch

from monolith_torch.embedding import entry

__all__ = [
    "AdagradSlice",
    "AdamSlice",
    "FtrlSlice",
    "MomentumSlice",
    "RmspropSlice",
    "SgdSlice",
    "SliceOptimizer",
    "check_learning_rate_fn",
    "learning_rate_at",
    "register_slice_optimizer",
    "slice_optimizer_for",
]


class SliceOptimizer:
    """The update rule of one slice, bound to its ``entry`` optimizer config.

    Subclasses set ``state_names`` and implement ``update``; the constructor
    validates options the rule does not implement.

    Args:
        config: the slice's ``entry.Optimizer``.
    """

    state_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: entry.Optimizer):
        self.config = config

    def initial_state(self, name: str) -> float:
        """The value state ``name`` holds in a new row."""
        return 0.0

    def update(self, w: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], lr: float) -> torch.Tensor:
        """One step on gathered rows ``w`` [U, d] with summed gradients ``g`` [U, d].

        ``state`` maps each of ``state_names`` to gathered [U, d] float32
        tensors, updated in place; ``w`` and ``g`` are not modified.

        Returns:
            The new rows [U, d].
        """
        raise NotImplementedError


# The registry is filled at import, by the decorators below (and by users'
# own optimizers); reading it is all the table does.
_REGISTRY: dict[type, type[SliceOptimizer]] = {}


def register_slice_optimizer(config_type: type) -> Callable[[type[SliceOptimizer]], type[SliceOptimizer]]:
    """Class decorator: slices whose optimizer config is exactly ``config_type`` use the class.

    Raises:
        TypeError: ``config_type`` is not an ``entry.Optimizer`` class, or the
            decorated class is not a ``SliceOptimizer``.
        ValueError: ``config_type`` already has a slice optimizer.
    """
    if not (isinstance(config_type, type) and issubclass(config_type, entry.Optimizer)):
        raise TypeError(f"config_type must be an entry.Optimizer subclass, got {config_type!r}")

    def register(cls: type[SliceOptimizer]) -> type[SliceOptimizer]:
        if not (isinstance(cls, type) and issubclass(cls, SliceOptimizer)):
            raise TypeError(f"a slice optimizer must subclass SliceOptimizer, got {cls!r}")
        if config_type in _REGISTRY:
            raise ValueError(
                f"Invalid config_type: {config_type.__name__} already uses {_REGISTRY[config_type].__name__}"
            )
        _REGISTRY[config_type] = cls
        return cls

    return register


def slice_optimizer_for(config: entry.Optimizer) -> SliceOptimizer:
    """The registered slice optimizer of ``config``, bound to it.

    Raises:
        TypeError: no slice optimizer is registered for ``type(config)``.
        ValueError: ``config`` sets options its slice optimizer does not implement.
    """
    cls = _REGISTRY.get(type(config))
    if cls is None:
        raise TypeError(f"unsupported optimizer {type(config).__name__}")
    return cls(config)


def check_learning_rate_fn(learning_rate_fn) -> None:
    """Raises ValueError unless ``learning_rate_fn`` is None, a callable or a finite float > 0."""
    if learning_rate_fn is not None and not callable(learning_rate_fn):
        lr = float(learning_rate_fn)
        if not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"Invalid learning_rate_fn: {learning_rate_fn!r} (expected a float > 0 or a callable)")


def learning_rate_at(optimizer: entry.Optimizer, learning_rate_fn, global_step: int) -> float:
    """The learning rate of a slice at ``global_step``.

    ``learning_rate_fn`` (a float, or a function of the global step) overrides
    the optimizer's ``learning_rate``; ``warmup_steps`` then scales it linearly
    from 0 (Monolith's polynomial warmup with power 1).
    """
    if callable(learning_rate_fn):
        lr = float(learning_rate_fn(global_step))
    elif learning_rate_fn is not None:
        lr = float(learning_rate_fn)
    else:
        lr = optimizer.effective_learning_rate()
    if optimizer.warmup_steps:
        lr *= min(global_step, optimizer.warmup_steps) / optimizer.warmup_steps
    return lr


# The op sequences below are the table's results bit for bit: reordering them
# changes rounding, and with it every checkpoint digest.


@register_slice_optimizer(entry.SgdOptimizer)
class SgdSlice(SliceOptimizer):
    """``w -= lr * g``."""

    def update(self, w, g, state, lr):
        return w - lr * g


@register_slice_optimizer(entry.AdagradOptimizer)
class AdagradSlice(SliceOptimizer):
    """``g' = g + wd*w; acc += g'^2; w -= lr * g' / sqrt(acc)``, no epsilon, as Monolith's kernel."""

    state_names = ("accumulator",)

    def initial_state(self, name):
        return float(self.config.initial_accumulator_value or 0.0)

    def update(self, w, g, state, lr):
        opt = self.config
        if opt.weight_decay_factor:
            g = g + opt.weight_decay_factor * w
        acc = state["accumulator"]
        acc.add_(g * g)
        # No epsilon, as Monolith's kernel: acc starts at initial_accumulator_value.
        # A column whose accumulator is still 0 also had g' = 0: it stays as it is
        # (0 / sqrt(0) would be NaN).
        return torch.where(acc > 0, w - lr * g / acc.sqrt(), w)


@register_slice_optimizer(entry.FtrlOptimizer)
class FtrlSlice(SliceOptimizer):
    """FTRL-Proximal (McMahan et al. 2013), state ``n`` (sum of g^2) and ``z``.

    ``sigma = (sqrt(n + g^2) - sqrt(n)) / lr; z += g - sigma*w; n += g^2;``
    ``w = (sign(z)*l1 - z) / ((sqrt(n) + beta)/lr + l2)`` where ``|z| > l1``, else 0.
    A learning rate of 0 (warmup step 0) leaves rows and state as they are.
    """

    state_names = ("n", "z")

    def initial_state(self, name):
        return float(self.config.initial_accumulator_value or 0.0) if name == "n" else 0.0

    def update(self, w, g, state, lr):
        opt = self.config
        n, z = state["n"], state["z"]
        l1 = float(opt.l1_regularization or 0.0)
        l2 = float(opt.l2_regularization or 0.0)
        beta = float(opt.beta or 0.0)
        if lr <= 0:  # warmup step 0: sigma would divide by zero; FTRL leaves the row as is
            return w
        n_new = n + g * g
        sigma = (n_new.sqrt() - n.sqrt()) / lr
        z.add_(g - sigma * w)
        n.copy_(n_new)
        w_new = lr * (torch.sign(z) * l1 - z) / (n.sqrt() + beta + l2 * lr)
        return torch.where(z.abs() > l1, w_new, torch.zeros_like(w_new))


@register_slice_optimizer(entry.AdamOptimizer)
class AdamSlice(SliceOptimizer):
    """Adam with per-row step counts ``steps``; ``g' = g + wd*w`` first.

    ``m = b1*m + (1-b1)*g'; v = b2*v + (1-b2)*g'^2;``
    ``w -= lr * m/(1-b1^steps) / (sqrt(v/(1-b2^steps)) + epsilon)``.

    Raises:
        ValueError: ``use_beta1_warmup`` or ``use_nesterov`` (not implemented).
    """

    state_names = ("m", "v", "steps")

    def __init__(self, config: entry.AdamOptimizer):
        if config.use_beta1_warmup or config.use_nesterov:
            raise ValueError("AdamOptimizer: use_beta1_warmup and use_nesterov are not supported by this store")
        super().__init__(config)

    def update(self, w, g, state, lr):
        opt = self.config
        if opt.weight_decay_factor:
            g = g + opt.weight_decay_factor * w
        m, v, steps = state["m"], state["v"], state["steps"]
        steps.add_(1.0)
        m.mul_(opt.beta1).add_((1 - opt.beta1) * g)
        v.mul_(opt.beta2).add_((1 - opt.beta2) * g * g)
        m_hat = m / (1 - torch.pow(opt.beta1, steps))
        v_hat = v / (1 - torch.pow(opt.beta2, steps))
        return w - lr * m_hat / (v_hat.sqrt() + opt.epsilon)


@register_slice_optimizer(entry.MomentumOptimizer)
class MomentumSlice(SliceOptimizer):
    """Monolith's momentum kernel (``momentum_optimizer.cc``), velocity ``n`` (learning rate included).

    ``g' = g + wd*w; n' = momentum*n - lr*g'``; then ``w += n'``, or with
    ``use_nesterov`` ``w += -momentum*n + (1 + momentum)*n'`` (the same as
    ``w += momentum*n' - lr*g'``, TF's Nesterov step). ``n`` starts at 0.
    """

    state_names = ("n",)

    def update(self, w, g, state, lr):
        opt = self.config
        if opt.weight_decay_factor:
            g = g + opt.weight_decay_factor * w
        n = state["n"]
        if opt.use_nesterov:
            n_old = n.clone()
            n.mul_(opt.momentum).sub_(lr * g)
            return w - opt.momentum * n_old + (1 + opt.momentum) * n
        n.mul_(opt.momentum).sub_(lr * g)
        return w + n


@register_slice_optimizer(entry.RmspropOptimizer)
class RmspropSlice(SliceOptimizer):
    """Monolith's RMSProp kernel (``rmsprop_optimizer.cc``), mean square ``n``.

    ``g' = g + wd*w; n' = momentum*n + (1 - momentum)*g'^2; w -= lr*g'/(sqrt(n') + 1)``.
    ``momentum`` is the decay of the mean square (there is no momentum
    buffer) and the denominator adds 1, not a small epsilon, both as in
    Monolith. Unlike Monolith's kernel, which reads the configured
    ``learning_rate`` only, ``lr`` is the slice's learning rate (so a
    ``learning_rate_fn`` applies, as for every other slice optimizer), and the
    math runs in float32 (Monolith's in double). ``n`` starts at 0.
    """

    state_names = ("n",)

    def update(self, w, g, state, lr):
        opt = self.config
        if opt.weight_decay_factor:
            g = g + opt.weight_decay_factor * w
        n = state["n"]
        n.mul_(opt.momentum).add_((1 - opt.momentum) * g * g)
        return w - lr * g / (n.sqrt() + 1.0)
