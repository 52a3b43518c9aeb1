"""prune.magnitude: zero the smallest-magnitude weights, then fine-tune with the masks held.

Granularities and schedules beyond one-shot unstructured plug in here (see ALGORITHMS.md section 1).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from compress.errors import BadInput
from compress.passes.registry import PassResult, register_pass
from compress.recipe import StrictModel
from compress.sparsity import apply_masks, magnitude_masks, prunable_layers
from compress.state import ModelState, StageContext
from compress.train import fit


class FinetuneConfig(StrictModel):
    epochs: int = Field(2, ge=0, le=1000)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "constant", "onecycle"] = "cosine"


class MagnitudePruneConfig(StrictModel):
    sparsity: float = Field(ge=0, lt=1, description="fraction of the targeted weights set to zero")
    granularity: Literal["unstructured"] = "unstructured"
    scope: Literal["global", "layer"] = "global"
    schedule: Literal["oneshot"] = "oneshot"
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    targets: list[str] = Field(default_factory=list, description="module-name patterns; empty = all conv/linear")
    ignore: list[str] = Field(default_factory=list)
    prune_classifier: bool = False


def finetune(state: ModelState, cfg: FinetuneConfig, ctx: StageContext, description: str) -> None:
    if cfg.epochs == 0:
        return
    fit(
        state.model,
        ctx.data.train,
        epochs=cfg.epochs,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        schedule=cfg.schedule,
        batch_size=ctx.batch_size,
        seed=ctx.seed,
        device=ctx.device,
        masks=state.masks,
        progress=ctx.progress,
        description=description,
    )


@register_pass("prune.magnitude", MagnitudePruneConfig)
def prune_magnitude(state: ModelState, cfg: MagnitudePruneConfig, ctx: StageContext) -> PassResult:
    layers = prunable_layers(state.model, cfg.targets, cfg.ignore, cfg.prune_classifier)
    if not layers:
        raise BadInput(
            f"stage {ctx.stage_name!r}: params.targets/ignore select no Conv or Linear layer to prune"
        )
    new_masks = magnitude_masks(layers, cfg.sparsity, cfg.scope, existing=state.masks)
    for key, mask in new_masks.items():
        # a weight pruned by an earlier stage stays pruned even if this stage asks for less
        state.masks[key] = mask & state.masks[key] if key in state.masks else mask
    apply_masks(state.model, state.masks)
    metric_pruned = ctx.evaluate(state.model)
    ctx.progress.log(f"{ctx.stage_name}: pruned {len(layers)} layers, metric before fine-tune {metric_pruned:.4f}")
    finetune(state, cfg.finetune, ctx, f"{ctx.stage_name}: fine-tune")
    return PassResult(
        state,
        {
            "target_sparsity": cfg.sparsity,
            "granularity": cfg.granularity,
            "scope": cfg.scope,
            "pruned_layers": sorted(layers),
            "metric_before_finetune": metric_pruned,
        },
    )
