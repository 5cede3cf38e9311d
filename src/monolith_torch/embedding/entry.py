"""Typed configs for embedding-table slices: optimizers, initializers, compressors.

Re-creates the config classes of Monolith's ``monolith/native_training/entry.py``
as plain frozen dataclasses (Monolith turns them into protos for its C++ hash
table; here the embedding store reads the fields directly). Constructor
arguments keep Monolith's names and order; a value of ``None`` means "the
store's default", as an unset proto field does in Monolith.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

__all__ = [
    "Optimizer",
    "SgdOptimizer",
    "AdagradOptimizer",
    "FtrlOptimizer",
    "AdamOptimizer",
    "MomentumOptimizer",
    "RmspropOptimizer",
    "Initializer",
    "ZerosInitializer",
    "ConstantsInitializer",
    "RandomUniformInitializer",
    "Compressor",
    "Fp16Compressor",
    "Fp32Compressor",
    "HashTableConfig",
    "CuckooHashTableConfig",
    "Segment",
    "CombineAsSegment",
    "DEFAULT_LEARNING_RATE",
]

# Monolith leaves the learning rate unset and lets the table's proto default
# decide; 0.01 is what its hash-table configs fall back to.
DEFAULT_LEARNING_RATE = 0.01


def _check_non_negative(name: str, value: float | None) -> None:
    if value is not None and (not math.isfinite(value) or value < 0):
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite value >= 0)")


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name}: {value!r} (expected 0 <= {name} < 1)")


def _check_positive(name: str, value: float | None) -> None:
    if value is not None and (not math.isfinite(value) or value <= 0):
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite value > 0)")


class Optimizer:
    """Base class of the per-slice optimizer configs."""

    learning_rate: float | None
    warmup_steps: int

    def effective_learning_rate(self) -> float:
        """The configured learning rate, or the store's default when unset."""
        return DEFAULT_LEARNING_RATE if self.learning_rate is None else self.learning_rate


@dataclass(frozen=True)
class SgdOptimizer(Optimizer):
    """Plain SGD: ``w -= lr * g``."""

    learning_rate: float | None = None
    warmup_steps: int = 0

    def __post_init__(self):
        _check_positive("learning_rate", self.learning_rate)
        _check_non_negative("warmup_steps", self.warmup_steps)


@dataclass(frozen=True)
class AdagradOptimizer(Optimizer):
    """Adagrad as Monolith's kernel: ``g' = g + wd*w; acc += g'^2; w -= lr*g'/sqrt(acc)``."""

    learning_rate: float | None = None
    initial_accumulator_value: float | None = None
    hessian_compression_times: int = 1
    warmup_steps: int = 0
    weight_decay_factor: float = 0.0

    def __post_init__(self):
        _check_positive("learning_rate", self.learning_rate)
        _check_non_negative("initial_accumulator_value", self.initial_accumulator_value)
        _check_non_negative("warmup_steps", self.warmup_steps)
        _check_non_negative("weight_decay_factor", self.weight_decay_factor)


@dataclass(frozen=True)
class FtrlOptimizer(Optimizer):
    """FTRL-Proximal (McMahan et al. 2013) with Monolith's state layout (``n``, ``z``)."""

    learning_rate: float | None = None
    initial_accumulator_value: float | None = None
    beta: float | None = None
    warmup_steps: int = 0
    l1_regularization: float | None = None
    l2_regularization: float | None = None

    def __post_init__(self):
        _check_positive("learning_rate", self.learning_rate)
        _check_non_negative("initial_accumulator_value", self.initial_accumulator_value)
        _check_non_negative("beta", self.beta)
        _check_non_negative("warmup_steps", self.warmup_steps)
        _check_non_negative("l1_regularization", self.l1_regularization)
        _check_non_negative("l2_regularization", self.l2_regularization)


@dataclass(frozen=True)
class AdamOptimizer(Optimizer):
    """Adam with Monolith's defaults (``beta2=0.99``, ``epsilon=0.01``)."""

    learning_rate: float | None = None
    beta1: float = 0.9
    beta2: float = 0.99
    use_beta1_warmup: bool = False
    weight_decay_factor: float = 0.0
    use_nesterov: bool = False
    epsilon: float = 0.01
    warmup_steps: int = 0

    def __post_init__(self):
        _check_positive("learning_rate", self.learning_rate)
        _check_fraction("beta1", self.beta1)
        _check_fraction("beta2", self.beta2)
        _check_positive("epsilon", self.epsilon)
        _check_non_negative("weight_decay_factor", self.weight_decay_factor)
        _check_non_negative("warmup_steps", self.warmup_steps)


@dataclass(frozen=True)
class MomentumOptimizer(Optimizer):
    """Momentum as Monolith's kernel, the velocity ``n`` holding the learning rate.

    ``g' = g + wd*w; n' = momentum*n - lr*g'``, then ``w += n'``, or with
    ``use_nesterov`` ``w += -momentum*n + (1 + momentum)*n'``.
    """

    learning_rate: float | None = None
    weight_decay_factor: float = 0.0
    use_nesterov: bool = False
    momentum: float = 0.9
    warmup_steps: int = 0

    def __post_init__(self):
        _check_positive("learning_rate", self.learning_rate)
        _check_non_negative("weight_decay_factor", self.weight_decay_factor)
        _check_fraction("momentum", self.momentum)
        _check_non_negative("warmup_steps", self.warmup_steps)


@dataclass(frozen=True)
class RmspropOptimizer(Optimizer):
    """RMSProp as Monolith's kernel: ``momentum`` is the decay of the mean square ``n``.

    ``g' = g + wd*w; n' = momentum*n + (1 - momentum)*g'^2; w -= lr*g'/(sqrt(n') + 1)``.
    """

    learning_rate: float | None = None
    weight_decay_factor: float = 0.0
    momentum: float = 0.9
    # Monolith's RmspropOptimizer takes no warmup_steps.
    warmup_steps: ClassVar[int] = 0

    def __post_init__(self):
        _check_positive("learning_rate", self.learning_rate)
        _check_non_negative("weight_decay_factor", self.weight_decay_factor)
        _check_fraction("momentum", self.momentum)


class Initializer:
    """Base class of the per-slice initializer configs."""


@dataclass(frozen=True)
class ZerosInitializer(Initializer):
    """Every new row starts at 0."""


@dataclass(frozen=True)
class ConstantsInitializer(Initializer):
    """Every new row starts at ``constant``."""

    constant: float = 0.0


@dataclass(frozen=True)
class RandomUniformInitializer(Initializer):
    """New rows drawn uniformly from ``[minval, maxval]`` (default ``[-0.01, 0.01]``)."""

    minval: float | None = None
    maxval: float | None = None

    def __post_init__(self):
        lo, hi = self.bounds()
        if not lo <= hi:
            raise ValueError(f"Invalid RandomUniformInitializer bounds: minval={lo!r} > maxval={hi!r}")

    def bounds(self) -> tuple[float, float]:
        return (-0.01 if self.minval is None else self.minval, 0.01 if self.maxval is None else self.maxval)


class Compressor:
    """Base class of the serving-time compressor configs (recorded, not applied in training)."""


@dataclass(frozen=True)
class Fp16Compressor(Compressor):
    """Serve this slice in float16."""


@dataclass(frozen=True)
class Fp32Compressor(Compressor):
    """Serve this slice in float32."""


class HashTableConfig:
    """Base class of the hash-table configs."""


@dataclass(frozen=True)
class CuckooHashTableConfig(HashTableConfig):
    """Monolith's default table config; ``initial_capacity`` pre-sizes the store."""

    initial_capacity: int = 1
    feature_evict_every_n_hours: int = 0

    def __post_init__(self):
        if self.initial_capacity < 0:
            raise ValueError(f"Invalid initial_capacity: {self.initial_capacity!r} (expected >= 0)")
        if self.feature_evict_every_n_hours < 0:
            raise ValueError(
                f"Invalid feature_evict_every_n_hours: {self.feature_evict_every_n_hours!r} (expected >= 0)"
            )


@dataclass(frozen=True)
class Segment:
    """One slice of a table row: its width, initializer, optimizer and compressor."""

    dim_size: int
    initializer: Initializer
    optimizer: Optimizer
    compressor: Compressor

    def __post_init__(self):
        if not isinstance(self.dim_size, int) or self.dim_size < 1:
            raise ValueError(f"Invalid dim_size: {self.dim_size!r} (expected an int >= 1)")
        if not isinstance(self.initializer, Initializer):
            raise TypeError(f"initializer must be an entry.Initializer, got {type(self.initializer).__name__}")
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(f"optimizer must be an entry.Optimizer, got {type(self.optimizer).__name__}")
        if not isinstance(self.compressor, Compressor):
            raise TypeError(f"compressor must be an entry.Compressor, got {type(self.compressor).__name__}")


def CombineAsSegment(  # noqa: N802 - Monolith's name
    dim_size: int, initializer: Initializer, optimizer: Optimizer, compressor: Compressor
) -> Segment:
    """Bundles one slice's configs, as Monolith's ``entry.CombineAsSegment``."""
    return Segment(dim_size, initializer, optimizer, compressor)
