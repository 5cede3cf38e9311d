"""The stages of one training step, each small and testable alone.

``feature_utils`` validates the arguments and calls ``run_step``, which chains:
``compute_gradients`` -> ``filter_unused`` -> ``ue_check`` -> reduce mean ->
``compute_clip`` -> summaries -> ``allreduce`` -> weight decay -> ``apply``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from monolith_torch.core.ragged import RaggedTensor
from monolith_torch.distributed.allreduce import allreduce_cond
from monolith_torch.distributed.gradient_buckets import GradientBuckets
from monolith_torch.embedding.module import HashEmbeddingBagCollection
from monolith_torch.step import clip_ops, summaries
from monolith_torch.step.types import GradClipType, StepResult

logger = logging.getLogger("monolith_torch.step.api")


@dataclass
class Variables:
    """Tensors that receive gradients, with the names summaries and the UE check use."""

    names: list[str] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)

    def select(self, keep: list[bool]) -> Variables:
        pick = [i for i, k in enumerate(keep) if k]
        return Variables([self.names[i] for i in pick], [self.tensors[i] for i in pick])


@dataclass
class Clip:
    """The outcome of the clip stage: factors still to apply, and the norms computed."""

    dense_scale: torch.Tensor | float = 1.0
    sparse_scale: torch.Tensor | float = 1.0
    global_norm: torch.Tensor | None = None
    dense_norm: torch.Tensor | None = None
    sparse_norm: torch.Tensor | None = None


# ---------------------------------------------------------------- collection


def _optimizer_param_names(var_opt: torch.optim.Optimizer) -> dict[int, str]:
    names = {}
    for group in var_opt.param_groups:
        for p, name in zip(group["params"], group.get("param_names", ()), strict=False):
            names[id(p)] = name
    return names


def _check_own_optimizer(name: str, p: torch.Tensor) -> None:
    opt = getattr(p, "optimizer", None)
    if opt is None:
        return
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"parameter {name!r} has an optimizer attribute that is not a torch.optim.Optimizer: {opt!r}")
    if not any(q is p for group in opt.param_groups for q in group["params"]):
        raise ValueError(f"parameter {name!r}.optimizer does not hold that parameter")


def collect_dense_variables(var_opt: torch.optim.Optimizer, model: torch.nn.Module | None) -> Variables:
    """Dense variables: ``var_opt``'s parameters plus ``model``'s, named where a name is known."""
    if not isinstance(var_opt, torch.optim.Optimizer):
        raise TypeError(f"var_opt must be a torch.optim.Optimizer, got {type(var_opt).__name__}")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    names = _optimizer_param_names(var_opt)
    ordered: dict[int, torch.Tensor] = {}
    for group in var_opt.param_groups:
        for p in group["params"]:
            ordered.setdefault(id(p), p)
    if model is not None:
        for name, p in model.named_parameters():
            names.setdefault(id(p), name)
            ordered.setdefault(id(p), p)
    held = {id(p) for group in var_opt.param_groups for p in group["params"]}
    out = Variables()
    for i, (key, p) in enumerate(ordered.items()):
        if not p.requires_grad:
            continue
        name = names.get(key, f"param_{i}")
        _check_own_optimizer(name, p)
        if key not in held and getattr(p, "optimizer", None) is None:
            # A torch optimizer only steps what it holds; silently skipping the
            # parameter (or adding it to var_opt behind the user's back) would be worse.
            raise ValueError(f"model parameter {name!r} is neither held by var_opt nor has its own .optimizer")
        out.names.append(name)
        out.tensors.append(p)
    return out


def collect_embedding_variables(ctx, feature_columns: Iterable, fused_layout: bool,
                                model: torch.nn.Module | None = None) -> Variables:
    """Embedding variables: each column's per-id leaf, or the flattened fused layout.

    With ``model``, also the variables of every ``HashEmbeddingBagCollection``
    in it (``embedding_variables()``: its latest training batch), so none of
    its columns can be forgotten; columns of such a module that are passed
    in ``feature_columns`` too are not collected twice.
    """
    if fused_layout:
        if ctx.layout_factory is None:
            raise RuntimeError("is_fused_layout=True needs a NativeContext with a layout_factory")
        tensors = list(ctx.layout_factory.flattened_layout())
        return Variables([f"layout_{i}" for i in range(len(tensors))], tensors)
    out = Variables()
    owned: set[int] = set()
    modules = [m for m in model.modules() if isinstance(m, HashEmbeddingBagCollection)] if model is not None else []
    for module in modules:
        owned.update(id(fc) for fc in module.columns)
        for name, t in module.embedding_variables():
            out.names.append(name)
            out.tensors.append(t)
    columns = [fc for fc in feature_columns if id(fc) not in owned]
    tensors = [fc.get_all_embeddings_concat() for fc in columns]
    for fc, t in zip(columns, tensors, strict=True):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"column {fc.feature_name!r} has no looked-up embeddings (got {type(t).__name__})")
    out.names.extend(fc.feature_name for fc in columns)
    out.tensors.extend(tensors)
    return out


# ---------------------------------------------------------------- gradients


def compute_gradients(loss: torch.Tensor, targets: list[torch.Tensor], buckets=None) -> list[torch.Tensor | None]:
    """Gradients of ``loss`` w.r.t. ``targets`` (None where unused).

    Uses ``backward(inputs=...)`` rather than ``autograd.grad`` so each gradient
    is a tensor of its own (autograd may hand several inputs views of one
    buffer), which the later stages then scale in place. With ``buckets``
    (``GradientBuckets``), its parameters' gradients are written straight
    into its flat buffers (zeros where unused), ready for an in-place allreduce.
    """
    wanted = [t for t in targets if t.requires_grad]
    for t in wanted:
        t.grad = None
    if buckets is not None:
        buckets.zero_grad_()
    if wanted:
        loss.backward(inputs=wanted)
    grads = [t.grad if t.requires_grad else None for t in targets]
    for t in wanted:
        t.grad = None
    return grads


def filter_unused(dense: Variables, sparse: Variables, grads, zero_fill_sparse: bool, zero_fill_dense: bool = False):
    """Drops variables without gradients (Monolith's unused filter).

    Fused layouts get zeros instead, and so do dense variables when an allreduce
    runs: every rank must reduce the same list, even if a parameter went unused
    in this rank's batch.
    """
    n = len(dense.tensors)
    dense_grads, sparse_grads = list(grads[:n]), list(grads[n:])
    if zero_fill_dense:
        dense_grads = [torch.zeros_like(t) if g is None else g for g, t in zip(dense_grads, dense.tensors, strict=True)]
    if zero_fill_sparse:
        sparse_grads = [torch.zeros_like(t) if g is None else g for g, t in zip(sparse_grads, sparse.tensors, strict=True)]
    dense = dense.select([g is not None for g in dense_grads])
    sparse = sparse.select([g is not None for g in sparse_grads])
    return dense, [g for g in dense_grads if g is not None], sparse, [g for g in sparse_grads if g is not None]


def _ue_feature_for(name: str, ue_fc_names) -> str | None:
    for fc_name in ue_fc_names:
        if fc_name in name or "uue" in name:
            return fc_name
    return None


def _feature_norm(value) -> torch.Tensor:
    if isinstance(value, RaggedTensor):
        value = value.values
    elif isinstance(value, torch.Tensor) and value.is_nested:
        value = value.values()
    return torch.linalg.vector_norm(value.float())


def ue_check(names: list[str], grads: list[torch.Tensor], config, features) -> list[torch.Tensor]:
    """Zeroes gradients of UE variables whose feature norm is not above the threshold (no host sync)."""
    out = []
    for name, g in zip(names, grads, strict=True):
        fc_name = _ue_feature_for(name, config.ue_fc_names)
        if fc_name is None:
            out.append(g)
            continue
        keep = _feature_norm(features[fc_name]).to(g.device) > config.ue_euclidean_norm_threshold
        logger.debug("UE variable %s gated by feature %s", name, fc_name)
        out.append(torch.where(keep, g, torch.zeros_like(g)))
    return out


# ---------------------------------------------------------------- clipping


def _warmup_factor(global_step: torch.Tensor, warmup_steps: int) -> torch.Tensor:
    return (global_step.double() / warmup_steps).clamp_max(1.0)


def compute_clip(dense_grads, sparse_grads, config, global_step) -> Clip:
    """Norms and clip factors; ``ClipByValue``/``ClipByNorm`` are applied in place here."""
    clip_type, clip_norm = config.clip_type, config.clip_norm
    if clip_norm is None:
        return Clip()
    if clip_type == GradClipType.ClipByGlobalNorm:
        norm = clip_ops.global_norm(dense_grads + sparse_grads)
        dense_scale = clip_ops.clip_factor(norm, clip_norm)
        if not config.sparse_clip_norm and not config.sparse_norm_warmup_steps:
            # One bound for both: the same factor object, so run_step can scale all grads in one call.
            return Clip(dense_scale, dense_scale, global_norm=norm)
        sparse_bound = config.sparse_clip_norm or clip_norm
        if config.sparse_norm_warmup_steps:
            sparse_bound = _warmup_factor(global_step, config.sparse_norm_warmup_steps).to(norm) * sparse_bound
        return Clip(dense_scale, clip_ops.clip_factor(norm, sparse_bound), global_norm=norm)
    if clip_type == GradClipType.ClipByDenseAndSparse:
        dense_norm = clip_ops.global_norm(dense_grads)
        clip = Clip(clip_ops.clip_factor(dense_norm, clip_norm), dense_norm=dense_norm)
        if config.sparse_clip_norm is not None:
            clip.sparse_norm = clip_ops.global_norm(sparse_grads)
            clip.sparse_scale = clip_ops.clip_factor(clip.sparse_norm, config.sparse_clip_norm)
        return clip
    grads = dense_grads + sparse_grads
    if grads and clip_type == GradClipType.ClipByValue:
        torch._foreach_clamp_min_(grads, -clip_norm)
        torch._foreach_clamp_max_(grads, clip_norm)
    elif grads and clip_type == GradClipType.ClipByNorm:
        # Norms in float32: an fp16 norm above 65504 would be inf and zero the gradient.
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        factors = [clip_ops.clip_factor(n, clip_norm).to(g.dtype) for n, g in zip(norms, grads, strict=True)]
        torch._foreach_mul_(grads, factors)
    return Clip()


# ---------------------------------------------------------------- the step


def _write_summaries(ctx, config, clip: Clip, global_step, dense, dense_grads, sparse, sparse_grads) -> None:
    writer = ctx.summary_writer
    if writer is None:
        return
    step = int(global_step) if global_step is not None else 0
    summaries.write_norm_summaries(
        writer,
        step,
        {
            "global_gradient_norm": clip.global_norm,
            "global_gradient_norm/dense": clip.dense_norm,
            "global_gradient_norm/sparse": clip.sparse_norm,
        },
    )
    if config.summarize:
        summaries.write_gradient_summaries(
            writer, step, dense.names, dense.tensors, dense_grads, sparse.names, sparse_grads
        )


def _all_finite(grads, scales, allreduce_config) -> bool:
    checks = [s for s in scales if isinstance(s, torch.Tensor)]
    checks += list(torch._foreach_norm(grads)) if grads else []
    if not checks:
        return True
    device = checks[0].device
    bad = (~torch.isfinite(torch.stack([c.float().to(device) for c in checks]))).any().to(torch.int32)
    if allreduce_config is not None:
        # Every rank must take the same decision, or replicas drift apart.
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=allreduce_config.group)
    return not bool(bad.item())


def _optimizer_step(optimizer: torch.optim.Optimizer, params, grads) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    try:
        optimizer.step()
    finally:
        for p in params:
            p.grad = None


def _group_by_optimizer(var_opt, params, grads):
    groups: dict[int, tuple] = {}
    for p, g in zip(params, grads, strict=True):
        opt = getattr(p, "optimizer", None) or var_opt
        entry = groups.setdefault(id(opt), (opt, [], []))
        entry[1].append(p)
        entry[2].append(g)
    return list(groups.values())


def apply(ctx, var_opt, dense: Variables, dense_grads, sparse: Variables, sparse_grads, sparse_scale,
          global_step, sync: bool) -> None:
    """Embeddings now; dense updates and the global-step increment through the async manager."""
    is_async = False if sync else None
    if sparse_grads or ctx.has_embeddings:
        ctx.apply_embedding_gradients(list(zip(sparse_grads, sparse.tensors, strict=True)), sparse_scale,
                                      global_step=global_step)
    for opt, params, grads in _group_by_optimizer(var_opt, dense.tensors, dense_grads):
        ctx.add_async_function(_optimizer_step, (opt, params, grads), is_async=is_async, snapshot=False)
    if global_step is not None:
        ctx.add_async_function(global_step.add_, (1,), is_async=is_async)


def gradient_buckets(ctx, dense: Variables, config, sync: bool):
    """The persistent allreduce buffers for these dense variables, or None where they do not apply.

    Used for fusion ``"one"`` when the dense updates run in this step (a
    synchronous manager, or ``sync``): a deferred update would read its
    gradients after the next step's backward had overwritten the buffers.
    Kept on ``ctx.gradient_buckets`` and rebuilt when the variables or the
    allreduce settings change.
    """
    allreduce = config.allreduce
    if allreduce is None or allreduce.fusion != "one" or not dense.tensors:
        return None
    if not sync and ctx.async_function_mgr.is_async:
        return None
    if not all(t.requires_grad and t.is_leaf and t.is_floating_point() for t in dense.tensors):
        return None
    cached = getattr(ctx, "gradient_buckets", None)
    key = (tuple(id(t) for t in dense.tensors), allreduce.bucket_cap_bytes, allreduce.compression)
    if cached is None or cached[0] != key:
        cached = (key, GradientBuckets(dense.tensors, allreduce))
        ctx.gradient_buckets = cached
    return cached[1]


def run_step(ctx, var_opt, loss, dense: Variables, sparse: Variables, config, global_step, features,
             sync: bool = False):
    """Runs the whole pipeline for one step and returns a ``StepResult``."""
    buckets = gradient_buckets(ctx, dense, config, sync)
    grads = compute_gradients(loss, dense.tensors + sparse.tensors, buckets)
    dense, dense_grads, sparse, sparse_grads = filter_unused(
        dense, sparse, grads, config.is_fused_layout, zero_fill_dense=config.allreduce is not None
    )
    if not dense_grads and not sparse_grads and config.allreduce is None:
        return StepResult(applied=False, reason="no_gradients")
    if not sync:
        # The previous step's deferred updates run now, after this step's
        # gradients were computed on the parameters they saw.
        ctx.async_function_mgr.run_pending()
    if config.ue_gradient_check:
        dense_grads = ue_check(dense.names, dense_grads, config, features)
        sparse_grads = ue_check(sparse.names, sparse_grads, config, features)
    if config.dense_reduce_mean and dense_grads:
        torch._foreach_div_(dense_grads, float(config.batch_size))

    clip = compute_clip(dense_grads, sparse_grads, config, global_step)
    defer = config.allreduce is not None and isinstance(clip.dense_scale, torch.Tensor) and not config.summarize
    dense_scale, sparse_scale = clip.dense_scale, clip.sparse_scale
    if not defer:
        if dense_scale is sparse_scale:
            clip_ops.foreach_scale_(dense_grads + sparse_grads, dense_scale)
        else:
            clip_ops.foreach_scale_(dense_grads, dense_scale)
            clip_ops.foreach_scale_(sparse_grads, sparse_scale)
        dense_scale = sparse_scale = 1.0
    _write_summaries(ctx, config, clip, global_step, dense, dense_grads, sparse, sparse_grads)

    if config.allreduce is not None and dense_grads:
        dense_grads = allreduce_cond(dense_grads, scale=dense_scale, config=config.allreduce, buckets=buckets)
    if config.dense_weight_decay and dense_grads:
        torch._foreach_add_(dense_grads, [p.detach() for p in dense.tensors], alpha=config.dense_weight_decay)

    if config.skip_nonfinite and not _all_finite(dense_grads + sparse_grads, [sparse_scale], config.allreduce):
        logger.warning("non-finite gradients: step skipped")
        return StepResult(applied=False, reason="nonfinite", global_norm=clip.global_norm,
                          dense_norm=clip.dense_norm, sparse_norm=clip.sparse_norm)

    apply(ctx, var_opt, dense, dense_grads, sparse, sparse_grads, sparse_scale, global_step, sync)
    return StepResult(
        applied=True,
        global_norm=clip.global_norm,
        dense_norm=clip.dense_norm,
        sparse_norm=clip.sparse_norm,
        dense_scale=clip.dense_scale,
        sparse_scale=clip.sparse_scale,
        num_dense=len(dense_grads),
        num_sparse=len(sparse_grads),
        allreduced=config.allreduce is not None and bool(dense_grads),
        deferred_clip=defer,
    )
