"""Activation ranges from calibration data: min-max, percentile or MSE, per quantizer.

One pass records max|x| (and whether x went negative); percentile and MSE take a second pass that fills
a histogram of |x| over [0, max|x|] and choose amax from it (symmetric grid, so the sign does not matter).
With unsigned_symmetric, a tensor that never went negative on the calibration data gets the unsigned grid:
all 2^bits levels on [0, amax] (twice the resolution of the symmetric grid's nonnegative half).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from compress.batches import Nested, batch_len, call_model, slice_batch, to_device
from compress.quant.graph import act_quantizers, set_float, snap_biases

ActCalibration = Literal["minmax", "percentile", "mse"]
BINS = 4096


class _AbsMax:
    def __init__(self) -> None:
        self.amax = 0.0
        self.negative = False

    def __call__(self, x: Tensor) -> None:
        if x.numel():
            self.amax = max(self.amax, float(x.abs().max()))
            self.negative = self.negative or bool(x.min() < 0)


class _Histogram:
    def __init__(self, amax: float) -> None:
        self.amax = max(amax, 1e-12)
        self.counts = torch.zeros(BINS, dtype=torch.float64)

    def __call__(self, x: Tensor) -> None:
        hist = torch.histc(x.abs().float(), bins=BINS, min=0.0, max=self.amax)
        self.counts += hist.double().cpu()


def run_model(model: nn.Module, inputs: Nested, batch_size: int, device: torch.device) -> None:
    """The model over a collated batch of samples of any structure (`batches.stack_samples`), in chunks."""
    with torch.no_grad():
        for start in range(0, batch_len(inputs), batch_size):
            call_model(model, to_device(slice_batch(inputs, start, start + batch_size), device))


def percentile_amax(hist: _Histogram, percentile: float) -> float:
    cdf = torch.cumsum(hist.counts, 0)
    if cdf[-1] <= 0:
        return hist.amax
    index = int(torch.searchsorted(cdf, cdf[-1] * percentile / 100.0))
    return hist.amax * min(index + 1, BINS) / BINS


def mse_amax(hist: _Histogram, qmax: int) -> float:
    """amax among the histogram's bin edges minimising the expected squared quantization error.

    Candidates from 1/16 of the range up: every 32nd edge first, then every edge within 32 of the best
    (a coarse-to-fine search, ~6x fewer candidates than every 4th edge, and finer); empty bins skipped."""
    width = hist.amax / BINS
    filled = hist.counts > 0
    centers = ((torch.arange(BINS, dtype=torch.float64) + 0.5) * width)[filled]
    counts = hist.counts[filled]

    def errors(edges: Tensor) -> Tensor:
        scale = (edges * width / qmax)[:, None]
        q = torch.clamp(torch.round(centers[None, :] / scale), max=qmax) * scale
        return ((centers[None, :] - q).pow(2) * counts[None, :]).sum(dim=1)

    coarse = torch.arange(BINS // 16, BINS + 1, 32, dtype=torch.float64)
    best = float(coarse[int(torch.argmin(errors(coarse)))])
    fine = torch.arange(max(BINS // 16, best - 32), min(BINS, best + 32) + 1, dtype=torch.float64)
    return float(fine[int(torch.argmin(errors(fine)))] * width)


@torch.no_grad()
def calibrate_activations(
    model: nn.Module,
    inputs: Nested,
    method: ActCalibration,
    *,
    percentile: float = 99.99,
    batch_size: int = 256,
    device: torch.device = torch.device("cpu"),
    unsigned_symmetric: bool = False,
) -> dict[str, float]:
    """Set every ActQuant's scale (and, with unsigned_symmetric, its zero point) from the float (BN-folded)
    model's activations on `inputs` (the calibration samples collated into one batch: a tensor, or a
    tuple/dict of tensors the model takes as model(*x) / model(**x)), then round the layers' biases onto
    their int32 grids (graph.snap_biases); returns name -> amax."""
    quantizers = act_quantizers(model)
    if not quantizers:
        return {}
    set_float(model, True)
    try:
        absmax = {name: _AbsMax() for name in quantizers}
        for name, q in quantizers.items():
            q.mode, q.observer = "observe", absmax[name]
        run_model(model, inputs, batch_size, device)
        amax = {name: obs.amax for name, obs in absmax.items()}
        unsigned = {name: unsigned_symmetric and not obs.negative for name, obs in absmax.items()}
        if method != "minmax":
            hists = {name: _Histogram(amax[name]) for name in quantizers}
            for name, q in quantizers.items():
                q.observer = hists[name]
            run_model(model, inputs, batch_size, device)
            for name, q in quantizers.items():
                amax[name] = (
                    percentile_amax(hists[name], percentile)
                    if method == "percentile"
                    else mse_amax(hists[name], q.qmax - q.qmin if unsigned[name] else q.qmax)
                )
    finally:
        for q in quantizers.values():
            q.observer = None
        set_float(model, False)
    for name, q in quantizers.items():
        q.set_amax(amax[name], unsigned=unsigned[name])
    snap_biases(model)
    return amax
