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
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist

from monolith_torch.distributed.flat_buffers import (
    _concat_unchecked,
    _layout,
    _split_unchecked,
    check_scale,
)

__all__ = [
    "BACKENDS",
    "COMPRESSIONS",
    "FUSIONS",
    "AllreduceConfig",
    "HalfCompressor",
    "NoneCompressor",
    "allreduce_cond",
    "compressor_for",
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


def _import_horovod() -> Any:
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
            _import_horovod()

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
            hvd = _import_horovod()
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


# --- compression: stateless, in Horovod's newer shape --------------------------------


@dataclass(frozen=True)
class NoneCompressor:
    """No compression. ``compress`` still returns a new tensor: collectives work in place."""

    def wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a tensor of ``dtype`` travels in: itself."""
        return dtype

    def compress(
        self, tensor: torch.Tensor, prescale: float | torch.Tensor = 1.0
    ) -> tuple[torch.Tensor, None]:
        """Returns ``(tensor * prescale, None)`` as a new tensor; the input is unchanged."""
        # Collectives need contiguous buffers; mul keeps a transposed input's strides.
        return torch.mul(tensor, prescale).contiguous(), None

    def decompress(self, tensor: torch.Tensor, ctx: None) -> torch.Tensor:
        """Returns ``tensor`` unchanged."""
        return tensor


@dataclass(frozen=True)
class HalfCompressor:
    """Sends tensors wider than 16 bits as ``half_dtype``; 16-bit tensors travel as they are.

    Attributes:
        half_dtype: ``torch.float16`` or ``torch.bfloat16``.
    """

    half_dtype: torch.dtype

    def wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a tensor of ``dtype`` travels in."""
        itemsize = dtype.itemsize
        return self.half_dtype if itemsize > 2 else dtype

    def compress(
        self, tensor: torch.Tensor, prescale: float | torch.Tensor = 1.0
    ) -> tuple[torch.Tensor, torch.dtype]:
        """Returns ``(tensor * prescale cast to the wire dtype, original dtype)``.

        The multiply runs in the source precision and rounds once, so a prescale of
        ``1 / world_size`` keeps values that would overflow the half type in the sum.
        """
        # Contiguous, whatever the input's strides: collectives need it.
        out = torch.empty(tensor.shape, dtype=self.wire_dtype(tensor.dtype), device=tensor.device)
        torch.mul(tensor, prescale, out=out)
        return out, tensor.dtype

    def decompress(self, tensor: torch.Tensor, ctx: torch.dtype) -> torch.Tensor:
        """Casts ``tensor`` back to the dtype ``compress`` saw."""
        return tensor if tensor.dtype == ctx else tensor.to(ctx)


def compressor_for(compression: str | None) -> NoneCompressor | HalfCompressor:
    """The compressor for an :class:`AllreduceConfig` ``compression`` value."""
    if compression is None:
        return NoneCompressor()
    if compression == "fp16":
        return HalfCompressor(torch.float16)
    if compression == "bf16":
        return HalfCompressor(torch.bfloat16)
    raise ValueError(f"Invalid compression: {compression!r}; expected one of {COMPRESSIONS}")


# --- allreduce_cond --------------------------------------------------------------------


def _scaled(tensors: list[torch.Tensor], scale: float | torch.Tensor) -> list[torch.Tensor]:
    if isinstance(scale, (int, float)) and scale == 1:
        return list(tensors)
    return list(torch._foreach_mul(tensors, scale))


def _divide(scale: float | torch.Tensor, world: int) -> float | torch.Tensor:
    # A tensor scale stays a tensor: reading it would force a host sync.
    return scale / world


def _group_by_device_dtype(tensors: list[torch.Tensor]) -> list[list[int]]:
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return list(groups.values())


def _buckets(
    tensors: list[torch.Tensor], comp: NoneCompressor | HalfCompressor, cap_bytes: int | None
) -> list[list[int]]:
    """Positions per bucket: by (device, dtype), then cut at ``cap_bytes`` of wire data."""
    out: list[list[int]] = []
    for idx in _group_by_device_dtype(tensors):
        if cap_bytes is None:
            out.append(idx)
            continue
        itemsize = comp.wire_dtype(tensors[idx[0]].dtype).itemsize
        current: list[int] = []
        used = 0
        for i in idx:
            nbytes = tensors[i].numel() * itemsize
            if current and used + nbytes > cap_bytes:
                out.append(current)
                current, used = [], 0
            current.append(i)
            used += nbytes
        out.append(current)
    return out


def _fail(what: str, timeout: datetime.timedelta | None, err: BaseException) -> RuntimeError:
    limit = (
        f"the configured timeout of {timeout}"
        if timeout is not None
        else ("the process group's timeout (AllreduceConfig.timeout is None)")
    )
    return RuntimeError(
        f"allreduce_cond: {what} failed or did not finish within {limit}. A peer process "
        f"may have died, hung, or never joined the collective; treat the process group as "
        f"broken and restart. Cause: {err}"
    )


def _wait_all(works: list[Any], timeout: datetime.timedelta | None, what: str) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout.total_seconds()
    try:
        for work in works:
            if deadline is None:
                work.wait()
            else:
                # Work.wait(timedelta(0)) means "no timeout": keep at least 1 ms.
                left = max(deadline - time.monotonic(), 1e-3)
                work.wait(datetime.timedelta(seconds=left))
    except RuntimeError as err:
        raise _fail(what, timeout, err) from err


def _launch(tensor: torch.Tensor, config: AllreduceConfig, what: str) -> Any:
    try:
        return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=config.group, async_op=True)
    except RuntimeError as err:
        raise _fail(what, config.timeout, err) from err


def _allreduce_torch(
    tensors: list[torch.Tensor], scale: float | torch.Tensor, config: AllreduceConfig
) -> list[torch.Tensor]:
    # Sum of (x * scale / world): gloo has no AVG, and dividing first keeps fp16 sums in
    # range. The scale rides on the same multiply, so it is applied exactly once.
    prescale = _divide(scale, dist.get_world_size(config.group))
    comp = compressor_for(config.compression)
    out: list[torch.Tensor] = [tensors[0]] * len(tensors)
    if config.fusion == "one":
        what = f"fused allreduce of {len(tensors)} tensor(s) (fusion='one')"
        pending = []
        for idx in _buckets(tensors, comp, config.bucket_cap_bytes):
            # allreduce_cond checked the tensors: skip the public functions' checks,
            # which cost more than the copy for many small tensors.
            group = [tensors[i] for i in idx]
            wire = comp.wire_dtype(group[0].dtype)
            sizes, total = _layout([t.numel() for t in group], wire)
            flat = _concat_unchecked(group, prescale, wire, sizes, total)
            pending.append((idx, group, sizes, flat, _launch(flat, config, what)))
        _wait_all([p[-1] for p in pending], config.timeout, what)
        for idx, group, sizes, flat, _ in pending:
            # Cast the whole buffer back once, then split it with the wire layout.
            flat = comp.decompress(flat, group[0].dtype)
            views = _split_unchecked(flat, sizes, [t.shape for t in group])
            for i, view in zip(idx, views, strict=True):
                out[i] = view
        return out
    if isinstance(comp, NoneCompressor):
        # One foreach call instead of a python-level multiply per tensor.
        wires = [
            w if w.is_contiguous() else w.contiguous()
            for w in torch._foreach_mul(tensors, prescale)
        ]
        ctxs: list[Any] = [None] * len(tensors)
    else:
        wires, ctxs = map(list, zip(*(comp.compress(t, prescale) for t in tensors), strict=True))
    if config.fusion == "grouped":
        what = f"grouped allreduce of {len(tensors)} tensor(s) (fusion='grouped')"
        _wait_all(_launch_coalesced(wires, config, what), config.timeout, what)
    else:
        for i, w in enumerate(wires):
            what = f"allreduce of tensor {i} of {len(tensors)} (fusion='none')"
            _wait_all([_launch(w, config, what)], config.timeout, what)
    return [comp.decompress(w, ctx) for w, ctx in zip(wires, ctxs, strict=True)]


def _launch_coalesced(wires: list[torch.Tensor], config: AllreduceConfig, what: str) -> list[Any]:
    # torch's coalescing manager turns the per-tensor all_reduce calls into one
    # allreduce_coalesced per (device, dtype), which the backend fuses in C++: 10-15x
    # faster than 1000 separate async ops on gloo (bench/bench_allreduce.py).
    works: list[Any] = []
    try:
        for idx in _group_by_device_dtype(wires):
            with dist._coalescing_manager(group=config.group, async_ops=True) as cm:
                for i in idx:
                    dist.all_reduce(wires[i], op=dist.ReduceOp.SUM, group=config.group)
            works.extend(cm.works)
    except RuntimeError as err:
        raise _fail(what, config.timeout, err) from err
    return works


def allreduce_cond(
    grads: Sequence[torch.Tensor | None],
    scale: float | torch.Tensor = 1.0,
    config: AllreduceConfig | None = None,
) -> list[torch.Tensor | None]:
    """Averages dense gradients over the data-parallel processes, times ``scale``.

    Re-creates Monolith's ``feature_utils.allreduce_cond``. Out of place: the inputs are
    never modified. ``scale`` (e.g. a deferred global-norm clip factor) is applied
    exactly once on every path; as a tensor it is never read on the host (no sync).
    Runs under ``torch.no_grad()``: the results carry no autograd history.
    With fusion ``"one"`` the results are views into one flat buffer per (device,
    dtype). When :meth:`AllreduceConfig.is_active` is false (no process group, world
    size 1, or ``skip``) nothing is communicated and the result is ``grads * scale``;
    with the python number ``1`` the input tensors themselves come back.

    Args:
        grads: floating gradients; ``None`` entries keep their positions. Every rank
            must pass the same layout (``None`` positions, shapes, dtypes, devices).
        scale: python number or 0-d floating tensor multiplying the average.
        config: strategy, compression, backend, group and timeout; ``None`` means
            ``AllreduceConfig()`` (torch backend, default group, no fusion).

    Returns:
        A new list, same length and ``None`` positions as ``grads``.

    Raises:
        TypeError: ``grads`` is not a list of tensors/``None``, a gradient is not
            floating, or ``scale``/``config`` has the wrong type.
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
        if not config.is_active():
            reduced = _scaled(tensors, scale)
        elif config.backend == "horovod":
            from monolith_torch.distributed.horovod import allreduce_horovod

            reduced = allreduce_horovod(tensors, scale, config)
        else:
            reduced = _allreduce_torch(tensors, scale, config)
    for i, t in zip(positions, reduced, strict=True):
        result[i] = t
    return result
