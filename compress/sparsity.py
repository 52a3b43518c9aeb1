"""Masks and sparsity bookkeeping shared by every pass that zeroes weights."""
from __future__ import annotations

from fnmatch import fnmatch
from typing import Any, Literal

import torch
from torch import nn

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def classifier_name(model: nn.Module) -> str | None:
    """The last Linear layer in module order: the classifier, which pruning leaves alone unless asked."""
    name = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            name = module_name
    return name


def prunable_layers(
    model: nn.Module,
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
    include_classifier: bool = False,
) -> dict[str, nn.Module]:
    """Conv/Linear layers selected by fnmatch patterns on module names (SparseML/ModelOpt style)."""
    skip_classifier = None if include_classifier else classifier_name(model)
    chosen: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES) or name == skip_classifier:
            continue
        if targets and not any(fnmatch(name, pattern) for pattern in targets):
            continue
        if ignore and any(fnmatch(name, pattern) for pattern in ignore):
            continue
        chosen[name] = module
    return chosen


def magnitude_masks(
    layers: dict[str, nn.Module],
    sparsity: float,
    scope: Literal["global", "layer"],
    existing: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks pruning exactly round(sparsity * n) of the smallest |w| (globally or per layer).

    Already-pruned weights score 0, so sparsity only grows across calls.
    """
    existing = existing or {}
    scores = {}
    for name, module in layers.items():
        weight = module.weight.detach().abs()
        key = f"{name}.weight"
        if key in existing:
            weight = weight * existing[key]
        scores[key] = weight
    if scope == "layer":
        return {key: _keep_largest(score, sparsity) for key, score in scores.items()}
    flat = torch.cat([score.flatten() for score in scores.values()])
    keep_flat = _keep_largest(flat, sparsity)
    masks, offset = {}, 0
    for key, score in scores.items():
        masks[key] = keep_flat[offset : offset + score.numel()].view_as(score)
        offset += score.numel()
    return masks


def _keep_largest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    n_prune = int(round(sparsity * scores.numel()))
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_prune > 0:
        # topk (not a threshold) so ties at the boundary still give the exact count
        pruned = torch.topk(scores.flatten(), n_prune, largest=False, sorted=False).indices
        keep[pruned] = False
    return keep.view_as(scores)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    if not masks:
        return
    params = dict(model.named_parameters())
    for key, mask in masks.items():
        params[key].mul_(mask.to(params[key].dtype))


def mask_gradients(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the gradient of pruned weights so momentum never pushes them off zero."""
    if not masks:
        return
    params = dict(model.named_parameters())
    for key, mask in masks.items():
        grad = params[key].grad
        if grad is not None:
            grad.mul_(mask.to(grad.dtype))


def sparsity_stats(model: nn.Module) -> dict[str, Any]:
    """Zeros among the weights of all conv/linear layers (classifier included), per layer and overall."""
    per_layer: dict[str, float] = {}
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            weight = module.weight.detach()
            layer_zeros = int((weight == 0).sum().item())
            per_layer[name] = layer_zeros / weight.numel()
            zeros += layer_zeros
            total += weight.numel()
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p.detach() != 0).sum().item()) for p in model.parameters())
    return {
        "sparsity": zeros / total if total else 0.0,
        "params": params,
        "params_nonzero": nonzero,
        "size_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
        "layer_sparsity": per_layer,
    }
