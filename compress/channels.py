"""Structured channel pruning through Torch-Pruning's DependencyGraph, and MAC counting.

The DependencyGraph couples every layer whose channels must go together (residual adds, concats,
BatchNorm, depthwise convs), so removing a channel keeps the network consistent; the result is a
physically smaller model. See ALGORITHMS.md section 1.
"""
from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import warnings

import torch
from torch import nn

from compress.attention import (
    HeadAttention,
    UnsupportedLayer,
    attention_modules,
    head_count_attribute,
    transformers_attention,
)
from compress.batches import Nested, call_model
from compress.conv1d_channels import Conv1DChannelPruner
from compress.errors import BadInput
from compress.sparsity import PRUNABLE_TYPES, output_layer_names, prunable_types, transposed_linear_types


def count_macs(model: nn.Module, example: Nested) -> tuple[int, int]:
    """(MACs, parameters) of one forward pass on `example`, a batch of one sample of any structure
    (Torch-Pruning's counter calls model(x), model(*x) or model(**x) as compress.batches.call_model does)."""
    import torch_pruning as tp

    was_training = model.training
    # Torch-Pruning's counter has no rule for transformers' Conv1D (GPT-2's layers): counted here, one
    # multiply-add per input feature of every output element
    conv1d: list[int] = []
    handles = [
        module.register_forward_hook(lambda layer, _args, out: conv1d.append(out.numel() * layer.weight.shape[0]))
        for module in model.modules()
        if isinstance(module, transposed_linear_types())
    ]
    try:
        # with keyword inputs it prints a warning per module (no positional input to count the batch by)
        with contextlib.redirect_stdout(io.StringIO()):
            macs, params = tp.utils.count_ops_and_params(model, example)
    finally:
        for handle in handles:
            handle.remove()
    model.train(was_training)
    return int(macs) + sum(conv1d), int(params)


def _forward(model: nn.Module, example: Nested) -> Any:
    """Torch-Pruning's forward_fn: the model called on a sample as compress calls it everywhere (its own
    default tries model(*x) first, which for a lone tensor iterates over the batch axis)."""
    return call_model(model, example)


class ChannelPruner:
    """Removes channels by group L2 magnitude, in steps whose cumulative channel ratios are `ratios`.

    Layers outside `selected` keep their output channels (their inputs may still shrink when the layer
    feeding them is pruned); the output layers of every head (`classifier`: one name or several; and
    whatever sparsity.output_layer_names finds on `example`) are always kept, since their outputs are the
    model's. `example` is a batch of one sample of any structure (a tensor, a tuple or a dict of them).
    A model of transformers' Conv1D blocks (GPT-2) is pruned by compress.conv1d_channels instead, with the
    same ranking rule.
    """

    def __init__(
        self,
        model: nn.Module,
        example: Nested,
        *,
        ratios: Sequence[float],
        global_ranking: bool,
        selected: dict[str, nn.Module],
        classifier: str | Collection[str] | None,
        round_to: int | None,
    ) -> None:
        kept = {classifier} if isinstance(classifier, str) else set(classifier or ())
        ignored = [
            module
            for name, module in model.named_modules()
            if isinstance(module, prunable_types()) and (name not in selected or name in kept)
        ]
        self.conv1d: Conv1DChannelPruner | None = None
        if any(isinstance(m, transposed_linear_types()) for m in model.modules()):
            # GPT-2's Conv1D blocks: heads and MLP channels by slicing (conv1d_channels), no Torch-Pruning graph
            ignored += _output_layers(model, example)
            _refuse_layers_beside_conv1d(model, ignored)
            self.conv1d = Conv1DChannelPruner(
                model, ratios=ratios, global_ranking=global_ranking, ignored=ignored, round_to=round_to
            )
            self.model = model
            return
        cumulative = [0.0, *ratios]
        # attention: whole heads are the structured groups (Torch-Pruning's num_heads on the packed qkv of
        # compress's explicit attention, on each of q, k, v of a transformers model's)
        self.attention = attention_modules(model)
        self.transformers_attention = transformers_attention(model)
        num_heads = {m.qkv: m.num_heads for m in self.attention.values()}
        num_heads |= {layer: m.num_heads for m in self.transformers_attention.values() for layer in m.projections}
        was_training = model.training
        model.eval()  # tracing a batch of one through BatchNorm in train mode can fail
        for attention in self.attention.values():
            attention.hide_bias = True
        regrouping = _channel_regrouping_module(model, example)
        try:
            # the graph is built from autograd's record
            with torch.enable_grad(), warnings.catch_warnings(), _shuffle_as_identity(model, regrouping):
                warnings.filterwarnings("ignore", message="Unwrapped parameters", category=UserWarning)
                ignored += _output_layers(model, example) + _normalized_residual_layers(model, example, ignored)
                if regrouping is not None:
                    ignored += _shuffled_layers(model, example, ignored)
                self.pruner = _base_pruner(model, example, cumulative, global_ranking, ignored, round_to, num_heads)
        except Exception as exc:
            raise _graph_error(model, example, exc) from None
        finally:
            for attention in self.attention.values():
                attention.hide_bias = False
            model.train(was_training)
        self.model = model

    def step(self) -> None:
        if self.conv1d is not None:
            self.conv1d.step()
            return
        by_qkv = {m.qkv: m for m in self.attention.values()}
        with torch.enable_grad():
            for group in self.pruner.step(interactive=True):
                removed: dict[HeadAttention, set[int]] = {}
                for dep, idxs in group:
                    attention = by_qkv.get(dep.target.module)
                    if attention is not None and self.pruner.DG.is_out_channel_pruning_fn(dep.handler):
                        width = attention.num_heads * attention.head_dim  # q's rows, then k's, then v's
                        plain = [int(getattr(i, "idx", i)) for i in idxs]
                        removed[attention] = {i // attention.head_dim for i in plain if i < width}
                group.prune()
                for attention, heads in removed.items():
                    attention.keep_heads([h for h in range(attention.num_heads) if h not in heads])
        for heads in self.transformers_attention.values():
            heads.sync()
        checks = [(m.path, type(m).__name__, [m.qkv], 3, m.num_heads, m.head_dim) for m in self.attention.values()]
        checks += [
            (m.path, type(m.module).__name__, list(m.projections), 1, m.num_heads, m.head_dim)
            for m in self.transformers_attention.values()
        ]
        for path, kind, projections, packed, now, head_dim in checks:
            expected = self.pruner.num_heads[projections[0]]
            widths = [layer.out_features for layer in projections]
            if now != expected or widths != [packed * expected * head_dim] * len(projections):
                raise UnsupportedLayer(path, kind, f"head pruning left {widths} q/k/v features for {expected} heads of {head_dim}")


def _refuse_layers_beside_conv1d(model: nn.Module, ignored: list[nn.Module]) -> None:
    """A model of transformers' Conv1D blocks is pruned without Torch-Pruning's graph (which has no Conv1D
    pruner): a Conv/Linear layer that would lose channels besides them is refused, named."""
    for path, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES) and module not in ignored:
            raise UnsupportedLayer(
                path, type(module).__name__,
                "granularity channels: this model's Conv1D blocks (GPT-2's) are pruned by slicing, not through "
                "Torch-Pruning's graph, so its other layers cannot lose channels with them; leave it out "
                "(params.ignore) or prune unstructured or nm",
            )  # fmt: skip


def _base_pruner(
    model: nn.Module,
    example: Nested,
    cumulative: list[float],
    global_ranking: bool,
    ignored: list[nn.Module],
    round_to: int | None,
    num_heads: dict[nn.Module, int],
) -> Any:
    import torch_pruning as tp

    return tp.pruner.BasePruner(
        model,
        example,
        forward_fn=_forward,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=cumulative[-1],
        global_pruning=global_ranking,
        iterative_steps=len(cumulative) - 1,
        iterative_pruning_ratio_scheduler=lambda _ratio, _steps: cumulative,
        ignored_layers=ignored,
        round_to=round_to,
        num_heads=num_heads,
        prune_num_heads=bool(num_heads),
        prune_head_dims=False,
        head_pruning_ratio=cumulative[-1] if num_heads else 0.0,
    )


def _graph_error(model: nn.Module, example: Nested, exc: Exception) -> BadInput:
    """Torch-Pruning could not build its dependency graph: name the module that regroups channels (a
    channel shuffle, which it cannot map indices through) when there is one."""
    reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    where = _channel_regrouping_module(model, example)
    if where is not None:
        return UnsupportedLayer(
            where[0], where[1],
            "granularity channels: Torch-Pruning cannot follow channel indices through its channel shuffle "
            f"(a view of the channel axis into groups) [{reason}]; prune it unstructured, or ignore its layers",
        )
    return BadInput(f"granularity channels: Torch-Pruning could not build the model's dependency graph ({reason})")


def _channel_regrouping_module(model: nn.Module, example: Nested) -> tuple[str, str] | None:
    """(path, type) of the innermost module whose forward views a feature map's channel axis into
    groups, [B, C, H, W] -> [B, g, C/g, H, W] (ShuffleNet's channel_shuffle)."""
    from torch.overrides import TorchFunctionMode

    stack: list[tuple[str, str]] = []
    found: list[tuple[str, str]] = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            name = getattr(func, "__name__", "")
            if not found and stack and name in ("view", "reshape") and isinstance(args[0], torch.Tensor):
                src = args[0]
                if src.dim() == 4 and isinstance(out, torch.Tensor) and out.dim() == 5 and out.shape[-2:] == src.shape[-2:]:
                    found.append(stack[-1])
            return out

    names = {m: n for n, m in model.named_modules()}

    def enter(module: nn.Module, _args: Any) -> None:
        stack.append((names[module], type(module).__name__))

    def leave(_module: nn.Module, _args: Any, _out: Any) -> None:  # None: the output stays as it is
        stack.pop()

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        with torch.no_grad(), Watch():
            call_model(model, example)
    except Exception:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def _output_layers(model: nn.Module, example: Nested) -> list[nn.Module]:
    """The final prediction layers of every output (sparsity.output_layer_names): their output channels
    are the model's (SqueezeNet's classifier conv, a detector's per-level box and class convs)."""
    return [model.get_submodule(name) for name in output_layer_names(model, example)]


def _normalized_residual_layers(model: nn.Module, example: Nested, ignored: list[nn.Module]) -> list[nn.Module]:
    """Layers writing channels that a LayerNorm normalises (the residual stream of transformers and
    ConvNeXt): kept at full width, so pruning there takes MLP hidden channels and attention heads.

    Removing such a channel would couple every block, the position and class embeddings (bare
    parameters) and size attributes the models' own code reshapes with (ViT's hidden_dim).
    """
    import torch_pruning as tp

    if not any(isinstance(m, nn.LayerNorm) for m in model.modules()):
        return []
    graph = tp.DependencyGraph().build_dependency(model, example, forward_fn=_forward)
    keep: list[nn.Module] = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=list(PRUNABLE_TYPES)):
        if any(isinstance(dep.target.module, nn.LayerNorm) for dep, _ in group):
            keep += [
                dep.target.module
                for dep, _ in group
                if isinstance(dep.target.module, PRUNABLE_TYPES) and graph.is_out_channel_pruning_fn(dep.handler)
            ]
    return keep


def _shuffled_layers(model: nn.Module, example: Nested, ignored: list[nn.Module]) -> list[nn.Module]:
    """Layers writing channels that reach a concatenation or a split: in a model with a channel shuffle
    (ShuffleNet: concat, shuffle, split in every block) these are the channels the shuffle permutes, kept
    at full width, as is every layer whose group Torch-Pruning cannot map (its split indices fail on the
    shuffled stream); pruning takes the channels inside the branches (1x1 conv -> depthwise -> 1x1 conv)."""
    import torch_pruning as tp

    regrouping = (tp.ops.OPTYPE.CONCAT, tp.ops.OPTYPE.SPLIT)
    graph = tp.DependencyGraph().build_dependency(model, example, forward_fn=_forward)
    keep: list[nn.Module] = []
    for module in [m for m in graph.module2node if isinstance(m, PRUNABLE_TYPES) and m not in ignored]:
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        try:
            group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(pruner.get_out_channels(module))))
        except (IndexError, ValueError, ZeroDivisionError):
            keep.append(module)
            continue
        if any(dep.target.type in regrouping for dep, _ in group):
            keep.append(module)
    return keep


@contextlib.contextmanager
def _shuffle_as_identity(model: nn.Module, regrouping: tuple[str, str] | None) -> Iterator[None]:
    """While Torch-Pruning traces the model: the channel shuffle of the regrouping module's code (a
    module-level `channel_shuffle(x, groups)`, as torchvision's ShuffleNetV2 has) returns its input.

    Torch-Pruning cannot map channel indices through the shuffle's view into groups (its graph fails to
    build), and a shuffle keeps the number of channels: with it out of the trace, every layer whose
    channels reach a concat or split (the shuffled ones) is kept (_shuffled_layers), so no pruned group
    crosses the shuffle and the real shuffle stays correct on the pruned model.
    """
    if regrouping is None:
        yield
        return
    kind = type(model.get_submodule(regrouping[0]))
    code = sys.modules.get(kind.__module__)
    original = getattr(code, "channel_shuffle", None)
    if code is None or not callable(original):
        yield
        return
    code.channel_shuffle = lambda x, groups: x  # type: ignore[attr-defined]
    try:
        yield
    finally:
        code.channel_shuffle = original  # type: ignore[attr-defined]


def channel_counts(model: nn.Module) -> dict[str, int]:
    """Output channels (or features) of every conv/linear layer, to report what shrank."""
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            counts[name] = module.out_channels
        elif isinstance(module, nn.Linear):
            counts[name] = module.out_features
        elif isinstance(module, transposed_linear_types()):
            counts[name] = module.nf
    return counts


def head_counts(model: nn.Module) -> dict[str, int]:
    """Heads of every attention module whose heads channel pruning removes (compress's explicit attention,
    a transformers model's), to report what shrank."""
    counts = {path: m.num_heads for path, m in attention_modules(model).items()}
    for path, module in model.named_modules():
        if (count := head_count_attribute(module)) is not None:
            counts[path] = getattr(module, count)
    return counts


def remap_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Masks of weights whose shape channel pruning changed, rebuilt from the weights' zeros.

    Masked weights are exactly zero, so after Torch-Pruning slices a weight its zeros are the sliced
    mask (an unmasked weight that happens to be exactly 0.0 would become masked: harmless, it is 0).
    """
    params = dict(model.named_parameters())
    remapped = {}
    for key, mask in masks.items():
        weight = params[key]
        remapped[key] = mask if mask.shape == weight.shape else (weight.detach() != 0)
    return remapped
