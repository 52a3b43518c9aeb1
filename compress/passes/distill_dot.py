"""distill.dot: train the current model (the student) against a teacher, with the DOT optimizer by default.

The stage is how a pruned or otherwise shrunk model recovers accuracy, and how a teacher trains a smaller
student (ALGORITHMS.md section 4). `trainer: kd` (one SGD-momentum optimizer on the summed loss) and
`trainer: ce` (cross-entropy alone, no teacher) run the same loop, data order and schedule, so the
benefit of distillation and of DOT is measured in the same recipe. Pruning masks stay enforced, so the
sparsity a stage came in with is the sparsity it leaves with. Runs data-parallel under torchrun.

Any task: the task loss is `loss` (ce, mse, python:; auto by the targets) and the distillation loss
`kd_loss` (kl, mse, cosine; auto by the metric), both on the outputs `model.output` selects
(compress/losses.py). Without targets there is no task loss: the student learns from the teacher alone,
by SGD with momentum on the distillation loss (DOT's two momenta balance two gradients; with one there is
nothing to balance), and the stage's report says so. `features` adds feature distillation: the MSE between
named modules' outputs in the student and the teacher (a transformer's blocks), on the distillation side.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.utils.data import Dataset

from compress.atomic import atomic_torch_save
from compress.batches import Nested, call_model, leaves, split_item, structure_text, to_device
from compress.distributed import (
    average_buffers,
    epoch_shards,
    is_main,
    reduce_gradients,
    shard_loader,
    world_size,
)
from compress.errors import BadInput
from compress.losses import FeatureDistillation, Objective, cross_entropy, feature_modules, kl
from compress.models import build_model, check_arch, load_checkpoint
from compress.optim import DOT
from compress.passes.prune_magnitude import LossConfig, loss_name
from compress.passes.registry import PassResult, register_pass
from compress.progress import RunProgress
from compress.recipe import SOURCE_PREFIXES, ModelConfig, StrictModel
from compress.sparsity import apply_masks
from compress.state import ModelState, StageContext
from compress.train import make_scheduler, random_shift

OPTIMIZER_FORMAT = "compress.distill.optimizer/1"
TEACHER_CHOICES = ("baseline", "previous")


class DistillDotConfig(LossConfig):
    # defaults: DOT's CIFAR setting (ALGORITHMS.md section 4); ImageNet-like data wants T=1, w_ce=w_kd=0.5
    epochs: int = Field(5, ge=0, le=1000)
    lr: float = Field(0.05, gt=0)
    temperature: float = Field(4.0, gt=0)
    w_ce: float = Field(0.1, ge=0, description="weight of the task loss (`loss`)")
    w_kd: float = Field(0.9, ge=0, description="weight of the distillation loss (`kd_loss`; kl: KL at T, times T^2)")
    momentum: float = Field(0.9, ge=0, lt=1)
    # 0.03, not the paper's 0.075 (CIFAR, 240 epochs): compress distils in short stages, and on MNIST-5k
    # (bench/distill.py, 3 seeds) 0.075 lost to plain kd (ResNet-8 student, 10 epochs: 97.23% vs 97.53%;
    # 95%-sparse recovery, 1 epoch: 91.47% vs 96.30%) while 0.03 gave 97.73% and 95.63%.
    delta: float = Field(0.03, ge=0, lt=1, description="DOT: task momentum mu - delta, distillation mu + delta")
    weight_decay: float = Field(5e-4, ge=0)
    trainer: Literal["dot", "kd", "ce"] = "dot"
    teacher: str = Field("baseline", description="baseline | previous | builtin:NAME | torchvision:NAME | python:module:callable")
    teacher_kwargs: dict[str, Any] = Field(default_factory=dict)
    teacher_checkpoint: str | None = Field(None, description="the teacher's weights; relative paths are next to the recipe")
    schedule: Literal["cosine", "step"] = "cosine"
    step_milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75], description="fractions of training")
    step_gamma: float = Field(0.1, gt=0, le=1)
    shift: int = Field(0, ge=0, le=8, description="random +-pixel shifts (augmentation)")
    features: list[str] = Field(
        default_factory=list,
        description="feature distillation: module-name patterns (fnmatch, as prune's targets: * crosses dots, "
        "so name blocks, e.g. encoder.layer.? or vit.layers.1); the mean squared error between each matched "
        "module's output in the student and in the teacher's module of the same name (a tuple or ModelOutput: "
        "its last_hidden_state, else its first tensor), averaged over the modules, times w_features, is added "
        "to the distillation loss. Needs no targets. Outputs must have equal shapes (channel pruning narrows "
        "the modules inside blocks)",
    )
    w_features: float = Field(1.0, ge=0, description="weight of the feature MSE (features)")

    @model_validator(mode="after")
    def _consistent(self) -> DistillDotConfig:
        if self.features and self.trainer == "ce":
            raise ValueError("features: feature distillation needs a teacher (trainer dot or kd, not ce)")
        if self.momentum + self.delta >= 1 or self.momentum - self.delta < 0:
            raise ValueError(
                f"delta: momentum +- delta must lie in [0, 1), got momentum {self.momentum}, delta {self.delta}"
            )
        if any(not 0 < m < 1 for m in self.step_milestones):
            raise ValueError(f"step_milestones: expected fractions of training in (0, 1), got {self.step_milestones}")
        is_source = self.teacher.startswith(SOURCE_PREFIXES)
        if self.teacher not in TEACHER_CHOICES and not is_source:
            raise ValueError(
                "teacher: expected baseline, previous, builtin:NAME, torchvision:NAME or "
                f"python:module:callable, got {self.teacher!r}"
            )
        if not is_source and (self.teacher_checkpoint or self.teacher_kwargs):
            field_name = "teacher_checkpoint" if self.teacher_checkpoint else "teacher_kwargs"
            raise ValueError(f"{field_name}: only applies when teacher is a model source, not {self.teacher!r}")
        if self.teacher.startswith(("builtin:", "torchvision:")) and not self.teacher_checkpoint:
            # these are built with random weights; an untrained teacher would only teach noise
            raise ValueError(f"teacher_checkpoint: required with teacher {self.teacher!r} (its trained weights)")
        return self


@dataclass
class DistillRun:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epoch_seconds: list[float] = field(default_factory=list)
    last_loss: float = math.nan


def _gradients(
    student: nn.Module,
    teacher: nn.Module | None,
    x: Nested,
    y: Any,
    params: list[Tensor],
    cfg: DistillDotConfig,
    objective: Objective,
    trainer: str,
    features: FeatureDistillation | None = None,
) -> tuple[list[list[Tensor | None]], float]:
    """The trainer's gradient sets from one forward of the student: [task, kd] for dot, one set otherwise.
    Without a task loss (no targets) `trainer` is kd and its one set is the weighted distillation loss's.
    `features` (hooked on both models) adds w_features times its feature MSE to the distillation loss."""
    outputs = call_model(student, x)
    task = objective.task_loss(outputs, y)
    if trainer == "ce":
        assert task is not None
        return [list(torch.autograd.grad(task, params, allow_unused=True))], task.item()
    assert teacher is not None
    with torch.no_grad():
        teacher_outputs = call_model(teacher, x)
    distill = cfg.w_kd * objective.distill_loss(outputs, teacher_outputs, cfg.temperature)
    if features is not None:
        distill = distill + cfg.w_features * features.loss()
    if task is None:
        return [list(torch.autograd.grad(distill, params, allow_unused=True))], distill.item()
    task = cfg.w_ce * task
    if trainer == "kd":
        total = task + distill
        return [list(torch.autograd.grad(total, params, allow_unused=True))], total.item()
    # two gradients of one graph: the second backward reuses the forward's saved activations
    g_task = torch.autograd.grad(task, params, retain_graph=True, allow_unused=True)
    g_kd = torch.autograd.grad(distill, params, allow_unused=True)
    return [list(g_task), list(g_kd)], task.item() + distill.item()


def task_free(objective: Objective, dataset: Dataset) -> bool:
    """No task loss to train on: the objective has none (loss auto on unlabelled data), or the data no targets."""
    return objective.task is None or split_item(dataset[0])[1] is None


def _scheduler(
    optimizer: torch.optim.Optimizer, cfg: DistillDotConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "cosine":
        return make_scheduler(optimizer, "cosine", cfg.lr, total_steps)
    milestones = [m * total_steps for m in cfg.step_milestones]
    # LambdaLR, not MultiStepLR: its state_dict holds no Counter, so it loads with weights_only=True
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cfg.step_gamma ** sum(step >= m for m in milestones)
    )


def distill(
    student: nn.Module,
    teacher: nn.Module | None,
    dataset: Dataset,
    cfg: DistillDotConfig,
    *,
    batch_size: int,
    seed: int,
    device: torch.device = torch.device("cpu"),
    masks: dict[str, Tensor] | None = None,
    progress: RunProgress | None = None,
    description: str = "distill",
    objective: Objective | None = None,
) -> DistillRun:
    """Train `student` in place; masked weights stay exactly zero. Data-parallel under torchrun: each
    gradient set is reduced on its own, so the update equals one process's on the global batch.

    `objective` (default: cross-entropy and KL) gives the task and distillation losses. Where it has no
    task loss or the data no targets, dot and kd train on the distillation loss alone with SGD with
    momentum (`task_free`); ce has nothing to train on and is refused. `cfg.features` adds feature
    distillation (losses.FeatureDistillation) to the distillation loss."""
    objective = objective or Objective(cross_entropy, kl)
    trainer = cfg.trainer
    if task_free(objective, dataset):
        if trainer == "ce":
            raise BadInput(
                f"{description}: params.trainer: ce trains on the task loss alone, and the data has no targets "
                "(use trainer dot or kd: distillation alone)"
            )
        trainer = "kd"
    masks = masks or {}
    named = [(name, p) for name, p in student.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    keep = [masks.get(name) for name, _ in named]
    if trainer == "dot":
        optimizer: torch.optim.Optimizer = DOT(
            params, lr=cfg.lr, momentum=cfg.momentum, delta=cfg.delta, weight_decay=cfg.weight_decay
        )
    else:
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(epoch_shards(len(dataset), batch_size, seed))
    scheduler = _scheduler(optimizer, cfg, max(1, cfg.epochs * steps_per_epoch))
    run = DistillRun(optimizer, scheduler)
    generator = torch.Generator().manual_seed(seed)
    progress = progress or RunProgress(quiet=True)
    features = FeatureDistillation(student, teacher, cfg.features) if cfg.features and teacher is not None else None
    with progress.task(description, cfg.epochs * steps_per_epoch) as advance, features or contextlib.nullcontext():
        for epoch in range(cfg.epochs):
            started = time.perf_counter()
            student.train()
            shards = epoch_shards(len(dataset), batch_size, seed * 1009 + epoch)
            running = 0.0
            for step, (shard, (x, y)) in enumerate(zip(shards, shard_loader(dataset, shards)), start=1):
                x = to_device(random_shift(x, cfg.shift, generator, of=shard.batch_size, start=shard.start), device)
                grad_sets, loss = _gradients(
                    student, teacher, x, to_device(y, device), params, cfg, objective, trainer, features
                )
                for grads in grad_sets:
                    reduce_gradients(grads, shard.share)
                    for grad, mask in zip(grads, keep):
                        if grad is not None and mask is not None:
                            grad.mul_(mask.to(grad.dtype))
                if trainer == "dot":
                    optimizer.step(*grad_sets)
                else:
                    for p, grad in zip(params, grad_sets[0]):
                        p.grad = grad
                    optimizer.step()
                apply_masks(student, masks)
                scheduler.step()
                running += loss
                advance(1, f"epoch {epoch + 1}/{cfg.epochs} loss {running / step:.4f}")
            average_buffers(student)
            run.epoch_seconds.append(time.perf_counter() - started)
            run.last_loss = running / max(1, len(shards))
    student.eval()
    return run


def _teacher_path(cfg: DistillDotConfig, recipe_dir: Path | None) -> Path | None:
    if not cfg.teacher_checkpoint:
        return None
    path = Path(cfg.teacher_checkpoint)
    return recipe_dir / path if recipe_dir is not None and not path.is_absolute() else path


def _teacher_error(exc: BadInput, where: str) -> BadInput:
    # compress.models names the recipe's model fields; here they are the teacher's
    text = str(exc).replace("model.arch", "teacher").replace("model.kwargs", "teacher_kwargs")
    return BadInput(f"{where}.{text}")


def check_teacher(cfg: DistillDotConfig, recipe_dir: Path | None, where: str) -> None:
    """Before a run writes anything: the teacher's source exists and its checkpoint file is there."""
    if cfg.trainer == "ce" or not cfg.teacher.startswith(SOURCE_PREFIXES):
        return
    try:
        check_arch(cfg.teacher)
    except BadInput as exc:
        raise _teacher_error(exc, where) from None
    path = _teacher_path(cfg, recipe_dir)
    if path is not None and not path.is_file():
        raise BadInput(f"{where}.teacher_checkpoint: file not found: {path}")


def _source_teacher(cfg: DistillDotConfig, ctx: StageContext) -> nn.Module:
    channels, height, _ = ctx.data.input_shape or (None, None, None)
    where = f"stage {ctx.stage_name!r}: params"
    check_teacher(cfg, ctx.recipe_dir, where)
    try:
        teacher = build_model(
            ModelConfig(arch=cfg.teacher, kwargs=cfg.teacher_kwargs),
            in_channels=channels,
            num_classes=ctx.data.num_classes,
            input_size=height,
        )
    except BadInput as exc:
        raise _teacher_error(exc, where) from None
    path = _teacher_path(cfg, ctx.recipe_dir)
    if path is not None:
        try:
            teacher = load_checkpoint(teacher, path, arch=cfg.teacher)
        except BadInput as exc:
            raise BadInput(f"{where}.teacher_checkpoint: {exc}") from None
    return teacher


def resolve_teacher(cfg: DistillDotConfig, state: ModelState, ctx: StageContext) -> nn.Module:
    """A private, frozen copy: the baseline must stay as it was, and `previous` must not follow the student.
    Its outputs must have the student's structure: the same tensors (by name) of the same shapes."""
    if cfg.teacher == "baseline":
        if ctx.baseline is None:
            raise BadInput(f"stage {ctx.stage_name!r}: params.teacher: no baseline model in this context")
        teacher = copy.deepcopy(ctx.baseline.model)
    elif cfg.teacher == "previous":
        teacher = copy.deepcopy(state.model)
    else:
        teacher = _source_teacher(cfg, ctx)
    teacher = teacher.to(ctx.device).eval().requires_grad_(False)
    example = ctx.example()
    try:
        with torch.no_grad():
            got = call_model(teacher, example)
    except Exception as exc:
        raise BadInput(f"stage {ctx.stage_name!r}: params.teacher: {cfg.teacher} cannot take the data's input ({type(exc).__name__}: {exc})") from None
    was_training = state.model.training
    with torch.no_grad():
        want = call_model(state.model.eval(), example)
    state.model.train(was_training)
    shapes = lambda outputs: [(name, tuple(t.shape)) for name, t in leaves(outputs)]  # noqa: E731
    if shapes(got) != shapes(want):
        raise BadInput(
            f"stage {ctx.stage_name!r}: params.teacher: {cfg.teacher} gives outputs {structure_text(got)}, "
            f"the student {structure_text(want)}"
        )
    return teacher


@register_pass("distill.dot", DistillDotConfig, check=check_teacher)
def distill_dot(state: ModelState, cfg: DistillDotConfig, ctx: StageContext) -> PassResult:
    objective = ctx.objective(cfg.loss, cfg.kd_loss)
    labelled = split_item(ctx.data.train[0])[1] is not None
    if not labelled and cfg.loss != "auto":
        raise BadInput(
            f"stage {ctx.stage_name!r}: params.loss: {cfg.loss} needs targets, and the data has none "
            "(leave loss auto to distil on the distillation loss alone)"
        )
    teacher = None if cfg.trainer == "ce" else resolve_teacher(cfg, state, ctx)
    metric_before = ctx.evaluate(state.model)
    info: dict[str, Any] = {
        "trainer": cfg.trainer,
        "teacher": None if teacher is None else cfg.teacher,
        "teacher_metric": None if teacher is None else ctx.evaluate(teacher),
        "metric_before_distill": metric_before,
        "world_size": world_size(),
    }
    if task_free(objective, ctx.data.train):
        info["task_loss"] = "none (unlabelled data): distillation loss alone"
        info["update"] = (
            f"SGD with momentum {cfg.momentum} on the distillation gradient"
            + (" (DOT's two momenta need a task loss)" if cfg.trainer == "dot" else "")
        )
    else:
        info["task_loss"] = cfg.loss if cfg.loss != "auto" else loss_name(objective.task)
    if teacher is not None:
        info["kd_loss"] = loss_name(objective.distill)
    if cfg.features:
        info["features"] = feature_modules(state.model, cfg.features)
    run = distill(
        state.model,
        teacher,
        ctx.data.train,
        cfg,
        batch_size=ctx.batch_size,
        seed=ctx.seed,
        device=ctx.device,
        masks=state.masks,
        progress=ctx.progress,
        description=f"{ctx.stage_name}: distill ({cfg.trainer})",
        objective=objective,
    )
    info["seconds_per_epoch"] = sum(run.epoch_seconds) / len(run.epoch_seconds) if run.epoch_seconds else 0.0
    info["final_loss"] = run.last_loss
    if ctx.stage_dir is not None:
        # optimizer and schedule state beside the stage checkpoint: what a continued stage starts from
        path = ctx.stage_dir / "optimizer.pt"
        if is_main():
            atomic_torch_save(
                {
                    "format": OPTIMIZER_FORMAT,
                    "trainer": cfg.trainer,
                    "epochs_done": cfg.epochs,
                    "optimizer": run.optimizer.state_dict(),
                    "scheduler": run.scheduler.state_dict(),
                },
                path,
            )
        info["optimizer_state"] = str(Path("stages") / ctx.stage_dir.name / path.name)
    return PassResult(state, info)

