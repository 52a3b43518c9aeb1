"""prune.ap: Activate-while-Pruning (Liu et al., TMLR 2023) riding on global magnitude pruning.

Each cycle trains the masked network (snapshotting the weights first), prunes the base method's share
by magnitude, then AP's share among the remaining *negative* weights that moved least during the cycle:
removing negative incoming weights raises pre-activations, so fewer ReLUs stay dead. After the last
cycle the network is fine-tuned once more. ALGORITHMS.md section 2; `ap_share: 0` is the plain base,
the ablation baseline with the same training budget.

Unlike the official code this never touches BatchNorm parameters (only conv/linear weights are
selected), and it continues from the trained weights unless `rewind` is set.
"""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from compress.dnr import dead_neuron_rate
from compress.passes.prune_magnitude import (
    SelectionConfig,
    before_after,
    finetune,
    finetune_info,
    finetune_teacher,
    measure,
    rewind_to,
    select_layers,
)
from compress.passes.registry import PassResult, register_pass
from compress.sparsity import apply_masks, magnitude_masks, merge_masks, targeted_sparsity
from compress.state import ModelState, StageContext


class APConfig(SelectionConfig):
    sparsity: float = Field(ge=0, lt=1, description="fraction of the targeted weights zero after the last cycle")
    ap_share: float = Field(0.1, ge=0, le=1, description="share of each cycle's pruning done by AP (official: 2 of 20)")
    cycles: int = Field(5, ge=1, le=100, description="train -> prune cycles; a final fine-tune follows")
    rewind: bool = Field(False, description="after each cycle's pruning, reset surviving weights to the stage start")


def cycle_sparsities(initial: float, final: float, cycles: int) -> list[float]:
    """Cumulative sparsity after each cycle: the same fraction of what remains goes every cycle."""
    if final <= initial:
        return [final] * cycles
    keep_ratio = (1 - final) / (1 - initial)
    return [1 - (1 - initial) * keep_ratio ** (c / cycles) for c in range(1, cycles + 1)]


def ap_masks(
    layers: dict[str, nn.Module],
    masks: dict[str, torch.Tensor],
    start: dict[str, torch.Tensor],
    count: int,
) -> tuple[dict[str, torch.Tensor], int]:
    """Keep-masks pruning the `count` alive negative weights that moved least since `start`.

    Ranked across all layers, as the official code does. Returns the masks and how many candidates
    (alive negative weights) there were; if fewer than `count`, all of them go.
    """
    keys = [f"{name}.weight" for name in layers]
    movement = []
    for name, key in zip(layers, keys):
        weight = layers[name].weight.detach()
        alive = masks[key] if key in masks else torch.ones_like(weight, dtype=torch.bool)
        score = (weight - start[key]).abs()
        movement.append(torch.where(alive & (weight < 0), score, torch.full_like(score, float("inf"))))
    flat = torch.cat([score.flatten() for score in movement])
    candidates = int(torch.isfinite(flat).sum())
    count = min(count, candidates)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if count > 0:
        keep[torch.topk(flat, count, largest=False, sorted=False).indices] = False
    result, offset = {}, 0
    for key, score in zip(keys, movement):
        result[key] = keep[offset : offset + score.numel()].view_as(score)
        offset += score.numel()
    return result, candidates


@register_pass("prune.ap", APConfig)
def prune_ap(state: ModelState, cfg: APConfig, ctx: StageContext) -> PassResult:
    layers = select_layers(state.model, cfg, ctx)
    example = ctx.example()
    before = measure(state.model, ctx, example, dnr=True)
    initial, _, total = targeted_sparsity(layers)
    stage_start = {k: v.detach().clone() for k, v in state.model.state_dict().items()} if cfg.rewind else None
    teacher = finetune_teacher(state, cfg.finetune, ctx)
    cycles = []
    for index, target in enumerate(cycle_sparsities(initial, cfg.sparsity, cfg.cycles)):
        start = {f"{name}.weight": module.weight.detach().clone() for name, module in layers.items()}
        finetune(state, cfg.finetune, ctx, f"{ctx.stage_name}: cycle {index + 1}/{cfg.cycles} train", teacher=teacher)
        cycles.append(_prune_cycle(state, cfg, layers, start, target, total))
        if stage_start is not None:
            rewind_to(state.model, stage_start, state.masks)
        cycles[-1]["metric_after_prune"] = ctx.evaluate(state.model)
        cycles[-1]["dnr_after_prune"] = dead_neuron_rate(state.model, ctx.data.val, device=ctx.device)["dnr"]
        ctx.progress.log(
            f"{ctx.stage_name}: cycle {index + 1}/{cfg.cycles}: sparsity {cycles[-1]['sparsity']:.4f} "
            f"(AP {cycles[-1]['ap_pruned']}), metric {cycles[-1]['metric_after_prune']:.4f}"
        )
    finetune(state, cfg.finetune, ctx, f"{ctx.stage_name}: final fine-tune", teacher=teacher)
    after = measure(state.model, ctx, example, dnr=True)
    return PassResult(
        state,
        {
            "target_sparsity": cfg.sparsity,
            "granularity": "unstructured",
            "scope": cfg.scope,
            "ap_share": cfg.ap_share,
            **finetune_info(cfg.finetune, ctx),
            "pruned_layers": sorted(layers),
            "cycles": cycles,
            "metric_before_finetune": cycles[-1]["metric_after_prune"],
            "finetune_epochs_total": cfg.finetune.epochs * (cfg.cycles + 1),
            **before_after(before, after),
        },
    )


def _prune_cycle(
    state: ModelState,
    cfg: APConfig,
    layers: dict[str, nn.Module],
    start: dict[str, torch.Tensor],
    target: float,
    total: int,
) -> dict[str, Any]:
    _, zeros_before, _ = targeted_sparsity(layers)
    new_count = max(0, round(target * total) - zeros_before)
    base_count = new_count - round(cfg.ap_share * new_count)
    merge_masks(state.masks, magnitude_masks(layers, (zeros_before + base_count) / total, cfg.scope, state.masks))
    apply_masks(state.model, state.masks)
    _, zeros_base, _ = targeted_sparsity(layers)
    # AP takes whatever the base left to reach the cycle's exact count (the base rounds per layer in layer scope)
    ap_count = max(0, round(target * total) - zeros_base)
    new_masks, candidates = ap_masks(layers, state.masks, start, ap_count)
    merge_masks(state.masks, new_masks)
    apply_masks(state.model, state.masks)
    ap_pruned = min(ap_count, candidates)
    shortfall = ap_count - ap_pruned
    if shortfall:
        # too few negative weights left: magnitude takes the rest so the sparsity target still holds
        merge_masks(state.masks, magnitude_masks(layers, target, cfg.scope, state.masks))
        apply_masks(state.model, state.masks)
    sparsity, _, _ = targeted_sparsity(layers)
    return {
        "sparsity": sparsity,
        "base_pruned": zeros_base - zeros_before,
        "ap_pruned": ap_pruned,
        "ap_candidates": candidates,
        "ap_shortfall": shortfall,
    }
