"""Metrics over a whole split's outputs: fractions or scores, higher is better.

Two kinds. Task metrics read the data's targets: `top1`, `top5` and `miou` need class indices (one per
sample, or per pixel for segmentation), a `python:module:callable(outputs, targets) -> float` gets the
outputs and targets as the model and data give them. Fidelity metrics need no labels: `agreement`,
`cosine`, `sqnr` and `mse` compare a model's outputs with the uncompressed model's on the same samples
(the runner computes those once per split and caches them), so a run without any labelled data can
still gate on them.

Class scores sit on axis 1 of a 2-D [N, C] or 4-D [N, C, H, W] output (torch's convention, that of
cross-entropy) and on the last axis of a 3-D [N, L, C] output (tokens, anchors). Outputs with several
tensors (a detector's boxes and scores, a dict of heads) are compared tensor by tensor and averaged;
the class metrics need one tensor (`model.output` picks it).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from compress.batches import Nested, leaves
from compress.errors import BadInput
from compress.models.pyref import first_line, import_callable

# identical outputs would have infinite SQNR; capped where float32 round-off ends anyway
SQNR_CAP_DB = 120.0
TASK_METRICS = ("top1", "top5", "miou")
FIDELITY_METRICS = ("agreement", "cosine", "sqnr", "mse")
BUILTIN_METRICS = TASK_METRICS + FIDELITY_METRICS


@dataclass(frozen=True)
class Metric:
    """A metric the runner can score with: `compute(outputs, other)` where other is the targets, or the
    uncompressed model's outputs when `against_reference`."""

    name: str
    compute: Callable[[Nested, Any], float]
    against_reference: bool = False
    reads_class_scores: bool = False  # class metrics: distillation and sensitivity default to KL
    unit: str = "fraction"  # "fraction" (printed as %), "dB" or "score"

    def __call__(self, outputs: Nested, targets: Any, reference: Nested = None) -> float:
        other = reference if self.against_reference else targets
        if other is None:
            needed = "the uncompressed model's outputs" if self.against_reference else "targets"
            raise BadInput(
                f"metric: {self.name} needs {needed}, and the data has none "
                "(unlabelled data: use agreement, cosine, sqnr or mse)"
            )
        return float(self.compute(outputs, other))


def resolve_metric(spec: str) -> Metric:
    """A builtin name or `python:module:callable`. A user's metric that raises or returns something
    other than a number stops the run with one line naming it (exit 2), never a traceback."""
    builtin = _BUILTINS.get(spec)
    if builtin is not None:
        return builtin
    if not spec.startswith("python:"):
        raise BadInput(f"metric: unknown metric {spec!r} (known: {', '.join(BUILTIN_METRICS)}, python:module:callable)")
    fn = import_callable(spec, "metric")

    def checked(outputs: Nested, targets: Any) -> float:
        try:
            value = fn(outputs, targets)
        except BadInput:
            raise
        except Exception as exc:  # the user's code: report it, do not crash
            raise BadInput(f"metric: {spec} failed: {type(exc).__name__}: {first_line(exc)}") from None
        try:
            return float(value)
        except (TypeError, ValueError):
            raise BadInput(f"metric: {spec} returned {type(value).__name__}, expected a number") from None

    return Metric(spec, checked, unit="score")


# --- class metrics --------------------------------------------------------------------------------------


def class_axis(scores: Tensor) -> int:
    return -1 if scores.dim() == 3 else 1


def one_tensor(outputs: Nested, metric: str) -> Tensor:
    if isinstance(outputs, Tensor):
        return outputs
    found = leaves(outputs)
    if len(found) == 1:
        return found[0][1]
    names = ", ".join(name for name, _ in found)
    raise BadInput(f"metric: {metric} reads one tensor of class scores; the model gives {names} (set model.output)")


def _class_view(outputs: Nested, targets: Any, metric: str) -> tuple[Tensor, Tensor, Tensor]:
    """(scores [M, C], targets [M], valid [M]) with every position (sample, pixel, token) a row."""
    scores = one_tensor(outputs, metric)
    if scores.dim() < 2:
        raise BadInput(f"metric: {metric} needs class scores [N, C, ...], the model gives shape {list(scores.shape)}")
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.dtype == torch.bool:
        got = type(targets).__name__ if not isinstance(targets, Tensor) else f"{targets.dtype}"
        raise BadInput(f"metric: {metric} needs integer class targets, the data gives {got}")
    axis = class_axis(scores)
    moved = scores.movedim(axis, -1)
    if tuple(moved.shape[:-1]) != tuple(targets.shape):
        raise BadInput(
            f"metric: {metric}: targets of shape {list(targets.shape)} do not match class scores of shape "
            f"{list(scores.shape)} (one class index per sample, or per pixel)"
        )
    classes = moved.shape[-1]
    flat_targets = targets.reshape(-1).long()
    # outside [0, C): 'ignore' labels such as VOC's 255 border
    valid = (flat_targets >= 0) & (flat_targets < classes)
    return moved.reshape(-1, classes), flat_targets, valid


def top1(outputs: Nested, targets: Any) -> float:
    scores, labels, valid = _class_view(outputs, targets, "top1")
    hits = (scores.argmax(dim=1) == labels) & valid
    return float(hits.sum()) / max(1, int(valid.sum()))


def top5(outputs: Nested, targets: Any) -> float:
    scores, labels, valid = _class_view(outputs, targets, "top5")
    k = min(5, scores.shape[1])
    hits = (scores.topk(k, dim=1).indices == labels[:, None]).any(dim=1) & valid
    return float(hits.sum()) / max(1, int(valid.sum()))


def miou(outputs: Nested, targets: Any) -> float:
    """Mean intersection over union across the classes present in targets or predictions."""
    scores, labels, valid = _class_view(outputs, targets, "miou")
    classes = scores.shape[1]
    predicted = scores.argmax(dim=1)[valid]
    truth = labels[valid]
    confusion = torch.bincount(truth * classes + predicted, minlength=classes * classes).reshape(classes, classes)
    intersection = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - intersection
    present = union > 0
    return float((intersection[present] / union[present]).mean()) if present.any() else 0.0


# --- fidelity metrics (against the uncompressed model) ----------------------------------------------------


def _pairs(outputs: Nested, reference: Nested, metric: str) -> list[tuple[str, Tensor, Tensor]]:
    got = dict(leaves(outputs))
    want = dict(leaves(reference))
    if list(got) != list(want) or any(got[k].shape != want[k].shape for k in want):
        shapes = lambda d: ", ".join(f"{k or 'output'} {list(v.shape)}" for k, v in d.items())  # noqa: E731
        raise BadInput(f"metric: {metric}: outputs ({shapes(got)}) do not match the reference's ({shapes(want)})")
    return [(k, got[k].double(), want[k].double()) for k in want]


def agreement(outputs: Nested, reference: Nested) -> float:
    """Share of positions (samples, pixels, anchors) whose arg-max class equals the reference's."""
    scores = one_tensor(outputs, "agreement")
    ref = one_tensor(reference, "agreement")
    if scores.shape != ref.shape or scores.dim() < 2:
        raise BadInput(f"metric: agreement needs class scores shaped like the reference's, got {list(scores.shape)}")
    axis = class_axis(scores)
    return float((scores.argmax(dim=axis) == ref.argmax(dim=axis)).double().mean())


def cosine(outputs: Nested, reference: Nested) -> float:
    """Mean over samples of the cosine similarity between flattened outputs, averaged over output tensors."""
    values = []
    for _, got, want in _pairs(outputs, reference, "cosine"):
        a, b = got.reshape(len(got), -1), want.reshape(len(want), -1)
        # in float64 without torch's eps of 1e-8 on the norms: outputs of small magnitude are compared too
        norms = (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
        values.append(((a * b).sum(dim=1) / norms).mean())
    return float(torch.stack(values).mean())


def sqnr(outputs: Nested, reference: Nested) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum ref^2 / sum (out - ref)^2), averaged over
    output tensors; capped at SQNR_CAP_DB (identical outputs)."""
    values = []
    for _, got, want in _pairs(outputs, reference, "sqnr"):
        signal, noise = float(want.pow(2).sum()), float((got - want).pow(2).sum())
        if not math.isfinite(noise):
            values.append(-SQNR_CAP_DB)
        elif noise <= signal * 10 ** (-SQNR_CAP_DB / 10):
            values.append(SQNR_CAP_DB)
        else:
            values.append(10 * math.log10(max(signal, 1e-300) / noise))
    return float(sum(values) / len(values))


def neg_mse(outputs: Nested, reference: Nested) -> float:
    """Minus the mean squared difference (higher is better, like scikit-learn's neg_mean_squared_error)."""
    values = [float((got - want).pow(2).mean()) for _, got, want in _pairs(outputs, reference, "mse")]
    return -sum(values) / len(values)


def divergence(outputs: Nested, reference: Nested, class_scores: bool) -> float:
    """How far outputs moved from the reference, for sensitivity ranking: KL over class scores, else the
    noise-to-signal ratio."""
    if class_scores and isinstance(outputs, Tensor) and outputs.dim() >= 2:
        axis = class_axis(outputs)
        log_p = F.log_softmax(reference.double(), axis)
        log_q = F.log_softmax(outputs.double(), axis)
        return float((log_p.exp() * (log_p - log_q)).sum(axis).mean())
    pairs = _pairs(outputs, reference, "divergence")
    return sum(float((g - w).pow(2).sum() / w.pow(2).sum().clamp_min(1e-300)) for _, g, w in pairs) / len(pairs)


_BUILTINS: dict[str, Metric] = {
    "top1": Metric("top1", top1, reads_class_scores=True),
    "top5": Metric("top5", top5, reads_class_scores=True),
    "miou": Metric("miou", miou, reads_class_scores=True),
    "agreement": Metric("agreement", agreement, against_reference=True, reads_class_scores=True),
    "cosine": Metric("cosine", cosine, against_reference=True, unit="score"),
    "sqnr": Metric("sqnr", sqnr, against_reference=True, unit="dB"),
    "mse": Metric("mse", neg_mse, against_reference=True, unit="score"),
}
