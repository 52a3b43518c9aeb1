"""Metrics over a whole split's logits: fractions, higher is better."""
from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from compress.errors import BadInput

MetricFn = Callable[[torch.Tensor, torch.Tensor], float]


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean().item())


def resolve_metric(spec: str) -> MetricFn:
    """`top1`, or `python:module:callable` taking (logits, labels) and returning a float."""
    if spec == "top1":
        return top1
    reference = spec.removeprefix("python:")
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise BadInput(f"metric: expected python:module:callable, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure is the user's module, not ours
        raise BadInput(f"metric: cannot import module {module_name!r} ({type(exc).__name__}: {exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise BadInput(f"metric: module {module_name!r} has no callable {attr!r}")
    return fn
