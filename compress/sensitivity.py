"""Per-layer sensitivity: what the metric loses when only one layer is pruned or quantized.

- pruning: the layer alone pruned by magnitude to the stage's sparsity (its own quantile, no fine-tuning);
- quantization: the layer's BN-folded weights alone on the stage's grid (per-channel symmetric,
  round-to-nearest, the rest of the model float, activations float), at each bit width asked for.

Each (layer, level) gets the validation metric, its drop against the unchanged model, and how far the
model's outputs (those the metric reads: `model.output`) moved from the unchanged model's
(`metrics.divergence`): the KL divergence of class scores where the metric reads class scores, else the
noise-to-signal ratio of every output tensor. A smooth measure that still ranks layers where a small
validation split gives many equal drops. It is stored under the key "kl" either way; the analysis's
"divergence" field says which it is ("kl" or "noise_to_signal"; files without it hold KL). Results are
cached in RUN/analysis/NN-NAME.json under a digest of the stage's input model and the measuring
settings, so `compress analyze`, the gate search and `weight_bits: auto` measure each number once, and
an interrupted analysis continues.

`knapsack_bits` is the mixed-precision choice: per-layer bits minimising the summed sensitivity under a
budget of weight bits (a multiple-choice knapsack, solved exactly on a grid of the budget).
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from compress import distributed
from compress.atomic import atomic_write_json
from compress.batches import Nested
from compress.errors import BadInput
from compress.metrics import divergence
from compress.progress import RunProgress
from compress.state import ModelState

# model -> (validation metric, the validation outputs it read: StageContext.score_and_outputs)
Scorer = Callable[[nn.Module], tuple[float, Nested]]
ANALYSIS_FORMAT = "compress.sensitivity/1"
DIVERGENCES = {True: "kl", False: "noise_to_signal"}  # class scores or not -> what the "kl" values measure


def analysis_path(stage_dir: Path) -> Path:
    """RUN/stages/NN-NAME -> RUN/analysis/NN-NAME.json: one place for analyze, search and bits: auto."""
    return stage_dir.parent.parent / "analysis" / f"{stage_dir.name}.json"


def state_digest(state: ModelState) -> str:
    digest = hashlib.sha256()
    tensors = {**state.model.state_dict(), **{f"mask:{k}": v for k, v in state.masks.items()}}
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _key(base: str, class_scores: bool) -> str:
    """The cache key: KL analyses keep the key they always had (their files stay valid)."""
    return base if class_scores else f"{base}:{DIVERGENCES[False]}"


class Analysis:
    """The cached results of one stage: {layer: {"weights": n, "results": {level: {metric, drop, kl}}}}."""

    def __init__(self, path: Path | None, key: str, kind: str, level_name: str, class_scores: bool = True) -> None:
        self.path, self.key = path, key
        self.data: dict[str, Any] = {"format": ANALYSIS_FORMAT, "key": key, "kind": kind, "level": level_name,
                                     "metric": None, "divergence": DIVERGENCES[class_scores], "layers": {}}
        if path is not None and path.exists():
            try:
                cached = json.loads(path.read_text())
            except (OSError, ValueError):
                cached = {}
            if cached.get("key") == key and cached.get("format") == ANALYSIS_FORMAT:
                self.data = cached

    @property
    def layers(self) -> dict[str, Any]:
        return self.data["layers"]

    @property
    def divergence(self) -> str:
        """What the results' "kl" values measure: "kl" (class scores) or "noise_to_signal"."""
        return str(self.data.get("divergence", "kl"))

    @property
    def class_scores(self) -> bool:
        return self.divergence == "kl"

    def missing(self, name: str, levels: list[str]) -> list[str]:
        done = self.layers.get(name, {}).get("results", {})
        return [level for level in levels if level not in done]

    def record(self, name: str, weights: int, level: str, metric: float, kl: float) -> None:
        entry = self.layers.setdefault(name, {"weights": weights, "results": {}})
        entry["results"][level] = {"metric": metric, "drop": self.data["metric"] - metric, "kl": kl}

    def save(self) -> None:
        if self.path is not None and distributed.is_main():
            atomic_write_json(self.path, self.data)

    def ranking(self, level: str, names: list[str] | None = None) -> list[str]:
        """Layer names, most sensitive first: by metric drop, then by KL (many drops are equal)."""
        names = [n for n in (names if names is not None else self.layers) if level in self.layers[n]["results"]]

        def key(name: str) -> tuple[float, float]:
            result = self.layers[name]["results"][level]
            return (-result["drop"], -result["kl"])

        return sorted(names, key=key)

    def costs(self, measure: str) -> dict[str, dict[int, float]]:
        """Per layer, bits -> sensitivity, made monotone: fewer bits never cost less than more bits."""
        out: dict[str, dict[int, float]] = {}
        for name, entry in self.layers.items():
            by_bits = {int(level): max(0.0, result[measure]) for level, result in entry["results"].items()}
            running = 0.0
            for bits in sorted(by_bits, reverse=True):
                running = max(running, by_bits[bits])
                by_bits[bits] = running
            out[name] = by_bits
        return out


def _measure(
    analysis: Analysis,
    model: nn.Module,
    jobs: list[tuple[str, int, list[str], Callable[[str], Callable[[], None]]]],
    score: Scorer,
    progress: RunProgress,
    description: str,
) -> None:
    """jobs: (layer, weights, missing levels, level -> apply (returns undo)); measured, cached per layer."""
    base = score(model)
    class_scores = analysis.class_scores
    analysis.data["metric"] = base[0]
    total = sum(len(levels) for _, _, levels, _ in jobs)
    if not total:
        return
    with progress.task(description, total) as advance:
        for name, weights, levels, apply in jobs:
            for level in levels:
                undo = apply(level)
                try:
                    metric, outputs = score(model)
                finally:
                    undo()
                moved = divergence(outputs, base[1], class_scores=class_scores)
                analysis.record(name, weights, level, metric, moved)
                advance(1, f"{name} @ {level}: drop {analysis.layers[name]['results'][level]['drop']:+.4f}")
            analysis.save()


def prune_sensitivity(
    state: ModelState,
    layers: dict[str, nn.Module],
    sparsity: float,
    score: Scorer,
    path: Path | None,
    progress: RunProgress,
    *,
    class_scores: bool = True,
) -> Analysis:
    """class_scores: the metric reads class scores (`Metric.reads_class_scores`): outputs compared by KL."""
    from compress.sparsity import magnitude_masks

    analysis = Analysis(path, _key(state_digest(state) + ":prune", class_scores), "prune", "sparsity", class_scores)
    level = f"{sparsity:g}"
    jobs = []
    for name, module in layers.items():
        levels = analysis.missing(name, [level])
        if not levels:
            continue

        def apply(_level: str, name: str = name, module: nn.Module = module) -> Callable[[], None]:
            saved = module.weight.detach().clone()
            mask = magnitude_masks({name: module}, sparsity, "layer", existing=state.masks)[f"{name}.weight"]
            with torch.no_grad():
                module.weight.mul_(mask.to(module.weight.dtype))
            return lambda: module.weight.data.copy_(saved)

        jobs.append((name, module.weight.numel(), levels, apply))
    if jobs:
        _measure(analysis, state.model, jobs, score, progress, "sensitivity: prune one layer at a time")
    return analysis


def quant_sensitivity(
    state: ModelState,
    bits: list[int],
    weight_range: str,
    score: Scorer,
    path: Path | None,
    progress: RunProgress,
    grid: str | None = None,
    *,
    class_scores: bool = True,
    example: Nested = None,
) -> Analysis:
    """class_scores: as for prune_sensitivity; example: a batch of samples (StageContext.example), for
    models whose forward has parameters the data does not fill (quant/graph.py make_plan)."""
    from compress.quant import build, make_plan
    from compress.quant.adaround import set_rtn
    from compress.quant.graph import quant_layers, set_float
    from compress.quant.grid import weight_scales

    key = _key(f"{state_digest(state)}:quantize:{weight_range}:{grid}", class_scores)
    analysis = Analysis(path, key, "quantize", "bits", class_scores)
    on_grid = {"grid": grid} if grid is not None else {}  # the stage's weight grid, where the pass has one
    levels = [str(b) for b in bits]
    plan = make_plan(state.model, weight_bits=8, activation_bits=None, layer_bits={}, skip=[], first_last_8bit=False,
                     example=example)
    model = build(state.model, plan).eval()
    set_float(model, True)
    jobs = []
    for name, layer in quant_layers(model).items():
        missing = analysis.missing(name, levels)
        if not missing:
            continue
        mask = state.masks.get(f"{name}.weight")

        def apply(level: str, layer: Any = layer, mask: Tensor | None = mask) -> Callable[[], None]:
            layer.bits = int(level)
            layer.weight_scale.copy_(weight_scales(layer.float_weight, layer.bits, weight_range, **on_grid))
            set_rtn(layer, mask.to(layer.float_weight.dtype) if mask is not None else None, **on_grid)
            layer.use_float = False
            return lambda: setattr(layer, "use_float", True)

        jobs.append((name, layer.float_weight.numel(), missing, apply))
    if jobs:
        _measure(analysis, model, jobs, score, progress, "sensitivity: quantize one layer at a time")
    return analysis


def stage_sensitivity(
    pass_name: str,
    config: Any,
    state: ModelState,
    score: Scorer,
    path: Path | None,
    progress: RunProgress,
    *,
    class_scores: bool = True,
    example: Nested = None,
) -> Analysis:
    """The analysis a stage's settings call for: its sparsity, or its bits (every candidate for auto).
    class_scores: the metric reads class scores (`Metric.reads_class_scores`): outputs compared by KL,
    otherwise by noise-to-signal ratio; example: a batch of samples (quantization's trace)."""
    if pass_name.startswith("prune."):
        from compress.sparsity import prunable_layers

        if getattr(config, "sparsity", None) is None or getattr(config, "granularity", "unstructured") != "unstructured":
            raise BadInput(f"{pass_name}: sensitivity needs unstructured pruning with params.sparsity")
        layers = prunable_layers(state.model, config.targets, config.ignore, config.prune_classifier)
        return prune_sensitivity(state, layers, config.sparsity, score, path, progress, class_scores=class_scores)
    if pass_name.startswith("quantize."):
        bits = list(config.bits_choices) if config.weight_bits == "auto" else [config.weight_bits]
        grid = getattr(config, "weight_grid", None)
        return quant_sensitivity(state, bits, config.weight_range, score, path, progress, grid,
                                 class_scores=class_scores, example=example)
    raise BadInput(f"{pass_name}: per-layer sensitivity is measured for prune.* and quantize.* stages only")


def primary_level(pass_name: str, config: Any) -> str:
    """The level a stage's ranking is read at: its sparsity, its bits (auto: the fewest it may choose)."""
    if pass_name.startswith("prune."):
        return f"{config.sparsity:g}"
    return str(min(config.bits_choices) if config.weight_bits == "auto" else config.weight_bits)


# --- mixed precision ---------------------------------------------------------------------------------


def knapsack_bits(
    costs: dict[str, dict[int, float]], weights: dict[str, int], capacity_bits: float, resolution: int = 4000
) -> dict[str, int]:
    """Bits per layer minimising the summed cost with sum(weights * bits) <= capacity_bits.

    Exact dynamic programming over the capacity in `resolution` units; each layer's bit cost is rounded
    up to whole units, so the answer always fits the budget (and loses at most a unit per layer).
    """
    names = list(costs)
    if not names:
        return {}
    unit = capacity_bits / resolution
    if unit <= 0:
        raise BadInput("budget: no room for any weight")
    inf = math.inf
    best = [0.0] * (resolution + 1)  # best[c]: least summed cost of the layers so far within c units
    choices: list[list[int | None]] = []
    for name in names:
        options = [(bits, math.ceil(weights[name] * bits / unit - 1e-9), cost) for bits, cost in costs[name].items()]
        new = [inf] * (resolution + 1)
        pick: list[int | None] = [None] * (resolution + 1)
        for c in range(resolution + 1):
            for bits, units, cost in options:
                if units <= c and best[c - units] + cost < new[c]:
                    new[c], pick[c] = best[c - units] + cost, bits
        best = new
        choices.append(pick)
    if best[resolution] == inf:
        fewest = sum(weights[n] * min(costs[n]) for n in names)
        raise BadInput(
            f"budget: {capacity_bits / 8:.0f} bytes of weights is below what the fewest bits need ({fewest / 8:.0f} bytes)"
        )
    chosen: dict[str, int] = {}
    c = resolution
    for name, pick in zip(reversed(names), reversed(choices)):
        bits = pick[c]
        assert bits is not None
        chosen[name] = bits
        c -= math.ceil(weights[name] * bits / unit - 1e-9)
    return {name: chosen[name] for name in names}


# --- presentation ------------------------------------------------------------------------------------


def table(analysis: Analysis, level: str, title: str) -> Any:
    from rich.table import Table

    levels = sorted({lv for e in analysis.layers.values() for lv in e["results"]}, key=float)
    moved = "KL" if analysis.class_scores else "NSR"  # what the "kl" values measure
    out = Table(title=title)
    out.add_column("layer", justify="left")
    out.add_column("weights", justify="right")
    for lv in levels:
        label = f"{analysis.data['level']} {lv}"
        out.add_column(f"drop @ {label}", justify="right")
        out.add_column(f"{moved} @ {label}", justify="right")
    for name in analysis.ranking(level):
        results = analysis.layers[name]["results"]
        cells = []
        for lv in levels:
            r = results.get(lv)
            cells += [f"{100 * r['drop']:+.2f} pt", f"{r['kl']:.2e}"] if r else ["-", "-"]
        out.add_row(name, f"{analysis.layers[name]['weights']:,}", *cells)
    return out
