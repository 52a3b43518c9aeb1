"""The one training loop (reference training, fine-tuning) and batched prediction."""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from compress.batches import Nested, call_model, concat, detach_float_cpu, is_class_targets, iterate, to_device
from compress.distributed import average_buffers, epoch_shards, reduce_gradients, shard_loader
from compress.errors import BadInput
from compress.losses import Objective, cross_entropy, kl
from compress.faults import pause_point
from compress.progress import RunProgress
from compress.sparsity import apply_masks, mask_gradients

Schedule = Literal["onecycle", "cosine", "constant"]


def random_shift(
    x: torch.Tensor, max_shift: int, generator: torch.Generator, *, of: int | None = None, start: int = 0
) -> torch.Tensor:
    """Shift each image by up to +-max_shift pixels (edge-replicated), the augmentation the references use.

    `x` may be rows start..start+len(x) of a global batch of `of` images (one process's share): the
    shifts are drawn for the whole batch, so every process draws alike and the shares add up to what
    one process would have drawn.
    """
    if max_shift <= 0 or not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        return x
    batch, _, height, width = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    drawn = of or batch
    dy = torch.randint(0, 2 * max_shift + 1, (drawn,), generator=generator)[start : start + batch]
    dx = torch.randint(0, 2 * max_shift + 1, (drawn,), generator=generator)[start : start + batch]
    rows = (dy[:, None] + torch.arange(height))[:, :, None]  # B,H,1
    cols = (dx[:, None] + torch.arange(width))[:, None, :]  # B,1,W
    batch_index = torch.arange(batch)[:, None, None]
    shifted = padded.permute(0, 2, 3, 1)[batch_index, rows, cols].permute(0, 3, 1, 2)
    # not .contiguous(): with one channel that keeps strides like (HW, 1, W, 1), which torch counts as
    # contiguous and this torch's CPU conv backward corrupts the heap on (abort with 1 thread)
    return shifted.clone(memory_format=torch.contiguous_format)


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: Schedule, lr: float, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def fit(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    schedule: Schedule = "cosine",
    shift: int = 0,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    masks: dict[str, torch.Tensor] | None = None,
    progress: RunProgress | None = None,
    description: str = "train",
    on_step: Callable[[int], None] | None = None,
    teacher: nn.Module | None = None,
    distill_weight: float = 0.0,
    temperature: float = 4.0,
    objective: Objective | None = None,
) -> None:
    """SGD with momentum on the objective's task loss (default: cross-entropy on class targets); masked
    weights stay exactly zero throughout.

    With a `teacher`, the loss is (1 - distill_weight) * task loss + distill_weight * the objective's
    distillation loss (default KL) against the teacher's outputs on the same (shifted) inputs; without
    targets (or a task loss) it is the distillation loss alone.

    `on_step(n)` runs after the n-th optimizer step (1-based); it may change `masks` in place (gradual
    pruning), and the next step already holds the new masks.

    Under torchrun every process trains on its share of each global batch of `batch_size`
    (compress.distributed), and the update equals one process's on the whole batch.
    """
    objective = objective or Objective(cross_entropy, kl)
    distilling = teacher is not None and distill_weight > 0
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = len(epoch_shards(len(dataset), batch_size, seed))
    scheduler = make_scheduler(optimizer, schedule, lr, epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    progress = progress or RunProgress(quiet=True)
    model.train()
    done = 0
    with progress.task(description, epochs * steps_per_epoch) as advance:
        for epoch in range(epochs):
            shards = epoch_shards(len(dataset), batch_size, seed * 1009 + epoch)
            running, seen = 0.0, 0
            for shard, (inputs, labels) in zip(shards, shard_loader(dataset, shards)):
                # shifting images moves what per-pixel or box targets describe: classification only
                moved = shift if labels is None or is_class_targets(labels) else 0
                inputs = to_device(random_shift(inputs, moved, generator, of=shard.batch_size, start=shard.start), device)
                labels = to_device(labels, device)
                outputs = call_model(model, inputs)
                loss = objective.task_loss(outputs, labels)
                if distilling:
                    assert teacher is not None
                    with torch.no_grad():
                        teacher_outputs = call_model(teacher, inputs)
                    soft = objective.distill_loss(outputs, teacher_outputs, temperature)
                    loss = soft if loss is None else (1 - distill_weight) * loss + distill_weight * soft
                if loss is None:
                    raise BadInput(
                        f"{description}: nothing to train on: the data has no targets (or the loss none) and "
                        "there is no teacher to distill from"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                reduce_gradients([p.grad for p in model.parameters()], shard.share)
                mask_gradients(model, masks or {})
                optimizer.step()
                apply_masks(model, masks or {})
                scheduler.step()
                done += 1
                if on_step is not None:
                    on_step(done)
                running += loss.item() * len(shard.indices)
                seen += len(shard.indices)
                advance(1, f"epoch {epoch + 1}/{epochs} loss {running / seen:.4f}")
            pause_point(f"{description}:epoch:{epoch + 1}")
            average_buffers(model)
    if stale_batchnorm(model, done):
        recalibrate_batchnorm(model, dataset, batch_size=batch_size, device=device)
    model.eval()


def stale_batchnorm(model: nn.Module, steps: int) -> bool:
    """Whether `steps` training steps left some BatchNorm's running statistics mostly at their start: an
    exponential average with momentum m still holds (1 - m)^steps of it. torchvision's MobileNetV3 and
    detection backbones use m = 0.01, so a short run (a reference trained for a few epochs, a fine-tune)
    would evaluate with statistics that are 40% those of the untrained model after 90 steps."""
    momenta = [m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    return any(m is not None and (1 - m) ** steps > 0.1 for m in momenta)


@torch.no_grad()
def predict(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 256, device: torch.device = torch.device("cpu")
) -> tuple[Nested, Nested]:
    """Outputs (as the model gives them: tensor, tuple, dict) and targets (None when unlabelled) of a
    whole split, on the CPU, in dataset order."""
    was_training = model.training
    model.eval()
    outputs, targets = [], []
    for inputs, batch_targets in iterate(dataset, batch_size):
        outputs.append(detach_float_cpu(call_model(model, to_device(inputs, device))))
        targets.append(batch_targets)
    model.train(was_training)
    return concat(outputs), None if targets[0] is None else concat(targets)


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 128, device: torch.device = torch.device("cpu")
) -> int:
    """BatchNorm running statistics re-measured on `dataset`: each norm's mean and variance averaged over
    every batch (momentum None) of the model as it now is; weights untouched. Returns the norms reset.

    Only the norms run in training mode (dropout and stochastic depth stay as in evaluation), so the
    statistics are those the evaluated model meets. What pruning without fine-tuning needs: removing
    channels or weights changes every later layer's input statistics, and with the old ones each norm
    passes on a shrunken, offset signal (channel-pruned EfficientNet-B0: logit spread 1.6 -> 0.002).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    state = [(m.momentum, m.training) for m in norms]
    was_training = model.training
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
        m.train()
    try:
        for inputs, _ in iterate(dataset, batch_size):
            call_model(model, to_device(inputs, device))
    finally:
        for m, (momentum, training) in zip(norms, state):
            m.momentum = momentum
            m.train(training)
        model.train(was_training)
    return len(norms)
