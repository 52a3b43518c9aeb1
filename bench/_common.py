"""Helpers shared by the bench scripts: the cached reference models, test accuracy, a pass context."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compress.data import DataSplits, load_data  # noqa: E402
from compress.metrics import resolve_metric  # noqa: E402
from compress.models import build_model  # noqa: E402
from compress.progress import RunProgress  # noqa: E402
from compress.recipe import Recipe, load_recipe  # noqa: E402
from compress.reference import obtain_reference  # noqa: E402
from compress.train import predict  # noqa: E402

TOP1 = resolve_metric("top1")
DEMO_RECIPE = ROOT / "recipes" / "mnist-resnet20.yaml"


def reference(arch: str = "resnet20") -> tuple[nn.Module, DataSplits, Recipe]:
    """The demo recipe's reference (trained with its settings, cached in ~/.cache/compress), for `arch`."""
    recipe = load_recipe(DEMO_RECIPE)
    if arch != "resnet20":
        model_cfg = recipe.model.model_copy(update={"arch": f"builtin:{arch}"})
        recipe = recipe.model_copy(update={"name": f"mnist-{arch}", "model": model_cfg})
    data = load_data(recipe.data)
    channels, size, _ = data.input_shape
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.model, in_channels=channels, num_classes=data.num_classes, input_size=size)
    obtain_reference(model, recipe, data, torch.device("cpu"), RunProgress())
    return model.eval(), data, recipe


def test_top1(model: nn.Module, data: DataSplits) -> float:
    return float(TOP1(*predict(model, data.test)))


def calibration_reader(feeds: list[dict[str, Any]]) -> Any:
    """An ONNX Runtime CalibrationDataReader that hands out `feeds` (input name -> numpy batch), once each."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(feeds)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.batches, None)

    return Reader()


def ort_quantize_static(
    fp32: Path,
    data: DataSplits,
    out: Path,
    *,
    unsigned_activations: bool,
    symmetric_activations: bool = False,
    calibration_seed: int = 1,
) -> Path:
    """The peer: ONNX Runtime's quantize_static (QDQ, per-channel int8 weights, MinMax) on 1,024 calibration
    images drawn like our passes draw them (with calibration_seed as a stage's seed). uint8 activations are its CPU default; int8 activations are
    asymmetric (a zero point per tensor: post-ReLU ranges get all 256 levels) unless symmetric_activations,
    TensorRT's form (zero point 0, what our quantizers produce: 128 levels for a post-ReLU range)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationMethod

    from compress.data import calibration_subset, dataset_tensors

    calib, _ = dataset_tensors(calibration_subset(data.train, 1024, calibration_seed))
    feeds = [{"input": calib[i : i + 64].numpy()} for i in range(0, len(calib), 64)]
    quantize_static(
        str(fp32), str(out), calibration_reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8 if unsigned_activations else QuantType.QInt8,
        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": symmetric_activations},
    )  # fmt: skip
    return out
