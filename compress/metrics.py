"""Metrics over a whole split's logits: fractions, higher is better."""
from __future__ import annotations

from collections.abc import Callable

import torch

from compress.errors import BadInput
from compress.models.pyref import first_line, import_callable

MetricFn = Callable[[torch.Tensor, torch.Tensor], float]


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean().item())


def resolve_metric(spec: str) -> MetricFn:
    """`top1`, or `python:module:callable` taking (logits, labels) and returning a float.

    A user's metric that raises or returns something other than a number stops the run with one line
    naming it (exit 2), never a traceback.
    """
    if spec == "top1":
        return top1
    fn = import_callable(spec, "metric")

    def checked(logits: torch.Tensor, labels: torch.Tensor) -> float:
        try:
            value = fn(logits, labels)
        except Exception as exc:  # the user's code: report it, do not crash
            raise BadInput(f"metric: {spec} failed: {type(exc).__name__}: {first_line(exc)}") from None
        try:
            return float(value)
        except (TypeError, ValueError):
            raise BadInput(f"metric: {spec} returned {type(value).__name__}, expected a number") from None

    return checked
