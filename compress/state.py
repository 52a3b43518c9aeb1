"""What flows between stages: the model with its masks, and the context a pass runs in."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress.structure import apply_structure, structure_record

if TYPE_CHECKING:
    from compress.data import DataSplits
    from compress.losses import Objective
    from compress.metrics import Metric
    from compress.progress import RunProgress

CHECKPOINT_FORMAT = "compress.stage/1"


@dataclass
class ModelState:
    model: nn.Module
    # parameter name -> bool keep-mask; every later stage keeps masked weights at exactly zero
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    # the quantization plan (plain data) once a quantize stage ran: resume rebuilds the quantized graph
    quant: dict[str, Any] | None = None

    def checkpoint(self) -> dict[str, Any]:
        """Tensors and plain data only, so the checkpoint loads with weights_only=True."""
        return {
            "format": CHECKPOINT_FORMAT,
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "masks": {k: v.cpu() for k, v in self.masks.items()},
            # layer sizes as plain data: a channel-pruned model is rebuilt from the recipe, then resized
            "structure": structure_record(self.model),
            **({"quant": self.quant} if self.quant is not None else {}),
        }

    @classmethod
    def from_checkpoint(cls, template: nn.Module, payload: dict[str, Any]) -> ModelState:
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a compress stage checkpoint (format {payload.get('format')!r})")
        if "structure" in payload:
            apply_structure(template, payload["structure"], payload["state_dict"])
        quant = payload.get("quant")
        if quant is not None:
            from compress.quant import is_quantized, restore

            if not is_quantized(template):
                template = restore(template, quant, payload["state_dict"])
        template.load_state_dict(payload["state_dict"])
        device = next(template.parameters()).device
        return cls(template, {k: v.to(device) for k, v in payload["masks"].items()}, quant)


@dataclass
class StageContext:
    data: DataSplits
    device: torch.device
    seed: int
    batch_size: int
    progress: RunProgress
    evaluate: Callable[[nn.Module], float]  # the validation metric, what gates see
    stage_name: str = ""
    stage_dir: Path | None = None  # where the stage may write artifacts (plots, tables) besides its checkpoint
    recipe_dir: Path | None = None  # relative paths in pass params (a teacher checkpoint) mean "next to the recipe"
    baseline: ModelState | None = None  # the model before the first stage (default teacher); do not modify
    calibration_samples: int = 1024
    metric: Metric | None = None  # the recipe's metric (compress/metrics.py); None: top-1
    output: str | None = None  # model.output: the part of the outputs metrics, gates and distillation read
    # the validation metric plus the outputs it was computed from (sensitivity compares them)
    score_and_outputs: Callable[[nn.Module], tuple[float, Any]] | None = None

    def example(self) -> Any:
        """A batch of one training sample on the stage's device (tracing, MAC counts, shape checks)."""
        from compress.batches import example_input

        return example_input(self.data.train, self.device)

    def objective(self, loss: str = "auto", kd_loss: str = "auto") -> Objective:
        """The training objective a pass's `loss` / `kd_loss` params name, on this run's data and metric."""
        from compress.batches import split_item
        from compress.losses import Objective, resolve_kd_loss, resolve_loss
        from compress.metrics import resolve_metric

        _, target = split_item(self.data.train[0])
        return Objective(
            resolve_loss(loss, target), resolve_kd_loss(kd_loss, self.metric or resolve_metric("top1")), self.output
        )

    @classmethod
    def standalone(
        cls, data: DataSplits, *, seed: int = 0, batch_size: int = 128, name: str = "stage", output: str | None = None
    ) -> StageContext:
        """A context outside a run (benchmarks, tests calling a pass): CPU, quiet, validation top-1 of the
        outputs `output` names (model.output: a ModelOutput's 'logits'; None: the outputs as they are)."""
        from compress.batches import selected
        from compress.metrics import resolve_metric
        from compress.progress import RunProgress
        from compress.train import predict

        top1 = resolve_metric("top1")

        def score_and_outputs(model: nn.Module) -> tuple[float, Any]:
            outputs, targets = predict(model, data.val)
            chosen = selected(outputs, output)
            return top1(chosen, targets), chosen

        return cls(
            data=data,
            device=torch.device("cpu"),
            seed=seed,
            batch_size=batch_size,
            progress=RunProgress(quiet=True),
            evaluate=lambda model: score_and_outputs(model)[0],
            stage_name=name,
            metric=top1,
            output=output,
            score_and_outputs=score_and_outputs,
        )
