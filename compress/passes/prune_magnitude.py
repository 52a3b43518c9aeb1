"""prune.magnitude: zero the smallest-magnitude weights (or whole channels), fine-tuning with masks held.

Granularities: unstructured (global or layer-wise), nm (N:M along input channels, for NVIDIA's sparse
tensor cores) and channels (structured: Torch-Pruning; GPT-2's Conv1D blocks by compress.conv1d_channels).
Schedules: oneshot, gradual (Zhu & Gupta's cubic ramp) and iterative (a fixed fraction of what remains per
round). `mode: randomized` is the seed paper's randomized variant. ALGORITHMS.md section 1 has the facts
this follows.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from compress.batches import Nested, call_model, split_item
from compress.channels import ChannelPruner, channel_counts, count_macs, head_counts, remap_masks
from compress.data import calibration_subset
from compress.distributed import epoch_shards
from compress.dnr import dead_neuron_rate
from compress.errors import BadInput
from compress.losses import LOSSES, Objective
from compress.passes.registry import PassResult, register_pass
from compress.recipe import StrictModel
from compress.sparsity import (
    apply_masks,
    magnitude_masks,
    merge_masks,
    nm_masks,
    output_layer_names,
    prunable_layers,
    randomized_masks,
    targeted_sparsity,
    tied_layers,
)
from compress.state import ModelState, StageContext
from compress.train import fit, recalibrate_batchnorm


class LossConfig(StrictModel):
    """The losses a training pass takes (compress/losses.py): `loss` on the targets, `kd_loss` against a teacher."""

    loss: str = Field(
        "auto",
        description="task loss: auto (ce for class targets, mse for float targets, none without targets) | "
        "ce | mse | python:module:callable(outputs, targets)",
    )
    kd_loss: Literal["auto", "kl", "mse", "cosine"] = Field(
        "auto", description="distillation loss: auto (kl for class scores, cosine for a cosine metric, else mse) | kl | mse | cosine"
    )

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        if value not in LOSSES and not value.startswith("python:"):
            raise ValueError(f"unknown loss {value!r} (known: {', '.join(LOSSES)}, python:module:callable)")
        return value


class FinetuneConfig(LossConfig):
    epochs: int = Field(2, ge=0, le=1000)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "constant", "onecycle"] = "cosine"
    shift: int = Field(0, ge=0, le=8, description="random +-pixel shifts (augmentation), as in reference training")
    distill: float = Field(
        0.0,
        ge=0,
        le=1,
        description="weight of distillation from the stage's input model (the rest: the task loss); data "
        "without targets fine-tunes on distillation alone",
    )
    temperature: float = Field(4.0, gt=0, description="distill: softmax temperature (kd_loss kl)")


class SelectionConfig(StrictModel):
    """What every magnitude-based pass shares: which layers, how weights are ranked, the fine-tuning."""

    scope: Literal["global", "layer"] = "global"
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    targets: list[str] = Field(default_factory=list, description="module-name patterns; empty = all conv/linear")
    ignore: list[str] = Field(default_factory=list)
    prune_classifier: bool = Field(
        False, description="also prune the output layers (every output head's final prediction layers)"
    )
    measure_dnr: bool = Field(True, description="report the dead-neuron rate before and after")


class MagnitudePruneConfig(SelectionConfig):
    mode: Literal["magnitude", "randomized"] = "magnitude"
    alpha: float | None = Field(None, gt=0, description="randomized mode: fixed alpha instead of a target")
    sparsity: float | None = Field(
        None, ge=0, lt=1, description="fraction of the targeted weights set to zero (channels: of channels)"
    )
    granularity: Literal["unstructured", "nm", "channels"] = "unstructured"
    n: int = Field(2, ge=1, description="nm: weights kept per group")
    m: int = Field(4, ge=2, description="nm: group size along input channels")
    nm_rule: Literal["asp", "divisible"] = Field(
        "asp", description="asp: NVIDIA ASP's out % 8 and in % 16 rule; divisible: in % m only"
    )
    round_to: int | None = Field(8, ge=1, description="channels: keep channel counts multiples of this")
    schedule: Literal["oneshot", "gradual", "iterative"] = "oneshot"
    steps: int = Field(10, ge=1, le=1000, description="gradual: pruning steps (Zhu & Gupta's n)")
    ramp: float = Field(0.5, gt=0, le=1, description="gradual: share of the fine-tuning over which sparsity ramps")
    rate: float = Field(0.2, gt=0, lt=1, description="iterative: fraction of the remaining weights per round")
    rewind: bool = Field(False, description="iterative: reset surviving weights to the stage start each round")
    recalibrate_bn: bool = Field(
        True,
        description="after each oneshot/iterative/nm/channels step, BatchNorm statistics re-measured on "
        "calibration_samples training samples (the pruned layers' outputs changed)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> MagnitudePruneConfig:
        if self.n >= self.m:
            raise ValueError(f"n: must be smaller than m ({self.n}:{self.m} prunes nothing)")
        if self.granularity == "nm":
            implied = 1 - self.n / self.m
            if self.sparsity is not None and not math.isclose(self.sparsity, implied, abs_tol=1e-9):
                raise ValueError(f"sparsity: granularity nm {self.n}:{self.m} prunes exactly {implied:g}; omit it")
            if self.schedule != "oneshot":
                raise ValueError("schedule: granularity nm prunes once (then fine-tunes); use oneshot")
        if self.mode == "randomized" and self.granularity != "unstructured":
            raise ValueError("mode: randomized applies to granularity unstructured only")
        if self.alpha is not None:
            if self.mode != "randomized":
                raise ValueError("alpha: only used with mode: randomized")
            if self.sparsity is not None or self.schedule != "oneshot":
                raise ValueError("alpha: a fixed alpha sets the sparsity itself; omit sparsity, use oneshot")
        elif self.sparsity is None and self.granularity != "nm":
            raise ValueError(f"sparsity: required for granularity {self.granularity}")
        if self.rewind and self.schedule != "iterative":
            raise ValueError("rewind: only with schedule iterative (rounds of prune, rewind, retrain)")
        return self


def finetune_teacher(state: ModelState, cfg: FinetuneConfig, ctx: StageContext) -> nn.Module | None:
    """With `distill`, or data without targets (nothing else to learn from), a frozen copy of the model
    as the stage received it: every later fine-tuning run of the stage learns from its outputs
    (SparseML's and ModelOpt's dense teacher for sparse fine-tuning)."""
    if cfg.epochs == 0 or (cfg.distill == 0 and _has_task_loss(cfg, ctx)):
        return None
    teacher = copy.deepcopy(state.model).eval()
    teacher.requires_grad_(False)
    return teacher


def _has_task_loss(cfg: FinetuneConfig, ctx: StageContext) -> bool:
    """Whether fine-tuning has a task loss: the data has targets (an explicit loss without them is refused)."""
    if split_item(ctx.data.train[0])[1] is not None:
        return True
    if cfg.loss != "auto":
        raise BadInput(
            f"stage {ctx.stage_name!r}: params.finetune.loss: {cfg.loss} needs targets, and the data has none "
            "(leave loss auto to fine-tune on distillation from the stage's input model alone)"
        )
    return False


def finetune_info(cfg: FinetuneConfig, ctx: StageContext) -> dict[str, Any]:
    """What the fine-tuning of a stage trained on, for the report."""
    if cfg.epochs == 0:
        return {}
    objective = ctx.objective(cfg.loss, cfg.kd_loss)
    if not _has_task_loss(cfg, ctx):
        return {"finetune_loss": "none (unlabelled data): distillation loss alone", "finetune_kd_loss": loss_name(objective.distill)}
    info = {"finetune_loss": cfg.loss if cfg.loss != "auto" else loss_name(objective.task)}
    if cfg.distill > 0:
        info["finetune_kd_loss"] = loss_name(objective.distill)
    return info


def loss_name(fn: Any) -> str:
    """A resolved loss function by the name its `loss` / `kd_loss` param gives it (for the report)."""
    return {"cross_entropy": "ce", "kd_mse": "mse", "kd_cosine": "cosine"}.get(fn.__name__, fn.__name__)


def finetune(
    state: ModelState,
    cfg: FinetuneConfig,
    ctx: StageContext,
    description: str,
    on_step: Callable[[int], None] | None = None,
    teacher: nn.Module | None = None,
) -> None:
    """Fine-tune on the task loss (`loss`), plus distillation from `teacher` (`distill`, `kd_loss`);
    without targets, on distillation from `teacher` alone."""
    if cfg.epochs == 0:
        return
    objective: Objective = ctx.objective(cfg.loss, cfg.kd_loss)
    fit(
        state.model,
        ctx.data.train,
        epochs=cfg.epochs,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        schedule=cfg.schedule,
        shift=cfg.shift,
        batch_size=ctx.batch_size,
        seed=ctx.seed,
        device=ctx.device,
        masks=state.masks,
        progress=ctx.progress,
        description=description,
        on_step=on_step,
        teacher=teacher,
        distill_weight=cfg.distill if _has_task_loss(cfg, ctx) else 1.0,
        temperature=cfg.temperature,
        objective=objective,
    )


# --- schedules ------------------------------------------------------------------------------------------


def gradual_sparsities(initial: float, final: float, steps: int) -> list[float]:
    """Zhu & Gupta: s_t = s_f + (s_i - s_f) * (1 - t/n)^3 for t = 1..n (fast early, gentle late)."""
    if final <= initial:
        return [final]
    return [final + (initial - final) * (1 - t / steps) ** 3 for t in range(1, steps + 1)]


def iterative_sparsities(initial: float, final: float, rate: float) -> list[float]:
    """Prune `rate` of what remains per round (1 - (1-rate)^k from zero); the last round stops at `final`."""
    sparsities, current = [], initial
    while current < final - 1e-12:
        current = min(final, 1 - (1 - current) * (1 - rate))
        sparsities.append(current)
    return sparsities or [final]


def step_targets(cfg: MagnitudePruneConfig, initial: float, final: float) -> list[float]:
    if cfg.schedule == "gradual":
        return gradual_sparsities(initial, final, cfg.steps)
    if cfg.schedule == "iterative":
        return iterative_sparsities(initial, final, cfg.rate)
    return [final]


# --- shared by the pruning passes -----------------------------------------------------------------------


def select_layers(model: nn.Module, cfg: SelectionConfig, ctx: StageContext) -> dict[str, nn.Module]:
    """The layers to prune: params.targets/ignore; the output layers of every head unless prune_classifier."""
    layers = prunable_layers(model, cfg.targets, cfg.ignore, cfg.prune_classifier, example=ctx.example())
    if not layers:
        raise BadInput(f"stage {ctx.stage_name!r}: params.targets/ignore select no Conv or Linear layer to prune")
    for name, other in tied_layers(model).items():
        ctx.progress.log(f"{ctx.stage_name}: {name} left dense: its weight is tied to {other}")
    return layers


def measure(model: nn.Module, ctx: StageContext, example: Nested, dnr: bool) -> dict[str, Any]:
    """What the report compares before and after a pruning stage."""
    macs, params = count_macs(model, example)
    zeros = total = 0
    for module in prunable_layers(model, include_classifier=True).values():
        zeros += int((module.weight == 0).sum())
        total += module.weight.numel()
    result: dict[str, Any] = {
        "macs": macs,
        "params": params,
        "params_nonzero": sum(int((p != 0).sum()) for p in model.parameters()),
        "weights_zero": zeros,
        "weights_total": total,
    }
    if dnr:
        result["dnr"] = dead_neuron_rate(model, ctx.data.val, batch_size=256, device=ctx.device)["dnr"]
    return result


def before_after(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Flat report keys (`macs_before`, `macs_after`, ...) plus the MACs ratio."""
    report = {f"{key}_before": value for key, value in before.items()}
    report.update({f"{key}_after": value for key, value in after.items()})
    report["macs_ratio"] = before["macs"] / after["macs"] if after["macs"] else None
    return report


def rewind_to(model: nn.Module, snapshot: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    """Reset every surviving weight (and BN statistics) to `snapshot`, keeping the current masks."""
    model.load_state_dict(snapshot)
    apply_masks(model, masks)


# --- the pass -------------------------------------------------------------------------------------------


@register_pass("prune.magnitude", MagnitudePruneConfig)
def prune_magnitude(state: ModelState, cfg: MagnitudePruneConfig, ctx: StageContext) -> PassResult:
    layers = select_layers(state.model, cfg, ctx)
    example = ctx.example()
    before = measure(state.model, ctx, example, cfg.measure_dnr)
    teacher = finetune_teacher(state, cfg.finetune, ctx)
    if cfg.granularity == "channels":
        info = _prune_channels(state, cfg, ctx, layers, example, teacher)
    elif cfg.granularity == "nm":
        info = _prune_nm(state, cfg, ctx, layers, teacher)
    else:
        info = _prune_unstructured(state, cfg, ctx, layers, teacher)
    after = measure(state.model, ctx, example, cfg.measure_dnr)
    return PassResult(
        state,
        {
            "target_sparsity": cfg.sparsity if cfg.granularity != "nm" else 1 - cfg.n / cfg.m,
            "granularity": cfg.granularity,
            "scope": cfg.scope,
            "schedule": cfg.schedule,
            "mode": cfg.mode,
            # layers whose weight is another parameter too (GPT-2's lm_head: the word embedding): never pruned
            "tied_dense": tied_layers(state.model),
            **finetune_info(cfg.finetune, ctx),
            **info,
            **before_after(before, after),
        },
    )


def _prune_unstructured(
    state: ModelState,
    cfg: MagnitudePruneConfig,
    ctx: StageContext,
    layers: dict[str, nn.Module],
    teacher: nn.Module | None,
) -> dict[str, Any]:
    initial, _, _ = targeted_sparsity(layers)
    generator = torch.Generator().manual_seed(ctx.seed)
    alphas: dict[str, float] = {}

    def prune_to(target: float | None) -> None:
        nonlocal alphas
        if cfg.mode == "randomized":
            new_masks, alphas = randomized_masks(
                layers, target or 0.0, cfg.scope, generator, alpha=cfg.alpha, existing=state.masks
            )
        else:
            new_masks = magnitude_masks(layers, target, cfg.scope, existing=state.masks)
        merge_masks(state.masks, new_masks)  # in place: a running fit() holds this very dict
        apply_masks(state.model, state.masks)

    if cfg.schedule == "gradual":
        steps = _gradual_while_training(state, cfg, ctx, layers, prune_to, initial, teacher)
        epochs_total = cfg.finetune.epochs
    else:
        targets = [cfg.sparsity] if cfg.sparsity is None else step_targets(cfg, initial, cfg.sparsity)
        snapshot = {k: v.detach().clone() for k, v in state.model.state_dict().items()} if cfg.rewind else None
        steps = []
        for index, target in enumerate(targets):
            prune_to(target)
            if snapshot is not None:
                rewind_to(state.model, snapshot, state.masks)
            steps.append(_prune_step(state, cfg, ctx, layers, index, len(targets), target, teacher))
        epochs_total = cfg.finetune.epochs * len(targets)
    info: dict[str, Any] = {"pruned_layers": sorted(layers), "steps": steps}
    info["metric_before_finetune"] = steps[-1]["metric_after_prune"]
    info["finetune_epochs_total"] = epochs_total
    if cfg.mode == "randomized":
        info["alpha"] = next(iter(alphas.values())) if cfg.scope == "global" else alphas
    return info


def _gradual_while_training(
    state: ModelState,
    cfg: MagnitudePruneConfig,
    ctx: StageContext,
    layers: dict[str, nn.Module],
    prune_to: Callable[[float], None],
    initial: float,
    teacher: nn.Module | None,
) -> list[dict[str, Any]]:
    """Zhu & Gupta inside one fine-tuning run: `steps` pruning events evenly spaced over the first `ramp`
    of its optimizer steps (the first before any training), then training on with the masks fixed.

    One run with one learning-rate schedule, instead of a fit per step: each event removes a sliver, and
    the network keeps adapting between events.
    """
    targets = gradual_sparsities(initial, cfg.sparsity, cfg.steps)
    per_epoch = len(epoch_shards(len(ctx.data.train), ctx.batch_size, ctx.seed))
    ramp_end = cfg.ramp * cfg.finetune.epochs * per_epoch
    at = [round(k * ramp_end / len(targets)) for k in range(len(targets))]
    record: list[dict[str, Any]] = []

    def on_step(done: int) -> None:
        while len(record) < len(targets) and at[len(record)] <= done:
            index = len(record)
            prune_to(targets[index])
            sparsity, _, _ = targeted_sparsity(layers)
            record.append({"step": index + 1, "iteration": done, "target": targets[index], "sparsity": sparsity})
            if len(record) == len(targets):
                record[-1]["metric_after_prune"] = ctx.evaluate(state.model)

    on_step(0)
    finetune(state, cfg.finetune, ctx, f"{ctx.stage_name}: gradual prune + fine-tune", on_step, teacher)
    ctx.progress.log(
        f"{ctx.stage_name}: gradual, {len(targets)} steps to {record[-1]['sparsity']:.4f}, "
        f"metric right after the last step {record[-1]['metric_after_prune']:.4f}"
    )
    return record


def _prune_step(
    state: ModelState,
    cfg: MagnitudePruneConfig,
    ctx: StageContext,
    layers: dict[str, nn.Module],
    index: int,
    count: int,
    target: float | None,
    teacher: nn.Module | None,
) -> dict[str, Any]:
    """Re-measure BatchNorm statistics (recalibrate_bn), measure the freshly pruned model, fine-tune it,
    and say what the step did."""
    if cfg.recalibrate_bn:
        recalibrate_batchnorm(
            state.model,
            calibration_subset(ctx.data.train, ctx.calibration_samples, ctx.seed),
            batch_size=ctx.batch_size,
            device=ctx.device,
        )
    metric_pruned = ctx.evaluate(state.model)
    sparsity, _, _ = targeted_sparsity(layers)
    ctx.progress.log(
        f"{ctx.stage_name}: step {index + 1}/{count}, sparsity {sparsity:.4f}, metric before fine-tune {metric_pruned:.4f}"
    )
    label = f"{ctx.stage_name}: fine-tune" + (f" {index + 1}/{count}" if count > 1 else "")
    finetune(state, cfg.finetune, ctx, label, teacher=teacher)
    return {"step": index + 1, "target": target, "sparsity": sparsity, "metric_after_prune": metric_pruned}


def _prune_nm(
    state: ModelState,
    cfg: MagnitudePruneConfig,
    ctx: StageContext,
    layers: dict[str, nn.Module],
    teacher: nn.Module | None,
) -> dict[str, Any]:
    new_masks, skipped = nm_masks(layers, cfg.n, cfg.m, cfg.nm_rule, existing=state.masks)
    if not new_masks:
        first = next(iter(skipped.items()))
        raise BadInput(
            f"stage {ctx.stage_name!r}: no selected layer can take {cfg.n}:{cfg.m} "
            f"(params.nm_rule {cfg.nm_rule}; e.g. {first[0]}: {first[1]})"
        )
    for name, reason in skipped.items():
        ctx.progress.log(f"{ctx.stage_name}: {name} left dense: {reason}")
    merge_masks(state.masks, new_masks)
    apply_masks(state.model, state.masks)
    nm_layers = {name: layers[name] for name in layers if name not in skipped}
    step = _prune_step(state, cfg, ctx, nm_layers, 0, 1, 1 - cfg.n / cfg.m, teacher)
    return {
        "pruned_layers": sorted(nm_layers),
        "nm": {"n": cfg.n, "m": cfg.m, "rule": cfg.nm_rule, "layers": sorted(nm_layers), "skipped": skipped},
        "steps": [step],
        "metric_before_finetune": step["metric_after_prune"],
        "finetune_epochs_total": cfg.finetune.epochs,
    }


def _prune_channels(
    state: ModelState,
    cfg: MagnitudePruneConfig,
    ctx: StageContext,
    layers: dict[str, nn.Module],
    example: Nested,
    teacher: nn.Module | None,
) -> dict[str, Any]:
    model = state.model
    ratios = step_targets(cfg, 0.0, cfg.sparsity)
    channels_before, heads_before = channel_counts(model), head_counts(model)
    pruner = ChannelPruner(
        model,
        example,
        ratios=ratios,
        global_ranking=cfg.scope == "global",
        selected=layers,
        classifier=output_layer_names(model, example),
        round_to=cfg.round_to,
    )
    steps = []
    for index, ratio in enumerate(ratios):
        pruner.step()
        _check_still_runs(model, example, ctx)
        state.masks = remap_masks(model, state.masks)
        apply_masks(model, state.masks)
        if cfg.rewind and index == 0:
            ctx.progress.log(f"{ctx.stage_name}: rewind has no meaning for channels (the shapes change); ignored")
        steps.append(_prune_step(state, cfg, ctx, layers, index, len(ratios), ratio, teacher))
        # weight sparsity says nothing here: what shrank is the channel count of the selected layers
        now = channel_counts(model)
        steps[-1]["sparsity"] = 1 - sum(now[name] for name in layers) / sum(channels_before[name] for name in layers)
    channels_after, heads_after = channel_counts(model), head_counts(model)
    return {
        "pruned_layers": sorted(layers),
        "channels": {
            name: [count, channels_after[name]]
            for name, count in channels_before.items()
            if channels_after.get(name) != count
        },
        # attention modules whose heads went, [before, after]
        "heads": {name: [count, heads_after[name]] for name, count in heads_before.items() if heads_after[name] != count},
        "round_to": cfg.round_to,
        "steps": steps,
        "metric_before_finetune": steps[-1]["metric_after_prune"],
        "finetune_epochs_total": cfg.finetune.epochs * len(ratios),
    }


def _check_still_runs(model: nn.Module, example: Nested, ctx: StageContext) -> None:
    was_training = model.training
    try:
        with torch.no_grad():
            call_model(model.eval(), example)
    except Exception as exc:
        raise BadInput(
            f"stage {ctx.stage_name!r}: granularity channels: Torch-Pruning could not prune this architecture "
            f"consistently ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); exclude the layers involved "
            "with params.ignore, or use unstructured/nm"
        ) from None
    finally:
        model.train(was_training)
