"""AdaRound (Nagel et al. 2020), layer by layer, as ../shared/ALGORITHMS.md section 3 lays it out.

For each quantized layer in forward order, on cached calibration data:
  inputs  x~ = the layer's (activation-quantized) input in the model whose earlier layers are already
               hard-rounded: the "asymmetric" reconstruction, so later layers correct earlier errors;
  targets y  = f(W x) from the BN-folded float model, f the ReLU/ReLU6 that follows the layer, if any;
  W~ = s * clip(floor(W/s) + h(V), qmin, qmax), h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),
       [qmin, qmax] the narrow or full weight grid (compress/quant/grid.py);
  loss = sum over output channels, mean over batch and positions, of (f(W~ x~ + b) - y)^2
         + lambda * sum(1 - |2 h(V) - 1|^beta), the regulariser off for the warm start, then beta
         annealed from beta_start to beta_end by a cosine (as AIMET and torch.ao do);
  Adam on V only; at the end the integers are floor(W/s) + 1[V >= 0], clipped.
Weights a pruning mask holds at zero are multiplied by the mask in W~ and in the integers, so no
rounding decision can move them off zero (0 is on the symmetric grid).

Cost on CPU: each step is a batch-32 conv forward and weight-gradient on one layer, too small for an
intra-op thread pool to pay off when the cores are shared: on a 2-core machine at load ~7, two torch
threads ran these steps 5-10x slower than one (OpenMP workers waiting on descheduled peers). So, unless
`threads` is set, each layer times a few of its own steps with one thread and with torch's thread count
and runs the rest with the faster, timing again every THREAD_PROBE_EVERY steps (the load changes).
The choice does not change the algorithm, only float summation order (results can differ in the last
bits between thread counts: set `threads` for bit-reproducible runs).
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.batches import Nested, batch_len, call_model, slice_batch, to_device
from compress.quant.graph import quant_layers, set_float, snap_biases
from compress.quant.grid import WeightGrid, quantize_weight, weight_qrange
from compress.quant.modules import QuantLayer

ZETA, GAMMA = 1.1, -0.1
ACTIVATIONS: dict[str | None, Callable[[Tensor], Tensor]] = {
    None: lambda x: x,
    "relu": F.relu,
    "relu6": F.relu6,
}


@dataclass
class AdaRoundSettings:
    iterations: int = 10000
    batch_size: int = 32
    lr: float = 1e-3
    reg_lambda: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warm_start: float = 0.2
    cache_bytes: int = 2 * 1024**3
    seed: int = 0
    weight_grid: WeightGrid = "narrow"
    threads: int | None = None  # CPU: torch threads for the steps; None: measured per layer (see above)
    bias_correction: bool = False  # after the rounding: bias += mean float-minus-quantized output per channel


@dataclass
class LayerReport:
    name: str
    bits: int
    seconds: float = 0.0
    loss_before: float = 0.0  # reconstruction loss with round-to-nearest
    loss_after: float = 0.0  # with the learned hard rounding
    samples: int = 0
    activation: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def h_of_v(v: Tensor) -> Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_v(weight_over_scale: Tensor) -> Tensor:
    """V with h(V) = frac(W/s), the soft rounding starting where round-to-nearest's information is."""
    rest = weight_over_scale - torch.floor(weight_over_scale)
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)


def hard_round(w_floor: Tensor, v: Tensor, qmax: int, mask: Tensor | None, qmin: int | None = None) -> Tensor:
    q = torch.clamp(w_floor + (v >= 0).to(w_floor.dtype), -qmax if qmin is None else qmin, qmax)
    return q * mask if mask is not None else q


def beta_at(step: int, settings: AdaRoundSettings) -> float | None:
    """None during the warm start (no regulariser), then cosine from beta_start to beta_end."""
    warm = settings.warm_start * settings.iterations
    if step < warm:
        return None
    progress = (step - warm) / max(settings.iterations - warm, 1)
    return settings.beta_end + 0.5 * (settings.beta_start - settings.beta_end) * (1 + math.cos(progress * math.pi))


def _scale_view(layer: QuantLayer) -> Tensor:
    return layer.weight_scale.view(-1, *([1] * (layer.float_weight.dim() - 1)))


def set_rtn(layer: QuantLayer, mask: Tensor | None, grid: WeightGrid = "narrow") -> None:
    q = quantize_weight(layer.float_weight, layer.weight_scale, layer.bits, grid)
    if mask is not None:
        q = q * mask
    layer.weight_int.copy_(q.to(torch.int8))


def channel_axis(layer: QuantLayer) -> int:
    """Where a layer's output channels are: axis 1 for a convolution, the last axis for a Linear (the same
    axis for [N, C]; tokens [N, L, C] keep their channels last)."""
    return -1 if layer.kind == "Linear" else 1


def reconstruction_loss(out: Tensor, target: Tensor, axis: int = 1) -> Tensor:
    """Sum over output channels (`axis`), mean over everything else: one fused kernel each way (mse_loss)
    instead of sub, pow, sum and mean and their backward."""
    return F.mse_loss(out, target, reduction="sum") * (out.shape[axis] / out.numel())


THREAD_PROBE_STEPS = 6  # steps timed per candidate thread count (the median counts)
THREAD_PROBE_EVERY = 1000


class ThreadChooser:
    """Picks the faster torch thread count for the current layer's steps by timing them (CPU only)."""

    def __init__(self, fixed: int | None, device: torch.device) -> None:
        self.original = torch.get_num_threads()
        if device.type != "cpu":
            self.candidates = [self.original]
        elif fixed is not None:
            self.candidates = [fixed]
        else:
            self.candidates = sorted({1, self.original})
        self.current = self.candidates[-1]
        self.times: dict[int, list[float]] = {}
        self.probe_start = 0
        self._started = 0.0

    def begin(self, step: int) -> None:
        if len(self.candidates) > 1:
            offset = step - self.probe_start
            if offset == 0:
                self.times = {n: [] for n in self.candidates}
            if 0 <= offset < THREAD_PROBE_STEPS * len(self.candidates):
                self.current = self.candidates[offset // THREAD_PROBE_STEPS]
            self._started = time.perf_counter()
        if torch.get_num_threads() != self.current:
            torch.set_num_threads(self.current)

    def end(self, step: int) -> None:
        if len(self.candidates) == 1:
            return
        offset = step - self.probe_start
        if 0 <= offset < THREAD_PROBE_STEPS * len(self.candidates):
            self.times[self.current].append(time.perf_counter() - self._started)
            if offset + 1 == THREAD_PROBE_STEPS * len(self.candidates):
                self.current = min(self.candidates, key=lambda n: statistics.median(self.times[n]))
                self.probe_start = step + THREAD_PROBE_EVERY

    def restart(self) -> None:
        """A new layer: probe again at its first step."""
        self.probe_start = 0

    def restore(self) -> None:
        torch.set_num_threads(self.original)


def _output_numel(layer: QuantLayer, x: Tensor) -> int:
    with torch.no_grad():
        return layer.functional(x, layer.weight).numel()


class _Stop(Exception):
    pass


@torch.no_grad()
def _capture(
    model: nn.Module, layer: QuantLayer, inputs: Nested, want: str, batch: int, device: torch.device
) -> Tensor:
    """The layer's input (want='input') or output ('output') over all inputs (samples of any structure,
    collated), stopping the forward there."""
    chunks: list[Tensor] = []

    def hook(_module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        chunks.append((layer.quantized_input(args[0]) if want == "input" else output).detach())
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        for start in range(0, batch_len(inputs), batch):
            try:
                call_model(model, to_device(slice_batch(inputs, start, start + batch), device))
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(chunks)


@torch.no_grad()
def _eval_loss(layer: QuantLayer, x: Tensor, y: Tensor, act: Callable[[Tensor], Tensor], weight: Tensor) -> float:
    total = 0.0
    for start in range(0, len(x), 256):
        out = act(layer.functional(x[start : start + 256], weight))
        total += float((out - y[start : start + 256]).pow(2).sum(dim=channel_axis(layer)).mean()) * len(out)
    return total / max(len(x), 1)


def optimize_layer(
    layer: QuantLayer,
    x: Tensor,
    y: Tensor,
    act: Callable[[Tensor], Tensor],
    settings: AdaRoundSettings,
    mask: Tensor | None,
    generator: torch.Generator,
    advance: Callable[..., None] | None = None,
    threads: ThreadChooser | None = None,
) -> Tensor:
    """Learn V for one layer on cached (x~, y); returns the final V (the integers are set in `layer`)."""
    scale = _scale_view(layer)
    w_over_s = layer.float_weight / scale
    w_floor = torch.floor(w_over_s)
    qmin, qmax = weight_qrange(layer.bits, settings.weight_grid)
    v = init_v(w_over_s).requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=settings.lr)
    n = len(x)
    batch = min(settings.batch_size, n)
    # the sampled batch is gathered into the same two buffers every step (no allocation per step)
    xb = torch.empty((batch, *x.shape[1:]), dtype=x.dtype, device=x.device)
    yb = torch.empty((batch, *y.shape[1:]), dtype=y.dtype, device=y.device)
    report_every = max(1, min(100, settings.iterations // 20))
    axis = channel_axis(layer)
    if threads is not None:
        threads.restart()
    for step in range(settings.iterations):
        if threads is not None:
            threads.begin(step)
        idx = torch.randperm(n, generator=generator)[:batch].to(x.device)
        torch.index_select(x, 0, idx, out=xb)
        torch.index_select(y, 0, idx, out=yb)
        h = h_of_v(v)
        w_soft = scale * torch.clamp(w_floor + h, qmin, qmax)
        if mask is not None:
            w_soft = w_soft * mask
        recon = reconstruction_loss(act(layer.functional(xb, w_soft)), yb, axis)
        beta = beta_at(step, settings)
        loss = recon
        if beta is not None:
            reg = (1 - (2 * h - 1).abs().pow(beta))
            if mask is not None:
                reg = reg * mask
            loss = recon + settings.reg_lambda * reg.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if threads is not None:
            threads.end(step)
        if advance is not None and ((step + 1) % report_every == 0 or step + 1 == settings.iterations):
            advance(report_every if (step + 1) % report_every == 0 else (step + 1) % report_every,
                    f"iteration {step + 1}/{settings.iterations} recon {float(recon.detach()):.4g}")
    v = v.detach()
    layer.weight_int.copy_(hard_round(w_floor, v, qmax, mask, qmin).to(torch.int8))
    return v


@torch.no_grad()
def correct_bias(layer: QuantLayer, x: Tensor, y_float: Tensor) -> None:
    """Empirical bias correction (Nagel et al. 2019; AIMET's bias_correction): the mean, per output
    channel, of the float layer's output minus the quantized layer's on the same (quantized-model) inputs
    is added to the bias, so the rounded weights' systematic shift does not reach the next layer."""
    total = torch.zeros_like(layer.bias, dtype=torch.float64)
    count = 0
    for start in range(0, len(x), 256):
        error = y_float[start : start + 256] - layer.functional(x[start : start + 256], layer.weight)
        channels = error.transpose(0, 1) if layer.kind != "Linear" else error.movedim(-1, 0)
        total += channels.reshape(channels.shape[0], -1).double().sum(dim=1)
        count += channels[0].numel()
    layer.bias.add_((total / max(count, 1)).to(layer.bias.dtype))


def run_adaround(
    model: nn.Module,
    inputs: Nested,
    settings: AdaRoundSettings,
    *,
    masks: dict[str, Tensor],
    activations: dict[str, str | None],
    device: torch.device,
    task: Callable[[str, int], Any] | None = None,
    order: list[str] | None = None,
) -> tuple[list[LayerReport], dict[str, int]]:
    """AdaRound every QuantLayer of `model` in forward order on `inputs`, the calibration samples collated
    into one batch (a tensor, or a tuple/dict of tensors: `batches.stack_samples`). Every layer must
    already hold its round-to-nearest integers and every activation quantizer its scale. Returns per-layer
    reports and, for layers whose cache would exceed the budget, how many samples were kept.
    order: the layers' names in the order the forward calls them (default: the modules' order)."""
    layers = quant_layers(model)
    if order is not None:
        layers = {name: layers[name] for name in order}
    generator = torch.Generator().manual_seed(settings.seed)
    reports: list[LayerReport] = []
    subsampled: dict[str, int] = {}
    threads = ThreadChooser(settings.threads, device)
    try:
        for index, (name, layer) in enumerate(layers.items()):
            reports.append(_adaround_layer(model, inputs, settings, index, len(layers), name, layer, masks,
                                           activations, device, task, generator, threads, subsampled))
    finally:
        threads.restore()
    return reports, subsampled


def _adaround_layer(
    model: nn.Module,
    inputs: Nested,
    settings: AdaRoundSettings,
    index: int,
    count: int,
    name: str,
    layer: QuantLayer,
    masks: dict[str, Tensor],
    activations: dict[str, str | None],
    device: torch.device,
    task: Callable[[str, int], Any] | None,
    generator: torch.Generator,
    threads: ThreadChooser,
    subsampled: dict[str, int],
) -> LayerReport:
    started = time.perf_counter()
    torch.set_num_threads(threads.current)  # the captures run with the last layer's choice
    mask = masks.get(f"{name}.weight")
    mask = mask.to(device=layer.float_weight.device, dtype=layer.float_weight.dtype) if mask is not None else None
    act = ACTIVATIONS[activations.get(name)]
    # one sample tells the cache's size per sample: the layer's inputs and targets, kept within the budget
    # (the model's samples, of any structure, stay where they are and go to the device a chunk at a time)
    total = batch_len(inputs)
    probe_in = _capture(model, layer, slice_batch(inputs, 0, 1), "input", 1, device)
    per_sample = probe_in.element_size() * (probe_in.numel() + _output_numel(layer, probe_in))
    keep = max(1, min(total, settings.cache_bytes // per_sample))
    if keep < total:
        subsampled[name] = keep
    batch = 256
    kept = slice_batch(inputs, 0, keep)
    x = _capture(model, layer, kept, "input", batch, device)
    set_float(model, True)
    y_pre = _capture(model, layer, kept, "output", batch, device)
    set_float(model, False)
    y = act(y_pre)
    report = LayerReport(name, layer.bits, samples=keep, activation=activations.get(name))
    rtn_weight = layer.weight.clone()
    report.loss_before = _eval_loss(layer, x, y, act, rtn_weight)
    description = f"adaround {index + 1}/{count} {name} (W{layer.bits})"
    if task is not None and settings.iterations > 0:
        with task(description, settings.iterations) as advance:
            optimize_layer(layer, x, y, act, settings, mask, generator, advance, threads)
    else:
        optimize_layer(layer, x, y, act, settings, mask, generator, threads=threads)
    if settings.bias_correction and layer.bias is not None:
        correct_bias(layer, x, y_pre)
        snap_biases(model)  # back onto the int32 grid the runtimes use
    del y_pre
    report.loss_after = _eval_loss(layer, x, y, act, layer.weight)
    report.seconds = time.perf_counter() - started
    report.extra["threads"] = threads.current
    return report
