"""Training losses for any task, and distillation losses that match teacher outputs of any shape.

`loss: auto | ce | mse | python:module:callable(outputs, targets) -> scalar tensor`: auto is
cross-entropy for integer class targets, mean squared error for float targets, and no task loss at all
when the data has no targets (training then runs on the distillation loss alone, and says so).
`kd_loss: auto | kl | mse | cosine`: auto is KL for class scores (the metric reads classes), cosine
for a cosine metric, mse otherwise. Outputs are what `model.output` selects (compress/batches.py).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.batches import Nested, leaves, selected
from compress.errors import BadInput
from compress.metrics import Metric, class_axis
from compress.models.pyref import first_line, import_callable

LOSSES = ("auto", "ce", "mse")
KD_LOSSES = ("auto", "kl", "mse", "cosine")
LossFn = Callable[[Nested, Any], Tensor]
KdFn = Callable[[Nested, Nested, float], Tensor]


def cross_entropy(outputs: Nested, targets: Any) -> Tensor:
    """Cross-entropy over the class axis (metrics.class_axis); targets outside [0, C) are ignored."""
    scores = _one(outputs, "ce")
    if not isinstance(targets, Tensor) or targets.is_floating_point():
        raise BadInput("loss: ce needs integer class targets; use loss: mse for float targets")
    if scores.dim() == 3:
        scores = scores.movedim(-1, 1)
    classes = scores.shape[1]
    targets = targets.long()
    if tuple(targets.shape) != (scores.shape[0], *scores.shape[2:]):
        raise BadInput(f"loss: ce: targets of shape {list(targets.shape)} do not fit scores of shape {list(scores.shape)}")
    if int(targets.max()) >= classes and bool((targets[(targets >= classes)] != 255).any()):
        raise BadInput(
            f"loss: ce: targets reach {int(targets.max())} but the model gives {classes} class scores "
            "(a class index must be below that; set model.kwargs.num_classes?)"
        )
    ignored = torch.where((targets < 0) | (targets >= classes), torch.full_like(targets, -100), targets)
    return F.cross_entropy(scores, ignored, ignore_index=-100)


def mse(outputs: Nested, targets: Any) -> Tensor:
    got = dict(leaves(outputs))
    want = dict(leaves(targets))
    if list(got) != list(want) or any(got[k].shape != want[k].shape for k in want):
        raise BadInput(
            "loss: mse needs targets shaped like the outputs, got "
            f"{[list(t.shape) for t in want.values()]} for outputs {[list(t.shape) for t in got.values()]}"
        )
    return torch.stack([F.mse_loss(got[k], want[k].to(got[k].dtype)) for k in want]).mean()


def kl(student: Nested, teacher: Nested, temperature: float) -> Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) over the class axis, mean over positions, times T^2."""
    terms = []
    for (_, s), (_, t) in _paired(student, teacher, "kl"):
        axis = class_axis(s)
        log_s = F.log_softmax(s / temperature, dim=axis)
        log_t = F.log_softmax(t.float() / temperature, dim=axis)
        positions = s.numel() // s.shape[axis]
        terms.append((log_t.exp() * (log_t - log_s)).sum() / positions * temperature**2)
    return torch.stack(terms).mean()


def kd_mse(student: Nested, teacher: Nested, temperature: float) -> Tensor:
    return torch.stack([F.mse_loss(s, t.float()) for (_, s), (_, t) in _paired(student, teacher, "mse")]).mean()


def kd_cosine(student: Nested, teacher: Nested, temperature: float) -> Tensor:
    terms = [
        1 - F.cosine_similarity(s.reshape(len(s), -1), t.float().reshape(len(t), -1), dim=1).mean()
        for (_, s), (_, t) in _paired(student, teacher, "cosine")
    ]
    return torch.stack(terms).mean()


def resolve_loss(spec: str, targets_example: Any) -> LossFn | None:
    """The task loss for `spec`; None when auto finds no targets (distillation alone)."""
    if spec == "auto":
        if targets_example is None:
            return None
        is_float = any(t.is_floating_point() for _, t in leaves(targets_example))
        return mse if is_float else cross_entropy
    if spec == "ce":
        return cross_entropy
    if spec == "mse":
        return mse
    if not spec.startswith("python:"):
        raise BadInput(f"loss: unknown loss {spec!r} (known: {', '.join(LOSSES)}, python:module:callable)")
    fn = import_callable(spec, "loss")

    def checked(outputs: Nested, targets: Any) -> Tensor:
        try:
            value = fn(outputs, targets)
        except BadInput:
            raise
        except Exception as exc:  # the user's code: one line naming it
            raise BadInput(f"loss: {spec} failed: {type(exc).__name__}: {first_line(exc)}") from None
        if not (isinstance(value, Tensor) and value.dim() == 0 and value.is_floating_point()):
            got = f"a tensor of shape {list(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            raise BadInput(f"loss: {spec} returned {got}, expected a scalar float tensor")
        return value

    return checked


def resolve_kd_loss(spec: str, metric: Metric) -> KdFn:
    if spec == "auto":
        spec = "kl" if metric.reads_class_scores else "cosine" if metric.name == "cosine" else "mse"
    known: dict[str, KdFn] = {"kl": kl, "mse": kd_mse, "cosine": kd_cosine}
    if spec not in known:
        raise BadInput(f"kd_loss: unknown distillation loss {spec!r} (known: {', '.join(KD_LOSSES)})")
    return known[spec]


@dataclass(frozen=True)
class Objective:
    """What a training loop minimises: the task loss on targets (None: no task loss) and/or the
    distillation loss against a teacher, both on the outputs `model.output` selects."""

    task: LossFn | None
    distill: KdFn
    output: str | None = None

    def select(self, outputs: Nested) -> Nested:
        return selected(outputs, self.output)

    def task_loss(self, outputs: Nested, targets: Any) -> Tensor | None:
        if self.task is None or targets is None:
            return None
        return self.task(self.select(outputs), targets)

    def distill_loss(self, student_outputs: Nested, teacher_outputs: Nested, temperature: float) -> Tensor:
        return self.distill(self.select(student_outputs), self.select(teacher_outputs), temperature)


def feature_modules(model: nn.Module, patterns: list[str]) -> list[str]:
    """The names of the modules whose outputs feature distillation matches (fnmatch patterns)."""
    names = [name for name, _ in model.named_modules() if name and any(fnmatch(name, p) for p in patterns)]
    if not names:
        raise BadInput(f"features: {patterns} match no module of the student")
    return names


class FeatureDistillation:
    """Feature distillation (FitNets' hints, without a regressor): the mean squared error between what
    modules of the student and the same-named modules of the teacher output on one batch, averaged over
    the modules. Forward hooks record the outputs of the modules whose names match `patterns` (fnmatch,
    as params.targets); a module returning a tuple or a ModelOutput gives its `last_hidden_state` where it
    has one, else its first tensor. `loss()` reads what the last student and teacher forwards recorded.
    A context manager: the hooks go on exit."""

    def __init__(self, student: nn.Module, teacher: nn.Module, patterns: list[str]) -> None:
        self.names = feature_modules(student, patterns)
        in_teacher = dict(teacher.named_modules())
        missing = [name for name in self.names if name not in in_teacher]
        if missing:
            raise BadInput(f"features: the teacher has no module {missing[0]!r} (matched in the student)")
        self.student: dict[str, Tensor] = {}
        self.teacher: dict[str, Tensor] = {}
        self.handles = [student.get_submodule(name).register_forward_hook(self._record(self.student, name)) for name in self.names]
        self.handles += [in_teacher[name].register_forward_hook(self._record(self.teacher, name)) for name in self.names]

    @staticmethod
    def _record(into: dict[str, Tensor], name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            found = dict(leaves(output))
            if not found:
                raise BadInput(f"features: module {name!r} returns no tensor ({type(output).__name__})")
            into[name] = found.get("last_hidden_state", next(iter(found.values())))

        return hook

    def loss(self) -> Tensor:
        """The feature MSE of the last student and teacher forwards (a module that did not run in both
        is one line naming it, as are outputs of different shapes: a channel-pruned module's)."""
        for name in self.names:
            s, t = self.student.get(name), self.teacher.get(name)
            if s is None or t is None:
                raise BadInput(f"features: module {name!r} did not run in the {'student' if s is None else 'teacher'}")
            if s.shape != t.shape:
                raise BadInput(
                    f"features: module {name!r} outputs {list(s.shape)} in the student and {list(t.shape)} in the "
                    "teacher (channel pruning narrows the modules inside blocks; match blocks' outputs)"
                )
        value = kd_mse({n: self.student[n] for n in self.names}, {n: self.teacher[n].detach() for n in self.names}, 1.0)
        self.student.clear()
        self.teacher.clear()
        return value

    def __enter__(self) -> FeatureDistillation:
        return self

    def __exit__(self, *_exc: object) -> None:
        for handle in self.handles:
            handle.remove()


def _one(outputs: Nested, loss: str) -> Tensor:
    found = leaves(outputs)
    if len(found) != 1:
        names = ", ".join(name for name, _ in found)
        raise BadInput(f"loss: {loss} reads one tensor of class scores; the model gives {names} (set model.output)")
    return found[0][1]


def _paired(student: Nested, teacher: Nested, loss: str) -> list[tuple[tuple[str, Tensor], tuple[str, Tensor]]]:
    s, t = leaves(student), leaves(teacher)
    if [n for n, _ in s] != [n for n, _ in t] or any(a.shape != b.shape for (_, a), (_, b) in zip(s, t)):
        raise BadInput(
            f"kd_loss: {loss}: student outputs {[list(x.shape) for _, x in s]} do not match the teacher's "
            f"{[list(x.shape) for _, x in t]}"
        )
    return list(zip(s, t))
