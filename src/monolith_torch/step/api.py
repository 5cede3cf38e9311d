"""One training step's update of dense parameters and embedding tables.

Re-creates Monolith's ``feature_utils.apply_gradients_with_var_optimizer`` and
``apply_gradients`` on eager PyTorch. The public functions keep Monolith's
keyword arguments, build one frozen, validated ``_StepConfig`` and hand it to a
pipeline of small stages in ``_step_stages``::

    gradients -> filter unused -> UE check -> reduce mean -> clip factors
      -> summaries -> allreduce (clip folded in) -> weight decay -> apply

Every check on user input happens while building the config, before any
parameter, embedding or the global step changes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from monolith_torch.distributed.allreduce import AllreduceConfig
from monolith_torch.embedding.feature import FeatureColumn
from monolith_torch.step import stages
from monolith_torch.step.context import NativeContext
from monolith_torch.step.types import GradClipType, StepResult

__all__ = ["GradClipType", "StepResult", "apply_gradients_with_var_optimizer", "apply_gradients"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _StepConfig:
    clip_type: GradClipType
    clip_norm: float | None
    sparse_clip_norm: float | None
    sparse_norm_warmup_steps: int | None
    summarize: bool
    allreduce: AllreduceConfig | None  # None: no allreduce this step
    ue_gradient_check: bool
    ue_fc_names: tuple[str, ...]
    ue_euclidean_norm_threshold: float
    dense_weight_decay: float
    dense_reduce_mean: bool
    batch_size: int
    is_fused_layout: bool
    skip_nonfinite: bool


def _check_positive_or_none(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value) or value <= 0:
        raise ValueError(f"Invalid {name}: {value!r} (expected a number > 0 or None)")


def _check_clip_type(clip_type) -> GradClipType:
    if isinstance(clip_type, GradClipType):
        return clip_type
    try:
        return GradClipType(clip_type)
    except ValueError:
        valid = ", ".join(f"{t.name}={t.value}" for t in GradClipType)
        raise ValueError(f"Invalid clip_type: {clip_type!r} (expected one of {valid})") from None


def _check_loss(loss) -> None:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss must be a torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise ValueError("loss does not require grad: it was not computed from trainable tensors")


def _check_global_step(global_step) -> None:
    if global_step is None:
        return
    if not isinstance(global_step, torch.Tensor) or global_step.dim() != 0 or global_step.dtype != torch.int64:
        what = (
            f"shape {tuple(global_step.shape)} dtype {global_step.dtype}"
            if isinstance(global_step, torch.Tensor)
            else type(global_step).__name__
        )
        raise TypeError(f"global_step must be a 0-d int64 tensor, got {what}")


def _resolve_allreduce(use_allreduce: bool, allreduce_config: AllreduceConfig | None) -> AllreduceConfig | None:
    if not use_allreduce:
        return None
    config = allreduce_config if allreduce_config is not None else AllreduceConfig.from_env()
    if config.skip:
        return None
    if not config.is_active():
        logger.info("use_allreduce=True but no process group with world size > 1: allreduce skipped")
        return None
    return config


def _build_config(
    *, clip_type, clip_norm, global_step, grads_and_vars_summary, use_allreduce, allreduce_config,
    ue_gradient_check, ue_fc_names, ue_euclidean_norm_threshold, dense_weight_decay, features,
    sparse_clip_norm, sparse_norm_warmup_steps, dense_reduce_mean, batch_size, is_fused_layout,
    skip_nonfinite,
) -> _StepConfig:
    clip_type = _check_clip_type(clip_type)
    _check_positive_or_none("clip_norm", clip_norm)
    _check_positive_or_none("sparse_clip_norm", sparse_clip_norm)
    if clip_type == GradClipType.ClipByDenseAndSparse and clip_norm is None:
        raise ValueError("clip_norm is required with clip_type=ClipByDenseAndSparse, got None")
    if sparse_norm_warmup_steps is not None:
        if isinstance(sparse_norm_warmup_steps, bool) or not isinstance(sparse_norm_warmup_steps, int) \
                or sparse_norm_warmup_steps < 0:
            raise ValueError(f"Invalid sparse_norm_warmup_steps: {sparse_norm_warmup_steps!r} (expected an int >= 0)")
        if sparse_norm_warmup_steps > 0 and global_step is None:
            raise ValueError("sparse_norm_warmup_steps needs a global_step, got global_step=None")
    if dense_reduce_mean and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"Invalid batch_size: {batch_size!r} (expected an int >= 1 with dense_reduce_mean)")
    if not isinstance(dense_weight_decay, int | float) or not math.isfinite(dense_weight_decay) \
            or dense_weight_decay < 0:
        raise ValueError(f"Invalid dense_weight_decay: {dense_weight_decay!r} (expected a finite number >= 0)")
    if isinstance(ue_fc_names, str):
        raise TypeError(f"ue_fc_names must be a sequence of names, got the string {ue_fc_names!r}")
    ue_fc_names = tuple(ue_fc_names or ())
    if ue_gradient_check:
        features = features or {}
        for name in ue_fc_names:
            if name not in features:
                raise KeyError(f"ue_fc_names entry {name!r} is missing from features")
    _check_global_step(global_step)
    return _StepConfig(
        clip_type=clip_type,
        clip_norm=None if clip_type == GradClipType.NoClip else clip_norm,
        sparse_clip_norm=sparse_clip_norm,
        sparse_norm_warmup_steps=sparse_norm_warmup_steps or None,
        summarize=bool(grads_and_vars_summary),
        allreduce=_resolve_allreduce(use_allreduce, allreduce_config),
        ue_gradient_check=bool(ue_gradient_check),
        ue_fc_names=ue_fc_names,
        ue_euclidean_norm_threshold=float(ue_euclidean_norm_threshold),
        dense_weight_decay=float(dense_weight_decay),
        dense_reduce_mean=bool(dense_reduce_mean),
        batch_size=int(batch_size) if dense_reduce_mean else 1,
        is_fused_layout=bool(is_fused_layout),
        skip_nonfinite=bool(skip_nonfinite),
    )


def apply_gradients_with_var_optimizer(
    ctx: NativeContext,
    feature_columns: Iterable[FeatureColumn],
    var_opt: torch.optim.Optimizer,
    loss: torch.Tensor,
    clip_type: GradClipType = GradClipType.ClipByGlobalNorm,
    clip_norm: float | None = None,
    global_step: torch.Tensor | None = None,
    grads_and_vars_summary: bool = False,
    use_allreduce: bool = False,
    ue_gradient_check: bool = False,
    ue_fc_names: Iterable[str] = (),
    ue_euclidean_norm_threshold: float = 0.0,
    dense_weight_decay: float = 0.0,
    features: Mapping[str, torch.Tensor] | None = None,
    sparse_clip_norm: float | None = None,
    sparse_norm_warmup_steps: int | None = None,
    dense_reduce_mean: bool = False,
    batch_size: int = 1,
    is_fused_layout: bool = False,
    *,
    model: torch.nn.Module | None = None,
    allreduce_config: AllreduceConfig | None = None,
    skip_nonfinite: bool = False,
) -> StepResult:
    """Applies one step of gradients to dense parameters and embedding tables.

    Re-creates Monolith's function of the same name. Dense variables are the
    parameters ``var_opt`` holds plus those of ``model``; a parameter with an
    ``optimizer`` attribute (Monolith's ``var.optimizer``, e.g.
    ``p.optimizer = torch.optim.Adam([p])``) is updated by it instead of
    ``var_opt``. Embedding variables are each column's
    ``get_all_embeddings_concat()`` (or the flattened layout when
    ``is_fused_layout``); their gradients go to ``ctx.apply_embedding_gradients``.
    Dense updates and the global-step increment go through
    ``ctx.add_async_function`` (one step late with an async manager).

    The step owns ``.grad`` of the tensors it differentiates: it clears them,
    fills them from ``loss`` and clears them again.

    Args:
        ctx: the context with the feature factory, async manager and summary writer.
        feature_columns: columns whose embeddings receive gradients.
        var_opt: the optimizer of the dense parameters.
        loss: a scalar that requires grad.
        clip_type, clip_norm: Monolith's clipping mode and bound. The defaults,
            ``ClipByGlobalNorm`` with ``clip_norm=None``, do not clip at all.
        global_step: a 0-d int64 tensor incremented in place, or None.
        grads_and_vars_summary: write per-variable summaries to ``ctx.summary_writer``.
        use_allreduce: average dense gradients over the process group.
        ue_gradient_check, ue_fc_names, ue_euclidean_norm_threshold, features:
            zero the gradients of variables named after a UE feature (or
            containing "uue") when that feature's norm is not above the threshold.
        dense_weight_decay: adds ``dense_weight_decay * param`` after clipping and averaging.
        sparse_clip_norm: a separate bound for embedding gradients.
        sparse_norm_warmup_steps: ramp the sparse bound linearly from 0.
        dense_reduce_mean, batch_size: divide dense gradients by ``batch_size``.
        is_fused_layout: differentiate ``ctx.layout_factory.flattened_layout()``.
        model: a module whose (named) parameters are dense variables too; the
            embedding variables of every ``HashEmbeddingBagCollection`` in it
            are collected as well (``ctx.feature_factory`` must be its factory).
        allreduce_config: overrides ``AllreduceConfig.from_env()``.
        skip_nonfinite: skip the step (nothing updated) when a gradient holds
            NaN/Inf; costs one host sync.

    Returns:
        A ``StepResult``.

    Raises:
        ValueError, TypeError, KeyError: on bad arguments, before anything changes.
    """
    config = _build_config(
        clip_type=clip_type, clip_norm=clip_norm, global_step=global_step,
        grads_and_vars_summary=grads_and_vars_summary, use_allreduce=use_allreduce,
        allreduce_config=allreduce_config, ue_gradient_check=ue_gradient_check, ue_fc_names=ue_fc_names,
        ue_euclidean_norm_threshold=ue_euclidean_norm_threshold, dense_weight_decay=dense_weight_decay,
        features=features, sparse_clip_norm=sparse_clip_norm, sparse_norm_warmup_steps=sparse_norm_warmup_steps,
        dense_reduce_mean=dense_reduce_mean, batch_size=batch_size, is_fused_layout=is_fused_layout,
        skip_nonfinite=skip_nonfinite,
    )
    _check_loss(loss)
    dense = stages.collect_dense_variables(var_opt, model)
    sparse = stages.collect_embedding_variables(ctx, feature_columns, config.is_fused_layout, model)
    return stages.run_step(ctx, var_opt, loss, dense, sparse, config, global_step, features)


def apply_gradients(
    ctx: NativeContext,
    var_opt: torch.optim.Optimizer,
    loss: torch.Tensor,
    clip_type: GradClipType = GradClipType.ClipByGlobalNorm,
    clip_norm: float | None = None,
    dense_weight_decay: float = 0.0,
    global_step: torch.Tensor | None = None,
    use_allreduce: bool = False,
    *,
    model: torch.nn.Module | None = None,
    allreduce_config: AllreduceConfig | None = None,
) -> StepResult:
    """The fused-layout step: gradients of ``ctx.layout_factory.flattened_layout()``.

    Re-creates Monolith's ``feature_utils.apply_gradients``: only
    ``ClipByGlobalNorm`` and ``ClipByNorm`` are supported (with a ``clip_norm``),
    updates are synchronous, and the global step is incremented even when there
    are no dense variables.

    Raises:
        ValueError: another clip type with a ``clip_norm`` ("... is not supported yet!").
    """
    clip_type = _check_clip_type(clip_type)
    if clip_norm is not None and clip_type not in (GradClipType.ClipByGlobalNorm, GradClipType.ClipByNorm):
        raise ValueError(f"{clip_type} is not supported yet! (apply_gradients takes ClipByGlobalNorm or ClipByNorm)")
    if ctx.layout_factory is None:
        raise RuntimeError("apply_gradients needs a NativeContext with a layout_factory")
    config = _build_config(
        clip_type=clip_type, clip_norm=clip_norm, global_step=global_step, grads_and_vars_summary=False,
        use_allreduce=use_allreduce, allreduce_config=allreduce_config, ue_gradient_check=False, ue_fc_names=(),
        ue_euclidean_norm_threshold=0.0, dense_weight_decay=dense_weight_decay, features=None,
        sparse_clip_norm=None, sparse_norm_warmup_steps=None, dense_reduce_mean=False, batch_size=1,
        is_fused_layout=False, skip_nonfinite=False,
    )
    _check_loss(loss)
    dense = stages.collect_dense_variables(var_opt, model)
    sparse = stages.collect_embedding_variables(ctx, (), fused_layout=True)
    # Monolith's fused variant drops unused layout tensors instead of zero-filling them.
    return stages.run_step(ctx, var_opt, loss, dense, sparse, config, global_step, None, sync=True)
