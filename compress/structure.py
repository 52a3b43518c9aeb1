"""The shape of a model as plain data, so that a structurally pruned model reloads from a checkpoint.

Channel pruning makes layers physically smaller, so the state_dict no longer fits a model freshly
built from the recipe. Instead of pickling the module (which would need full unpickling to load), a
checkpoint carries each layer's size attributes; `apply_structure` resizes a freshly built model to
them, after which the state_dict loads strictly as usual.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.attention import HEAD_COUNT_ATTRIBUTES, HeadAttention, head_count_attribute
from compress.sparsity import transposed_linear_types

# The attributes channel pruning changes, per layer type (Torch-Pruning rewrites exactly these).
SIZE_ATTRIBUTES: tuple[tuple[type[nn.Module], tuple[str, ...]], ...] = (
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels", "groups")),
    (nn.Linear, ("in_features", "out_features")),
    (nn.modules.batchnorm._NormBase, ("num_features",)),
    (nn.GroupNorm, ("num_groups", "num_channels")),
    (nn.LayerNorm, ("normalized_shape",)),
    (nn.PReLU, ("num_parameters",)),
    (HeadAttention, ("num_heads", "head_dim")),  # head pruning (compress.attention)
)


def structure_record(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{module name: {attribute: int or list of ints}} for every layer with size attributes."""
    record: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        for layer_type, attributes in SIZE_ATTRIBUTES:
            if isinstance(module, layer_type):
                record[name] = {
                    attr: list(value) if isinstance(value, tuple) else value
                    for attr in attributes
                    if (value := getattr(module, attr, None)) is not None
                }
                break
        if isinstance(module, transposed_linear_types()):  # transformers' Conv1D (GPT-2): its forward reads nf
            record[name] = {"nf": int(getattr(module, "nf")), "nx": int(getattr(module, "nx"))}
        if head_count_attribute(module) is not None:  # head pruning (channels.ChannelPruner): BERT's, ViT's, GPT-2's
            record[name] = {attr: value for attr in HEAD_COUNT_ATTRIBUTES if isinstance(value := getattr(module, attr, None), int)}
    return record


def apply_structure(model: nn.Module, record: dict[str, dict[str, Any]], state_dict: dict[str, torch.Tensor]) -> None:
    """Resize `model` in place to `record` and to the tensor shapes of `state_dict`.

    Only sizes change; the values are placeholders until load_state_dict fills them.
    """
    modules = dict(model.named_modules())
    unknown = sorted(set(record) - set(modules))
    if unknown:
        raise ValueError(f"checkpoint structure names modules this model does not have: {', '.join(unknown[:3])}")
    for name, attributes in record.items():
        module = modules[name]
        for attr, value in attributes.items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    for name, module in modules.items():
        prefix = f"{name}." if name else ""
        for param_name, param in list(module.named_parameters(recurse=False)):
            saved = state_dict.get(prefix + param_name)
            if saved is not None and saved.shape != param.shape:
                replacement = torch.empty(saved.shape, dtype=param.dtype, device=param.device)
                setattr(module, param_name, nn.Parameter(replacement, requires_grad=param.requires_grad))
        for buffer_name, buffer in list(module.named_buffers(recurse=False)):
            saved = state_dict.get(prefix + buffer_name)
            if buffer is not None and saved is not None and saved.shape != buffer.shape:
                module.register_buffer(buffer_name, torch.empty(saved.shape, dtype=buffer.dtype, device=buffer.device))
