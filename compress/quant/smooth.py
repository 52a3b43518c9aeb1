"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before quantizing.

Transformer activations (LayerNorm outputs, GELU outputs) have a few channels tens of times larger than
the rest; one per-tensor int8 scale sized for them leaves the others a handful of levels. For a Linear
y = W x, any per-input-channel s gives the same y = (W diag(s)) (x / s). With
s_j = max|x_j|^alpha / max_i |W_ij|^(1-alpha) the input's channels even out and the weight (quantized per
output channel, so it absorbs the spread better) takes the rest. The division is a per-channel Mul
before the input's quantizer (QuantLayer.input_smooth, multiplied in as 1/s; the export carries it as a
Mul feeding QuantizeLinear, as Model-Optimizer's pre_quant_scale does); the weight's columns are scaled
in the float weight the grid and the rounding are then chosen for.

Only layers carrying their own input quantizer (module placement) over channels-last inputs (Linear)
are smoothed. What it gives on all-MiniLM-L6-v2 (W8A8, smooth_alpha auto): bench/hf.py's compress rows.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from compress.batches import Nested
from compress.quant.calibrate import run_model
from compress.quant.graph import set_float
from compress.quant.grid import WeightGrid, quantize_weight, weight_scales
from compress.quant.modules import ActQuant, QuantDequant, QuantLayer

MIN_RANGE = 1e-5
# alpha "auto": per layer, the candidate whose quantized output is closest to the float output on a
# sample of its calibration inputs (None: not smoothed). No single alpha suits every layer and bit width:
# strong smoothing suits 8-bit weights fed by LayerNorm outputs, while at 4 bits the weights can take
# little more spread (on MiniLM, auto picked 0.8-1.0 at W8 and mostly 0.5 or none at W4; issue 19's note)
ALPHAS: tuple[float | None, ...] = (None, 0.5, 0.65, 0.8, 0.9, 1.0)
SAMPLE_ROWS = 4096


def smoothable(layer: QuantLayer) -> bool:
    return layer.kind == "Linear" and layer.input_quant is not None


def _smoothing(x_range: Tensor, weight: Tensor, alpha: float) -> Tensor:
    w_range = weight.abs().amax(dim=0).clamp_min(MIN_RANGE)
    return (x_range.pow(alpha) / w_range.pow(1 - alpha)).clamp_min(MIN_RANGE)


def _output_error(
    x: Tensor, x_range: Tensor, weight: Tensor, bits: int, quantizer: ActQuant, s: Tensor | None, grid: WeightGrid
) -> float:
    """Squared error of the layer's output with its input and weight quantized (min-max ranges: the
    comparison between alphas needs no range search, and costs one matmul per candidate)."""
    target = x @ weight.t()
    if s is not None:
        x, x_range, weight = x / s, x_range / s, weight * s
    step = x_range.max() / quantizer.qmax
    x_q = QuantDequant.apply(x, step, quantizer.qmin, quantizer.qmax, 0)
    scale = weight_scales(weight, bits, "minmax", grid=grid)
    w_q = quantize_weight(weight, scale, bits, grid) * scale[:, None]
    return float((x_q @ w_q.t() - target).pow(2).mean())


@torch.no_grad()
def smooth_layers(
    model: nn.Module,
    inputs: Nested,
    alpha: float | Literal["auto"],
    layers: dict[str, QuantLayer],
    device: torch.device,
    grid: WeightGrid = "full",
) -> dict[str, float | None]:
    """Set every smoothable layer's input_smooth from its float input's per-channel max |x| on `inputs`
    (the calibration samples, collated) and fold s into its float weight; returns each layer's alpha
    (None where `auto` found smoothing no better)."""
    chosen = {name: layer for name, layer in layers.items() if smoothable(layer)}
    amax: dict[str, Tensor] = {}
    samples: dict[str, Tensor] = {}

    def observe(name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            rows = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            x = rows.abs().amax(dim=0)
            amax[name] = torch.maximum(amax[name], x) if name in amax else x
            if alpha == "auto" and name not in samples:
                samples[name] = rows[:SAMPLE_ROWS].clone()

        return hook

    handles = [layer.register_forward_pre_hook(observe(name)) for name, layer in chosen.items()]
    set_float(model, True)
    try:
        run_model(model, inputs, 256, device)
    finally:
        set_float(model, False)
        for handle in handles:
            handle.remove()
    alphas: dict[str, float | None] = {}
    for name, layer in chosen.items():
        if name not in amax:
            continue
        x_range = amax[name].clamp_min(MIN_RANGE)
        weight = layer.float_weight
        best: float | None = alpha if alpha != "auto" else None
        if alpha == "auto":
            assert layer.input_quant is not None
            errors = {
                a: _output_error(samples[name], x_range, weight, layer.bits, layer.input_quant,
                                 None if a is None else _smoothing(x_range, weight, a), grid)
                for a in ALPHAS
            }  # fmt: skip
            best = min(errors, key=lambda a: errors[a])
        alphas[name] = best
        if best is not None:
            s = _smoothing(x_range, weight, best)
            layer.input_smooth = (1.0 / s).to(weight.dtype)
            weight.mul_(s)
    return alphas
