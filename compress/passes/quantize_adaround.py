"""quantize.rtn and quantize.adaround: post-training quantization to an integer grid, export-exact.

Both passes: fold BN into the preceding Conv/Linear, fix per-channel symmetric weight scales (MSE search
or min-max), place activation quantizers where TensorRT wants them and calibrate them on the calibration
split with the float folded model, then set the integers: round-to-nearest (rtn), or AdaRound's learned
rounding (../shared/ALGORITHMS.md section 3; compress/quant/adaround.py). With iterations = 0 the two
give the same integers.

Iterations: one default, 10,000 per layer at every bit width, the paper's setting and ALGORITHMS.md's.
AIMET uses 15,000 below 8 bits; on the mnist5k ResNets 500 iterations already matched AIMET's accuracy
(bench/quantization.py), so the extra 50% of time is left to recipes that ask for it.
"""
from __future__ import annotations

import math
import time
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from compress.batches import stack_samples
from compress.data import calibration_subset
from compress.errors import BadInput
from compress.passes.registry import PassResult, register_pass
from compress.quant import build, is_quantized, make_plan
from compress.quant.adaround import AdaRoundSettings, run_adaround, set_rtn
from compress.quant.calibrate import ActCalibration, calibrate_activations
from compress.quant.graph import (
    Placement,
    act_quantizers,
    following_activation,
    integer_weights,
    layer_nodes,
    oriented_masks,
    quant_layers,
)
from compress.quant.modules import QuantEmbedding, QuantLayer
from compress.quant.grid import WeightGrid, WeightRange, weight_scales
from compress.quant.smooth import smooth_layers
from compress.recipe import StrictModel
from compress.sparsity import PRUNABLE_TYPES
from compress.state import ModelState, StageContext
from compress.structure import structure_record

class BitsBudget(StrictModel):
    """weight_bits: auto chooses per-layer bits within one of these (weights of the quantized layers)."""

    average_bits: float | None = Field(None, ge=2, le=8, description="bits per weight, averaged over weights")
    weight_bytes: int | None = Field(None, ge=1, description="weights packed at their bits, in bytes")

    @model_validator(mode="after")
    def _one(self) -> BitsBudget:
        if (self.average_bits is None) == (self.weight_bytes is None):
            raise ValueError("expected exactly one of average_bits, weight_bytes")
        return self


class QuantizeConfig(StrictModel):
    weight_bits: int | Literal["auto"] = Field(
        8, description="weight bits 2..8 (per-channel symmetric grid), or auto: per layer within `budget`"
    )
    budget: BitsBudget | None = Field(None, description="weight_bits auto: average bits or packed weight bytes")
    bits_choices: list[int] = Field(default_factory=lambda: [2, 3, 4, 5, 6, 8], min_length=1)
    auto_measure: Literal["kl", "drop"] = Field("kl", description="auto: the per-layer sensitivity summed")
    activation_bits: Literal[8, 16, "off"] = Field(8, description="per-tensor symmetric activations, or off")
    calibration_samples: int | None = Field(None, ge=1, description="default: data.calibration_samples")
    layer_bits: dict[str, int] = Field(default_factory=dict, description="layer-name pattern -> weight bits")
    skip: list[str] = Field(default_factory=list, description="layer-name patterns left in float")
    first_last_8bit: bool = Field(False, description="first and last quantized layers at 8 bits")
    weight_range: WeightRange = Field("auto", description="auto: sqnr at 2 bits, mse above (compress/quant/grid.py)")
    # full by default: at the same scale it is the narrow grid plus one level below -max, so the MSE range
    # search can only lower the weights' rounding error, and at low bits the level counts (W2: 4 levels
    # instead of the ternary 3; ResNet-8 W2A8 AdaRound, 500 iterations, seed 1: 69.7% narrow (200 it.),
    # 73.1% full). It is AIMET's grid, and its integers are plain int8 weights for TensorRT and ONNX
    # Runtime (export/qdq.py folds them into int8 initializers). narrow: weights symmetric under negation.
    weight_grid: WeightGrid = Field("full", description="weights in [-2^(b-1), 2^(b-1)-1] (full) or +-(2^(b-1)-1)")
    # minmax by default, as ONNX Runtime's quantize_static, ModelOpt's int8 and Neural Compressor's default.
    # ResNet-8 (mnist5k) AdaRound 500 iterations, calibration draws 1-5: W8A8 98.00% minmax vs 97.88% mse
    # (ORT quantize_static MinMax, zero-point activations, same draws: 98.00%); W3A8 97.54% vs 97.50%.
    # (MSE trades the largest activations for finer steps below them; min-max never clips.)
    act_calibration: ActCalibration = Field("minmax", description="activation ranges: minmax | percentile | mse")
    residual_quantizers: Literal["skip", "both"] = Field(
        "skip",
        description="residual adds: quantize the skip operand (TensorRT's placement) or both operands "
        "(ONNX Runtime then runs every conv and add in integer: the fast int8-ort file)",
    )
    act_percentile: float = Field(99.99, gt=50, le=100)
    placement: Placement = Field(
        "auto",
        description="where quantizers go: graph (torch.fx trace: BN folded, residual quantizers for TensorRT), "
        "modules (layers swapped for ones quantizing their own inputs, attention matmuls included: any model "
        "that runs, Hugging Face transformers as loaded), auto (graph, else modules; the report says why)",
    )
    smooth_alpha: float | Literal["auto", "off"] = Field(
        "auto",
        description="SmoothQuant before calibration (module placement, Linear layers): input outliers moved "
        "into the weights with strength alpha in [0, 1]; auto: per layer, the alpha (or none) with the least "
        "quantized-output error on calibration inputs (compress/quant/smooth.py)",
    )
    quantize_embeddings: bool = Field(
        False, description="Embedding tables stored as int8 rows with per-row scales (weight-only): smaller files"
    )
    unsigned_symmetric: bool = Field(
        False,
        description="activations that calibration finds nonnegative (ReLU outputs) use the unsigned grid: "
        "all 256 levels on [0, amax]. ONNX Runtime (int8-ort) only: TensorRT's int8 is signed",
    )

    @field_validator("activation_bits", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false
        return "off" if value is False else value

    @field_validator("layer_bits")
    @classmethod
    def _bits_range(cls, value: dict[str, int]) -> dict[str, int]:
        for pattern, bits in value.items():
            if not 2 <= bits <= 8:
                raise ValueError(f"{pattern!r}: expected bits between 2 and 8, got {bits}")
        return value

    @field_validator("weight_bits")
    @classmethod
    def _weight_bits_range(cls, value: int | str) -> int | str:
        if value != "auto" and not 2 <= int(value) <= 8:
            raise ValueError(f"expected bits between 2 and 8, or auto, got {value}")
        return value

    @field_validator("bits_choices")
    @classmethod
    def _choices_range(cls, value: list[int]) -> list[int]:
        if any(not 2 <= bits <= 8 for bits in value):
            raise ValueError(f"expected bits between 2 and 8, got {value}")
        return sorted(set(value))

    @model_validator(mode="after")
    def _budget_with_auto(self) -> QuantizeConfig:
        if (self.weight_bits == "auto") != (self.budget is not None):
            raise ValueError("budget: given exactly when weight_bits is auto")
        return self


class AdaroundConfig(QuantizeConfig):
    iterations: int = Field(10000, ge=0, description="Adam steps per layer")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    reg_lambda: float = Field(0.01, ge=0)
    beta_start: float = Field(20.0, gt=0)
    beta_end: float = Field(2.0, gt=0)
    warm_start: float = Field(0.2, ge=0, le=1)
    cache_mb: int = Field(2048, ge=1, description="memory for cached layer inputs and targets")
    threads: int | None = Field(None, ge=1, description="CPU threads for the steps; default: timed per layer")
    bias_correction: bool = Field(False, description="after each layer's rounding, add the mean float-minus-"
                                  "quantized output per channel (on the calibration inputs) to its bias")


def _prepare(state: ModelState, cfg: QuantizeConfig, ctx: StageContext) -> tuple[Any, dict[str, Any], Any]:
    if is_quantized(state.model):
        raise BadInput(f"stage {ctx.stage_name!r}: the model is already quantized by an earlier stage")
    layer_bits, auto = dict(cfg.layer_bits), None
    example = ctx.example()
    if cfg.weight_bits == "auto":
        chosen, auto = choose_bits(state, cfg, ctx)
        layer_bits.update(chosen)  # after the recipe's own patterns, which keep the first word
    plan = make_plan(
        state.model,
        weight_bits=8 if cfg.weight_bits == "auto" else cfg.weight_bits,
        activation_bits=None if cfg.activation_bits == "off" else int(cfg.activation_bits),
        layer_bits=layer_bits,
        skip=cfg.skip,
        first_last_8bit=cfg.first_last_8bit,
        residual=cfg.residual_quantizers,
        example=example,
        placement=cfg.placement,
        embeddings=cfg.quantize_embeddings,
    )
    if plan["placement"] == "modules" and cfg.placement == "auto":
        ctx.progress.log(f"{ctx.stage_name}: quantizers placed by module swap ({plan['placement_reason']})")
    # the float model's layer sizes: resume rebuilds a channel-pruned model before quantizing its graph
    plan["structure"] = structure_record(state.model)
    model = build(state.model, plan).eval()
    samples = cfg.calibration_samples or ctx.calibration_samples
    # the samples collated as the model takes them: a tensor, or a tuple/dict of tensors (any dtype)
    inputs = stack_samples(calibration_subset(ctx.data.train, samples, ctx.seed))
    if cfg.smooth_alpha != "off" and plan["placement"] == "modules" and plan["activation_bits"]:
        alphas = smooth_layers(model, inputs, cfg.smooth_alpha, quant_layers(model), ctx.device, cfg.weight_grid)
        plan["smoothed"] = {name: alpha for name, alpha in alphas.items() if alpha is not None}
    for layer in integer_weights(model).values():
        layer.weight_scale.copy_(weight_scales(layer.float_weight, layer.bits, cfg.weight_range, grid=cfg.weight_grid))
    amax = calibrate_activations(
        model, inputs, cfg.act_calibration, percentile=cfg.act_percentile, device=ctx.device,
        unsigned_symmetric=cfg.unsigned_symmetric,
    )  # fmt: skip
    masks = oriented_masks(plan, state.masks)
    for name, layer in integer_weights(model).items():
        set_rtn(layer, masks.get(f"{name}.weight"), cfg.weight_grid)
    if auto is not None:
        plan["auto_bits"] = auto
    return model, plan, (inputs, amax)


def choose_bits(state: ModelState, cfg: QuantizeConfig, ctx: StageContext) -> tuple[dict[str, int], dict[str, Any]]:
    """weight_bits auto: per-layer bits minimising the summed sensitivity within the budget (a knapsack;
    compress/sensitivity.py). Layers the recipe pins (layer_bits, first_last_8bit) keep their bits and
    count against the budget; skipped layers stay float and do not."""
    from fnmatch import fnmatch

    from compress.batches import selected
    from compress.sensitivity import analysis_path, knapsack_bits, quant_sensitivity
    from compress.train import predict

    example = ctx.example()
    pinned_plan = make_plan(state.model, weight_bits=8, activation_bits=None, layer_bits=cfg.layer_bits,
                            skip=cfg.skip, first_last_8bit=cfg.first_last_8bit, example=example)
    names = list(pinned_plan["bits"])
    ends = (names[0], names[-1]) if cfg.first_last_8bit else ()
    pinned = {n: b for n, b in pinned_plan["bits"].items() if n in ends or any(fnmatch(n, p) for p in cfg.layer_bits)}

    def validation(model: Any) -> tuple[float, Any]:  # a context without score_and_outputs (built by hand)
        outputs, _ = predict(model, ctx.data.val, device=ctx.device)
        return float(ctx.evaluate(model)), selected(outputs, ctx.output)

    score = ctx.score_and_outputs or validation  # the validation metric, and the outputs it reads
    path = analysis_path(ctx.stage_dir) if ctx.stage_dir is not None else None
    class_scores = ctx.metric.reads_class_scores if ctx.metric is not None else True
    analysis = quant_sensitivity(state, cfg.bits_choices, cfg.weight_range, score, path, ctx.progress,
                                 getattr(cfg, "weight_grid", None), class_scores=class_scores, example=example)
    weights = {n: analysis.layers[n]["weights"] for n in names}
    assert cfg.budget is not None
    capacity = (cfg.budget.average_bits * sum(weights.values()) if cfg.budget.average_bits is not None
                else 8 * cfg.budget.weight_bytes)
    free = [n for n in names if n not in pinned]
    costs = {n: {b: c for b, c in analysis.costs(cfg.auto_measure)[n].items() if b in cfg.bits_choices} for n in free}
    chosen = knapsack_bits(costs, {n: weights[n] for n in free}, capacity - sum(weights[n] * b for n, b in pinned.items()))
    bits = {**pinned, **chosen}
    total_bits = sum(weights[n] * bits[n] for n in names)
    info = {
        "budget": cfg.budget.model_dump(mode="json", exclude_none=True),
        "measure": cfg.auto_measure,
        "choices": cfg.bits_choices,
        "average_bits": total_bits / sum(weights.values()),
        "weight_bytes": math.ceil(total_bits / 8),
        "summed_sensitivity": sum(costs[n][b] for n, b in chosen.items()),
        **({"divergence": analysis.divergence} if cfg.auto_measure == "kl" else {}),
        "pinned": sorted(pinned),
        "sensitivity": str(path) if path is not None else None,
    }
    ctx.progress.log(
        f"{ctx.stage_name}: bits auto: average {info['average_bits']:.2f} bits, {info['weight_bytes']} weight bytes "
        f"(budget {info['budget']}), per layer " + ", ".join(f"{n} {b}" for n, b in bits.items())
    )
    return chosen, info


def _finish(
    state: ModelState, model: Any, plan: dict[str, Any], cfg: QuantizeConfig, amax: dict[str, float], ctx: StageContext
) -> dict[str, Any]:
    for layer in integer_weights(model).values():
        layer.drop_float_weight()
    state.model, state.quant = model, plan
    ctx.progress.log(
        f"{ctx.stage_name}: {len(plan['bits'])} layers quantized "
        f"(W{'/'.join(str(b) for b in sorted(set(plan['bits'].values())))}, A{cfg.activation_bits}), "
        f"{len(plan['folded'])} BatchNorms folded"
    )
    return {
        "bits": plan["bits"],
        "weight_bits": cfg.weight_bits,
        "activation_bits": cfg.activation_bits,
        "first_last_8bit": cfg.first_last_8bit,
        **({"auto_bits": plan["auto_bits"]} if "auto_bits" in plan else {}),
        "float_layers": plan["float_layers"],
        "folded_bn": plan["folded"],
        "weight_range": cfg.weight_range,
        "weight_grid": cfg.weight_grid,
        "act_calibration": cfg.act_calibration,
        "activation_quantizers": len(act_quantizers(model)),
        "placement": plan.get("placement", "graph"),
        **({"placement_reason": plan["placement_reason"]} if "placement_reason" in plan else {}),
        **({"attention": plan["attention"]} if plan.get("attention") else {}),
        "quantized_matmuls": sum(plan.get("matmuls", {}).values()),
        "quantized_embeddings": plan.get("embeddings", []),
        **({"smoothed": plan["smoothed"]} if "smoothed" in plan else {}),
        "calibration_samples": cfg.calibration_samples or ctx.calibration_samples,
        "activation_amax": amax,
        **quantized_stats(model),
    }


def quantized_stats(model: Any) -> dict[str, Any]:
    """Size and zeros as deployed: integer weights in int8 containers (and packed to their bits)."""
    weights = zeros = packed_bits = 0
    per_layer: dict[str, float] = {}
    for name, module in model.named_modules():
        if isinstance(module, (QuantLayer, QuantEmbedding)):
            w, bits = module.weight_int, module.bits
        elif isinstance(module, PRUNABLE_TYPES):  # a layer left in float
            w, bits = module.weight.detach(), 32
        else:
            continue
        layer_zeros = int((w == 0).sum())
        per_layer[name] = layer_zeros / w.numel()
        weights += w.numel()
        zeros += layer_zeros
        packed_bits += w.numel() * bits
    state = model.state_dict()
    bytes_total = sum(t.numel() * t.element_size() for t in state.values())
    int8_bytes = sum(t.numel() for k, t in state.items() if k.endswith(".weight_int"))
    params = weights + sum(t.numel() for k, t in state.items() if k.endswith(".bias"))
    return {
        "sparsity": zeros / weights if weights else 0.0,
        "params": params,
        "params_nonzero": params - zeros,
        "size_bytes": bytes_total,
        "size_bytes_packed": bytes_total - int8_bytes + (packed_bits + 7) // 8 - 4 * (weights - int8_bytes),
        "average_weight_bits": packed_bits / weights if weights else None,  # float layers count 32
        "layer_sparsity": per_layer,
    }


@register_pass("quantize.rtn", QuantizeConfig)
def quantize_rtn(state: ModelState, cfg: QuantizeConfig, ctx: StageContext) -> PassResult:
    model, plan, (_, amax) = _prepare(state, cfg, ctx)
    return PassResult(state, _finish(state, model, plan, cfg, amax, ctx))


@register_pass("quantize.adaround", AdaroundConfig)
def quantize_adaround(state: ModelState, cfg: AdaroundConfig, ctx: StageContext) -> PassResult:
    started = time.perf_counter()
    model, plan, (inputs, amax) = _prepare(state, cfg, ctx)
    prepare_seconds = time.perf_counter() - started
    nodes = {str(n.target): n for n in layer_nodes(model)} if plan.get("placement") != "modules" else {}
    activations = {name: following_activation(model, nodes[name]) if name in nodes else None for name in plan["bits"]}
    settings = AdaRoundSettings(
        iterations=cfg.iterations,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        reg_lambda=cfg.reg_lambda,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        warm_start=cfg.warm_start,
        cache_bytes=cfg.cache_mb * 1024**2,
        seed=ctx.seed,
        weight_grid=cfg.weight_grid,
        threads=cfg.threads,
        bias_correction=cfg.bias_correction,
    )
    reports, subsampled = run_adaround(
        model,
        inputs,
        settings,
        masks=oriented_masks(plan, state.masks),
        activations=activations,
        order=list(plan["bits"]),
        device=ctx.device,
        task=lambda description, total: ctx.progress.task(f"{ctx.stage_name}: {description}", total),
    )
    if subsampled:
        ctx.progress.log(
            f"{ctx.stage_name}: cache budget {cfg.cache_mb} MB: subsampled calibration data for "
            + ", ".join(f"{k} ({v})" for k, v in subsampled.items())
        )
    info = _finish(state, model, plan, cfg, amax, ctx)
    info.update(
        {
            "iterations": cfg.iterations,
            "adaround_seconds": sum(r.seconds for r in reports),
            "prepare_seconds": prepare_seconds,
            "layers": [
                {
                    "name": r.name,
                    "bits": r.bits,
                    "seconds": r.seconds,
                    "loss_before": r.loss_before,
                    "loss_after": r.loss_after,
                    "samples": r.samples,
                    "activation_in_loss": r.activation,
                    "threads": r.extra.get("threads"),
                }
                for r in reports
            ],
            "cache": {"budget_mb": cfg.cache_mb, "subsampled": subsampled},
        }
    )
    return PassResult(state, info)
