"""Masks and sparsity bookkeeping shared by every pass that zeroes weights."""
from __future__ import annotations

import math
import sys
from fnmatch import fnmatch
from typing import Any, Literal

import torch
from torch import nn

from compress.batches import Nested, call_model, leaves

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def transposed_linear_types() -> tuple[type, ...]:
    """`transformers`' Conv1D (GPT-2's layers): a Linear whose weight is stored [in, out], the transpose of
    nn.Linear's. Looked up only where transformers is already imported (a model of its classes has it)."""
    found = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return (found,) if isinstance(found, type) else ()


def prunable_types() -> tuple[type, ...]:
    """The layers magnitude pruning takes: PRUNABLE_TYPES and transformers' Conv1D."""
    return PRUNABLE_TYPES + transposed_linear_types()


def input_axis(module: nn.Module) -> int:
    """The weight axis of a layer's input channels: 1 ([out, in, ...]), 0 for Conv1D ([in, out])."""
    return 0 if isinstance(module, transposed_linear_types()) else 1


def out_in(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, shaped like the layer's weight, as [out, in, ...]: Conv1D's transposed (its own inverse)."""
    return tensor.t() if input_axis(module) == 0 else tensor


def classifier_name(model: nn.Module, example: Nested | None = None) -> str | None:
    """The output layer: the classifier, which pruning leaves alone unless asked.

    With an `example` input (a batch of one sample, any structure), the last Conv/Linear a forward pass
    runs (SqueezeNet's classifier is a 1x1 convolution); without, the last Linear in module order, or the
    last convolution where the model has no Linear at all. `output_layer_names` finds every output head's.
    """
    if example is not None:
        return output_layer_name(model, example)
    linear = conv = None
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, *transposed_linear_types())):
            linear = module_name
        elif isinstance(module, PRUNABLE_TYPES):
            conv = module_name
    return linear if linear is not None else conv


@torch.no_grad()
def output_layer_name(model: nn.Module, example: Nested) -> str | None:
    """The name of the last Conv/Linear layer that a forward pass on `example` runs (eval mode)."""
    names = {module: name for name, module in model.named_modules() if isinstance(module, prunable_types())}
    order: list[str] = []
    handles = [m.register_forward_hook(lambda module, _a, _o: order.append(names[module])) for m in names]
    was_training = model.training
    try:
        call_model(model.eval(), example)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return order[-1] if order else None


def output_layer_names(model: nn.Module, example: Nested) -> list[str]:
    """The final prediction layers of every output: for each output tensor (a tuple's, a dict's: a
    detector's boxes and class scores, a segmenter's `out`), the Conv/Linear layers whose outputs reach it
    through no other Conv/Linear layer nor a normalisation (found on autograd's record of one forward
    pass on `example`, in eval mode). SSDLite's 12 per-level box and class convolutions, LR-ASPP's low and
    high classifiers, a classifier's last Linear.

    An output that no such layer reaches (a transformer's normalised hidden state) gets the last layer
    the pass runs, as `output_layer_name`; in module order.
    """
    names = {module: name for name, module in model.named_modules() if isinstance(module, prunable_types())}
    made_by: dict[Any, str] = {}
    order: list[str] = []

    def record(module: nn.Module, _args: Any, output: Any) -> None:
        order.append(names[module])
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            made_by[output.grad_fn] = names[module]

    handles = [m.register_forward_hook(record) for m in names]
    was_training = model.training
    try:
        with torch.enable_grad():
            outputs = call_model(model.eval(), example)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    found: set[str] = set()
    for _, tensor in leaves(outputs):
        reached = _layers_reaching(tensor.grad_fn, made_by)
        found |= reached if reached else ({order[-1]} if order else set())
    return [name for name in names.values() if name in found]


def _layers_reaching(root: Any, made_by: dict[Any, str]) -> set[str]:
    """Layers (by `made_by`, grad_fn -> name) met first walking autograd's graph back from `root`; the
    walk stops at each layer's output and at normalisations (what precedes a norm is no prediction)."""
    found: set[str] = set()
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in made_by:
            found.add(made_by[node])
            continue
        if "Norm" in type(node).__name__:
            continue
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return found


def prunable_layers(
    model: nn.Module,
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
    include_classifier: bool = False,
    example: Nested | None = None,
) -> dict[str, nn.Module]:
    """Conv/Linear layers (Conv1D too) selected by fnmatch patterns on module names (SparseML/ModelOpt
    style); the output layers unless included: every output head's final prediction layers
    (output_layer_names) found by a forward pass on `example` where given, else the classifier by module
    order. Layers whose weight is tied to another parameter (GPT-2's lm_head is its word embedding) are
    never selected (`tied_layers`)."""
    skipped = set(tied_layers(model))
    if not include_classifier:
        if example is not None:
            skipped |= set(output_layer_names(model, example))
        elif (name := classifier_name(model)) is not None:
            skipped.add(name)
    chosen: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not isinstance(module, prunable_types()) or name in skipped:
            continue
        if targets and not any(fnmatch(name, pattern) for pattern in targets):
            continue
        if ignore and any(fnmatch(name, pattern) for pattern in ignore):
            continue
        chosen[name] = module
    return chosen


def tied_layers(model: nn.Module) -> dict[str, str]:
    """{layer: the parameter its weight is tied to} for Conv/Linear layers whose weight is one parameter
    with another (GPT-2's lm_head.weight is transformer.wte.weight). Pruning stays off them: a mask would
    zero the other module's weights too (an embedding table's rows), and the parameter has one name only."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    tied = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, prunable_types()) and isinstance(weight, nn.Parameter):
            others = [other for other in names.get(id(weight), []) if other != f"{name}.weight"]
            if others:
                tied[name] = others[0]
    return tied


def magnitude_masks(
    layers: dict[str, nn.Module],
    sparsity: float,
    scope: Literal["global", "layer"],
    existing: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks pruning exactly round(sparsity * n) of the smallest |w| (globally or per layer).

    Already-pruned weights score 0, so sparsity only grows across calls. The largest weight of every
    filter (output channel) that still has one is pruned last (keep_filters): a filter with no weight
    left outputs a constant, so magnitude pruning would be removing channels, and, where weight scales
    differ between layers, whole layers (global scope on a random EfficientNet-B0 emptied its later
    depthwise convolutions, whose initial weights are 3-4x smaller than the rest, and every output became
    the same).
    """
    scores = keep_filters(_masked_scores(layers, existing or {}))
    if scope == "layer":
        return _as_stored(layers, {key: _keep_largest(score, sparsity) for key, score in scores.items()})
    flat = torch.cat([score.flatten() for score in scores.values()])
    keep_flat = _keep_largest(flat, sparsity)
    masks, offset = {}, 0
    for key, score in scores.items():
        masks[key] = keep_flat[offset : offset + score.numel()].view_as(score)
        offset += score.numel()
    return _as_stored(layers, masks)


def keep_filters(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`scores` with each filter's (output channel's) largest positive score raised to +inf: pruned
    only where a sparsity leaves fewer weights than filters."""
    raised = {}
    for key, score in scores.items():
        rows = score.reshape(score.shape[0], -1) if score.dim() > 1 else score.reshape(-1, 1)
        best = rows.argmax(dim=1, keepdim=True)
        top = rows.gather(1, best)
        raised[key] = rows.clone().scatter_(1, best, top.masked_fill(top > 0, math.inf)).view_as(score)
    return raised


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
        if isinstance(module, prunable_types()):
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


# --- N:M (2:4) -------------------------------------------------------------------------------------------

NmRule = Literal["asp", "divisible"]


def nm_ineligible_reason(weight: torch.Tensor, n: int, m: int, rule: NmRule) -> str | None:
    """Why a layer cannot take the N:M pattern along its input channels, or None if it can.

    `divisible` only asks that the input channels split into groups of m. `asp` is NVIDIA ASP's rule
    for the sparse tensor-core kernels: out-channels % 8 == 0 and in-channels % 16 == 0.
    """
    out_channels, in_channels = weight.shape[0], weight.shape[1]  # [out, in, ...] (sparsity.out_in)
    if in_channels % m:
        return f"{in_channels} input channels (per group) are not a multiple of m={m}"
    if rule == "asp" and (out_channels % 8 or in_channels % 16):
        return (
            f"NVIDIA ASP rule (out % 8 == 0 and in % 16 == 0) fails for "
            f"{out_channels} out x {in_channels} in channels"
        )
    return None


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest scores in every group of m consecutive input channels.

    A conv weight [K, C, R, S] is grouped along C at each (k, r, s), the layout NVIDIA's sparse tensor
    cores read; a linear weight [K, C] along C (a Conv1D's [C, K] is given as out_in's [K, C]).
    """
    channels_last = scores.movedim(1, -1)
    groups = channels_last.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(n, dim=1).indices, True)
    return keep.reshape(channels_last.shape).movedim(-1, 1).contiguous()


def nm_masks(
    layers: dict[str, nn.Module],
    n: int,
    m: int,
    rule: NmRule,
    existing: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """N:M keep-masks for every eligible layer, and {layer: reason} for those that cannot take it. Groups
    run along the input channels: weight axis 1, axis 0 for a Conv1D."""
    scores = _masked_scores(layers, existing or {})
    masks: dict[str, torch.Tensor] = {}
    skipped: dict[str, str] = {}
    for name, module in layers.items():
        reason = nm_ineligible_reason(out_in(module, module.weight), n, m, rule)
        if reason is not None:
            skipped[name] = reason
            continue
        masks[f"{name}.weight"] = nm_mask(scores[f"{name}.weight"], n, m)
    return _as_stored(layers, masks), skipped


def nm_violations(weight: torch.Tensor, n: int, m: int, axis: int = 1) -> int:
    """Groups of m input channels (weight axis `axis`: sparsity.input_axis of the layer) holding more
    than n nonzeros (0 means the pattern holds)."""
    groups = (weight.detach() != 0).movedim(axis, -1).reshape(-1, m)
    return int((groups.sum(dim=1) > n).sum().item())


# --- randomized magnitude pruning (Guha et al. 2023) -----------------------------------------------------


def randomized_masks(
    layers: dict[str, nn.Module],
    sparsity: float,
    scope: Literal["global", "layer"],
    generator: torch.Generator,
    alpha: float | None = None,
    existing: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Keep each weight with probability 1 - exp(-w^2 / (alpha * Var(W))), W its layer; no rescaling.

    Without an explicit alpha, alpha is solved (one for all layers, or one per layer) so that the
    expected pruned fraction equals `sparsity`; the realised fraction is random around it.
    Returns the masks and the alpha used per layer.
    """
    existing = existing or {}
    # z = w^2 / Var(W): the seed paper's scale-free magnitude; an all-zero layer is pruned whole
    z = {}
    for name, module in layers.items():
        key = f"{name}.weight"
        weight = module.weight.detach()
        if key in existing:
            weight = weight * existing[key]
        variance = float(weight.var(unbiased=False))  # of the signed weights, not of |w|
        z[key] = weight.square() / variance if variance > 0 else torch.zeros_like(weight)
    if alpha is not None:
        alphas = {key: alpha for key in z}
    elif scope == "layer":
        alphas = {key: _solve_alpha([value], sparsity) for key, value in z.items()}
    else:
        shared = _solve_alpha(list(z.values()), sparsity)
        alphas = {key: shared for key in z}
    masks = {}
    for key, value in z.items():
        keep_probability = 1 - torch.exp(-value / alphas[key])
        draw = torch.rand(value.shape, generator=generator).to(value.device)
        masks[key] = draw < keep_probability
    return masks, {key.removesuffix(".weight"): value for key, value in alphas.items()}


def _solve_alpha(z: list[torch.Tensor], sparsity: float) -> float:
    """alpha with mean(exp(-z / alpha)) == sparsity, by bisection on log(alpha) (the mean rises with alpha)."""
    flat = torch.cat([value.flatten() for value in z]).double()
    low, high = -30.0, 30.0
    for _ in range(100):
        middle = (low + high) / 2
        if float(torch.exp(-flat / math.exp(middle)).mean()) < sparsity:
            low = middle
        else:
            high = middle
    return math.exp((low + high) / 2)


def _masked_scores(layers: dict[str, nn.Module], existing: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """|w| per layer weight as [out, in, ...] (out_in), with weights an earlier stage pruned scoring 0 so
    they are pruned first."""
    scores = {}
    for name, module in layers.items():
        key = f"{name}.weight"
        score = module.weight.detach().abs()
        if key in existing:
            score = score * existing[key]
        scores[key] = out_in(module, score)
    return scores


def _as_stored(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks computed as [out, in, ...] (out_in) back in each weight's own layout."""
    return {key: out_in(layers[key.removesuffix(".weight")], mask).contiguous() for key, mask in masks.items()}


def merge_masks(masks: dict[str, torch.Tensor], new_masks: dict[str, torch.Tensor]) -> None:
    """AND new keep-masks into `masks`: a weight pruned by an earlier stage stays pruned."""
    for key, mask in new_masks.items():
        masks[key] = mask & masks[key] if key in masks else mask


def targeted_sparsity(layers: dict[str, nn.Module]) -> tuple[float, int, int]:
    """(fraction of zeros, zeros, total) over the weights of `layers`."""
    zeros = sum(int((module.weight == 0).sum()) for module in layers.values())
    total = sum(module.weight.numel() for module in layers.values())
    return (zeros / total if total else 0.0), zeros, total
