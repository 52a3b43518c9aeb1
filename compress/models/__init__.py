"""Building the model a recipe names: `builtin:NAME`, `torchvision:NAME` or `python:module:callable`.

Nothing here downloads anything: torchvision models are always built with weights=None, and the
recipe's checkpoint is loaded separately by the caller (load_checkpoint).
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any

from torch import nn

from compress.attention import convert_attention
from compress.errors import BadInput
from compress.models.checkpoint import load_checkpoint
from compress.models.pyref import import_callable, require
from compress.models.registry import builtin_names, get_builtin
from compress.recipe import ModelConfig

__all__ = ["build_model", "builtin_names", "check_arch", "get_builtin", "load_checkpoint"]

# Any of these would make torchvision fetch weights from the internet.
DOWNLOAD_KWARGS = ("weights", "pretrained", "weights_backbone", "pretrained_backbone")


def build_model(
    cfg: ModelConfig, *, in_channels: int | None, num_classes: int | None, input_size: int | None
) -> nn.Module:
    """A freshly initialised model; data-derived sizes apply unless cfg.kwargs sets them. They are None
    when the data does not give them (samples that are not (C, H, W) images, targets that are not class
    indices)."""
    source, _, name = cfg.arch.partition(":")
    if source == "builtin":
        model = _build_builtin(name, cfg.kwargs, in_channels, num_classes, input_size)
    elif source == "torchvision":
        model = _build_torchvision(name, cfg.kwargs, in_channels, num_classes)
    elif source == "python":
        model = _call(import_callable(cfg.arch, "model.arch"), cfg.kwargs, cfg.arch)
    else:
        raise BadInput(_bad_source(cfg.arch))
    if not isinstance(model, nn.Module):
        got = type(model).__name__
        raise BadInput(f"model.arch: {cfg.arch} returned a {got}, expected a torch.nn.Module")
    # attention as explicit Linear/MatMul layers (same function, same state-dict keys), so that
    # quantization and head pruning see inside it
    convert_attention(model)
    return model


def check_arch(arch: str) -> None:
    """Cheap check that `arch` refers to something that exists; builds nothing."""
    source, _, name = arch.partition(":")
    if source == "builtin":
        _builtin_fn(name)
    elif source == "torchvision":
        _check_torchvision_name(name)
    elif source == "python":
        import_callable(arch, "model.arch")
    else:
        raise BadInput(_bad_source(arch))


def _bad_source(arch: str) -> str:
    return f"model.arch: expected builtin:NAME, torchvision:NAME or python:module:callable, got {arch!r}"


def _builtin_fn(name: str):
    try:
        return get_builtin(name)
    except KeyError:
        known = ", ".join(builtin_names())
        raise BadInput(f"model.arch: unknown builtin {name!r} (known: {known})") from None


def _build_builtin(
    name: str, kwargs: dict[str, Any], in_channels: int | None, num_classes: int | None, input_size: int | None
) -> nn.Module:
    fn = _builtin_fn(name)
    if in_channels is None or input_size is None:
        raise BadInput(f"model.arch: builtin:{name} takes (C, H, W) images, and the data's samples are not images")
    if num_classes is None and "num_classes" not in kwargs:
        raise BadInput(f"model.arch: builtin:{name} is a classifier and the data has no class targets; set model.kwargs.num_classes")
    sizes = {"in_channels": in_channels, "input_size": input_size}
    if num_classes is not None:
        sizes["num_classes"] = num_classes
    return _call(fn, {**sizes, **kwargs}, f"builtin:{name}")


def _torchvision_models(name: str):
    return require("torchvision.models", "vision", "model.arch", f"torchvision:{name}")


def _check_torchvision_name(name: str) -> None:
    known = _torchvision_models(name).list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see torchvision.models.list_models())"
        raise BadInput(f"model.arch: unknown torchvision model {name!r}{hint}")


def _build_torchvision(
    name: str, kwargs: dict[str, Any], in_channels: int | None, num_classes: int | None
) -> nn.Module:
    _check_torchvision_name(name)
    get_model = _torchvision_models(name).get_model
    refused = [k for k in kwargs if k in DOWNLOAD_KWARGS]
    if refused:
        raise BadInput(
            f"model.kwargs: {refused[0]!r} is not allowed (it downloads weights); "
            "give pretrained weights as model.checkpoint instead"
        )
    full = {**({"num_classes": num_classes} if num_classes is not None else {}), **kwargs}
    # segmentation and detection builders default to an ImageNet backbone, which would download
    builder_params = inspect.signature(_torchvision_models(name).get_model_builder(name)).parameters
    no_download = {k: None for k in ("weights_backbone",) if k in builder_params}
    model = _call(lambda **kw: get_model(name, weights=None, **no_download, **kw), full, f"torchvision:{name}")
    if in_channels is not None:
        _check_input_channels(model, in_channels, f"torchvision:{name}")
    return model


def _check_input_channels(model: nn.Module, in_channels: int, arch: str) -> None:
    # torchvision models take RGB only; catching it here beats a shape error deep inside a pass.
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first.in_channels != in_channels:
        raise BadInput(
            f"model.arch: {arch} expects {first.in_channels}-channel images, the dataset has {in_channels}"
        )


def _call(fn, kwargs: dict[str, Any], arch: str) -> Any:
    try:
        return fn(**kwargs)
    except (TypeError, ValueError) as exc:
        raise BadInput(f"model.kwargs: {arch}: {exc}") from None
