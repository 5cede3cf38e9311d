"""What :func:`~monolith_torch.distributed.allreduce.allreduce_cond` does: a frozen, validated config.

:class:`AllreduceConfig` holds Monolith's allreduce switches (fusion, fp16/bf16
compression, backend, bucket size, skip); :meth:`AllreduceConfig.from_env` is the one
place that reads Monolith's environment variables. :func:`import_horovod` is the one
place that imports the optional Horovod. May import torch and the standard library
only.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch.distributed as dist

__all__ = [
    "BACKENDS",
    "COMPRESSIONS",
    "FUSIONS",
    "AllreduceConfig",
    "import_horovod",
]

FUSIONS = ("none", "one", "grouped")
COMPRESSIONS = (None, "fp16", "bf16")
BACKENDS = ("torch", "horovod", "byteps")

_MULTI_DROPPED = "Support for multi is dropped. Please use 'one' as the fusion strategy"
_HOROVOD_MISSING = (
    "backend='horovod' needs Horovod's PyTorch extension (module horovod.torch), which is "
    "not importable: {err}. Build it into the project's .venv with scripts/build_horovod.sh "
    "(horovod 0.28.1 with PyTorch and Gloo, about 4 minutes on 2 cores; a plain "
    "`pip install horovod` fails against torch >= 2.1 because horovod compiles its "
    "extension as C++14 and torch's headers need C++17, which the script forces), or use "
    "backend='torch' (unset MONOLITH_WITH_HOROVOD), which runs on torch.distributed."
)
_BYTEPS_UNSUPPORTED = (
    "backend='byteps' is not supported by monolith-torch: BytePS (last release 0.2.5) builds "
    "only with CUDA and NCCL against old torch releases. Use backend='torch' (unset "
    "MONOLITH_WITH_BYTEPS or set MONOLITH_WITH_BYTEPS_ALLREDUCE=0)."
)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def import_horovod() -> Any:
    """Imports ``horovod.torch``; ``ImportError`` naming ``scripts/build_horovod.sh`` if absent."""
    try:
        import horovod.torch as hvd  # noqa: PLC0415 - optional dependency
    except ImportError as err:
        raise ImportError(_HOROVOD_MISSING.format(err=err)) from err
    return hvd


@dataclass(frozen=True)
class AllreduceConfig:
    """How :func:`allreduce_cond` averages gradients. Frozen and validated.

    Attributes:
        fusion: ``"none"`` one allreduce per tensor (Monolith's default), ``"grouped"``
            one coalesced allreduce per (device, dtype) through torch's coalescing
            manager (the backend fuses the tensors, like Horovod's
            ``grouped_allreduce``), ``"one"`` one
            64-byte-aligned flat buffer per (device, dtype), scale folded into the copy.
            ``"multi"`` was dropped by Monolith and raises ``RuntimeError``.
        compression: ``None``, ``"fp16"`` or ``"bf16"``: tensors wider than 16 bits are
            sent in that half type, divided by the world size before the sum so the sum
            cannot overflow, and cast back. Horovod: ``None`` or ``"fp16"`` (Horovod
            has no bfloat16 type; bfloat16 gradients travel as float32 there).
        backend: ``"torch"`` (torch.distributed), ``"horovod"`` (``horovod.torch``, built
            by ``scripts/build_horovod.sh``, with ``hvd.init()`` done, e.g. under
            ``horovodrun``; ``ImportError`` naming the script otherwise) or ``"byteps"``
            (not supported: ``NotImplementedError``). On Horovod, fusion ``"none"`` is
            one ``hvd.allreduce`` per tensor, ``"grouped"`` one ``hvd.grouped_allreduce``
            per (device, dtype), ``"one"`` one in-place ``hvd.allreduce_async_`` per
            flat buffer (bucket).
        group: the ``torch.distributed`` process group to average over; ``None`` is the
            default group. Must be ``None`` for Horovod, which has its own.
        timeout: how long to wait for a collective before raising ``RuntimeError``;
            ``None`` uses the process group's own timeout (30 min by default for gloo).
            Must be ``None`` for Horovod, which has no per-collective timeout.
        skip: Monolith's ``MONOLITH_SKIP_ALLREDUCE``: never communicate, only scale.
        bucket_cap_bytes: fusion ``"one"`` only: cut the flat buffer of each (device,
            dtype) into buckets of at most this many bytes (a larger tensor gets a
            bucket of its own); each bucket's allreduce starts while the next is being
            packed. ``None`` packs one buffer per (device, dtype), as Monolith does. The
            8 MiB default keeps CPU buffers well below glibc's 32 MiB mmap threshold, so
            their memory is reused instead of page-faulted in on every step, and
            overlaps packing with communication (docs/perf/allreduce.md has the
            measurements: 2-2.5x faster than one 40 MB buffer on CPU).

    Raises:
        RuntimeError: ``fusion="multi"``.
        ValueError: an unknown fusion, compression or backend (the message lists the
            valid ones), a non-positive timeout, or, with Horovod, a group, a timeout
            or ``compression="bf16"``.
        TypeError: a field of the wrong type.
        ImportError: ``backend="horovod"`` without ``horovod.torch``.
        NotImplementedError: ``backend="byteps"``.
    """

    fusion: str = "none"
    compression: str | None = None
    backend: str = "torch"
    group: Any = None
    timeout: datetime.timedelta | None = None
    skip: bool = False
    bucket_cap_bytes: int | None = 8 * 2**20

    def __post_init__(self) -> None:
        if not isinstance(self.fusion, str):
            raise TypeError(
                f"fusion must be a str, got {type(self.fusion).__name__}: {self.fusion!r}"
            )
        if self.fusion == "multi":
            raise RuntimeError(_MULTI_DROPPED)
        if self.fusion not in FUSIONS:
            raise ValueError(f"Invalid fusion: {self.fusion!r}; expected one of {FUSIONS}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(
                f"Invalid compression: {self.compression!r}; expected one of {COMPRESSIONS}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {self.backend!r}; expected one of {BACKENDS}")
        if self.group is not None and not (
            dist.is_available() and isinstance(self.group, dist.ProcessGroup)
        ):
            raise TypeError(
                f"group must be a torch.distributed.ProcessGroup or None, got "
                f"{type(self.group).__name__}"
            )
        if self.timeout is not None:
            if not isinstance(self.timeout, datetime.timedelta):
                raise TypeError(
                    f"timeout must be a datetime.timedelta or None, got "
                    f"{type(self.timeout).__name__}: {self.timeout!r}"
                )
            if self.timeout <= datetime.timedelta(0):
                raise ValueError(f"Invalid timeout: {self.timeout}; expected a positive duration")
        if not isinstance(self.skip, bool):
            raise TypeError(f"skip must be a bool, got {type(self.skip).__name__}: {self.skip!r}")
        if self.bucket_cap_bytes is not None:
            if isinstance(self.bucket_cap_bytes, bool) or not isinstance(
                self.bucket_cap_bytes, int
            ):
                raise TypeError(
                    f"bucket_cap_bytes must be an int or None, got "
                    f"{type(self.bucket_cap_bytes).__name__}: {self.bucket_cap_bytes!r}"
                )
            if self.bucket_cap_bytes <= 0:
                raise ValueError(
                    f"Invalid bucket_cap_bytes: {self.bucket_cap_bytes}; expected a positive int or None"
                )
        if self.backend == "byteps":
            raise NotImplementedError(_BYTEPS_UNSUPPORTED)
        if self.backend == "horovod":
            if self.group is not None:
                raise ValueError(
                    f"Invalid group for backend='horovod': {self.group!r}; Horovod averages "
                    "over its own processes, pass group=None"
                )
            if self.compression == "bf16":
                raise ValueError(
                    "Invalid compression for backend='horovod': 'bf16'; Horovod 0.28 has no "
                    "bfloat16 type, expected None or 'fp16'"
                )
            if self.timeout is not None:
                raise ValueError(
                    f"Invalid timeout for backend='horovod': {self.timeout}; Horovod has no "
                    "per-collective timeout (its HOROVOD_GLOO_TIMEOUT_SECONDS applies), pass "
                    "timeout=None"
                )
            import_horovod()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> AllreduceConfig:
        """Builds a config from Monolith's environment variables.

        Precedence: an explicit keyword argument, then the environment, then the
        default. A field given as a keyword is not read from the environment at all, so
        a bad value there cannot fail it. Empty variables count as unset.

        Variables (Monolith's meanings):
            ``MONOLITH_WITH_ALLREDUCE_FUSION``: ``none`` | ``one`` | ``grouped``
            (``multi`` raises ``RuntimeError``) -> ``fusion``.
            ``MONOLITH_WITH_ALLREDUCE_FP16``: ``0`` | ``1`` (fp16); also ``fp16``,
            ``bf16`` -> ``compression``.
            ``MONOLITH_SKIP_ALLREDUCE``: boolean -> ``skip``.
            ``MONOLITH_WITH_BYTEPS`` and ``MONOLITH_WITH_BYTEPS_ALLREDUCE`` (default 1):
            both true -> ``backend="byteps"``; else ``MONOLITH_WITH_HOROVOD`` true ->
            ``backend="horovod"``; else ``"torch"``.
            Booleans accept ``0/1/true/false/yes/no/on/off`` and any integer (non-zero is
            true, as Monolith's ``int(...)``). Monolith treated any non-empty
            ``MONOLITH_WITH_HOROVOD`` as true, ``"0"`` included; here ``"0"`` is false.

        Args:
            env: the mapping to read instead of ``os.environ`` (for tests).
            **overrides: any :class:`AllreduceConfig` field.

        Returns:
            The validated config.

        Raises:
            TypeError: an override that is not a field.
            ValueError: a variable with an invalid value; the message names the variable
                and lists the valid values.
            RuntimeError, ImportError, NotImplementedError: as :class:`AllreduceConfig`.
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(
                f"from_env() got unexpected keyword argument(s) {unknown}; "
                f"expected fields of AllreduceConfig: {sorted(names)}"
            )
        env = os.environ if env is None else env
        values = dict(overrides)
        if "fusion" not in values:
            fusion = _env_str(env, "MONOLITH_WITH_ALLREDUCE_FUSION")
            if fusion is not None:
                if fusion not in (*FUSIONS, "multi"):
                    raise ValueError(
                        f"Invalid MONOLITH_WITH_ALLREDUCE_FUSION={fusion!r}; expected one of "
                        f"{FUSIONS} ('multi' is dropped)"
                    )
                values["fusion"] = fusion
        if "compression" not in values:
            fp16 = _env_str(env, "MONOLITH_WITH_ALLREDUCE_FP16")
            if fp16 is not None:
                values["compression"] = _parse_compression(fp16)
        if "skip" not in values:
            skip = _env_bool(env, "MONOLITH_SKIP_ALLREDUCE")
            if skip is not None:
                values["skip"] = skip
        if "backend" not in values:
            with_bps = _env_bool(env, "MONOLITH_WITH_BYTEPS") or False
            bps_allreduce = _env_bool(env, "MONOLITH_WITH_BYTEPS_ALLREDUCE")
            with_hvd = _env_bool(env, "MONOLITH_WITH_HOROVOD") or False
            if with_bps and (bps_allreduce is None or bps_allreduce):
                values["backend"] = "byteps"
            elif with_hvd:
                values["backend"] = "horovod"
        return cls(**values)

    def is_active(self) -> bool:
        """Whether :func:`allreduce_cond` will communicate.

        True when ``skip`` is false, the backend is initialised (torch.distributed: a
        default process group exists) and the group has more than one process.
        """
        if self.skip:
            return False
        if self.backend == "horovod":
            hvd = import_horovod()
            return bool(hvd.is_initialized()) and hvd.size() > 1
        if not (dist.is_available() and dist.is_initialized()):
            return False
        return dist.get_world_size(self.group) > 1


def _env_str(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def _env_bool(env: Mapping[str, str], name: str) -> bool | None:
    value = _env_str(env, name)
    if value is None:
        return None
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    try:
        return int(value) != 0
    except ValueError:
        raise ValueError(
            f"Invalid {name}={value!r}; expected an integer (0 = off) or one of {_TRUE + _FALSE}"
        ) from None


def _parse_compression(value: str) -> str | None:
    lowered = value.lower()
    if lowered in ("0", "none", "false", "off"):
        return None
    if lowered in ("1", "fp16", "true", "on"):
        return "fp16"
    if lowered == "bf16":
        return "bf16"
    raise ValueError(
        f"Invalid MONOLITH_WITH_ALLREDUCE_FP16={value!r}; expected one of "
        "'0' (no compression), '1' or 'fp16', 'bf16'"
    )
