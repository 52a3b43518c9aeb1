"""quantize.rtn and quantize.adaround on models that are not image classifiers: a segmentation model with a
dict output, a detector head returning a (boxes, scores) tuple, token ids through an embedding, and
samples given as a dict of several inputs. Real torchvision models, unlabelled random data, fidelity
against the float model's outputs (the `cosine` metric)."""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from compress.batches import call_model, flat_outputs
from compress.metrics import cosine
from compress.passes.quantize_adaround import AdaroundConfig, QuantizeConfig, quantize_adaround, quantize_rtn
from compress.quant import is_quantized
from compress.quant.graph import act_quantizers, quant_layers
from compress.state import ModelState
from compress.train import predict, recalibrate_batchnorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_helpers import DictSamples, cosine_context  # noqa: E402


class SSDLiteHead(nn.Module):
    """ssdlite320_mobilenet_v3_large's backbone and head without anchors or post-processing."""

    def __init__(self) -> None:
        super().__init__()
        detector = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=5
        )
        self.backbone, self.head = detector.backbone, detector.head

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.backbone(x)
        head = self.head(list(features.values()))
        return head["bbox_regression"], head["cls_logits"]


class TokenModel(nn.Module):
    """Token ids [B, L] (int64) -> embedding -> two Linear layers -> pooled [B, 8]; an optional mask the
    data may leave out (then it is traced at its default, None)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.fc2(torch.relu(self.fc1(self.embed(ids))))
        if mask is not None:
            h = h * mask[..., None]
        return h.mean(dim=1)


def _images(shape: tuple[int, ...], count: int = 16) -> TensorDataset:
    return TensorDataset(torch.randn(count, *shape, generator=torch.Generator().manual_seed(0)))


def _trained_like(model: nn.Module, data: Dataset) -> nn.Module:
    """BatchNorm statistics measured on the data, as after training: with torch's initial ones (mean 0,
    variance 1) a random MobileNetV3's signal fades layer by layer and its outputs are mostly biases."""
    recalibrate_batchnorm(model, data)
    return model.eval()


def _lraspp() -> nn.Module:
    return torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4)


def _deeplab() -> nn.Module:
    return torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=4, aux_loss=False
    )


def _quantize(model: nn.Module, dataset: Dataset, method: str, residual: str, bits: int = 8) -> Any:
    """The pass's result (state: the quantized model and its plan; info: the stage's entry)."""
    model = model.eval()
    ctx = cosine_context(model, dataset)
    # min-max weight ranges: the MSE search costs seconds per model and is tested elsewhere
    common = {"weight_bits": bits, "activation_bits": 8, "residual_quantizers": residual, "weight_range": "minmax"}
    if method == "rtn":
        result = quantize_rtn(ModelState(copy.deepcopy(model)), QuantizeConfig(**common), ctx)
    else:
        cfg = AdaroundConfig(**common, iterations=10, batch_size=4, threads=1)
        result = quantize_adaround(ModelState(copy.deepcopy(model)), cfg, ctx)
    return result


def _check_fidelity(float_model: nn.Module, quantized: nn.Module, dataset: Dataset, minimum: float = 0.9) -> None:
    assert is_quantized(quantized)
    assert quant_layers(quantized) and act_quantizers(quantized)
    want, _ = predict(float_model.eval(), dataset)
    got, _ = predict(quantized, dataset)
    assert type(got) is type(want) or (isinstance(got, dict) and isinstance(want, dict))
    flat_got, flat_want = flat_outputs(got), flat_outputs(want)
    assert list(flat_got) == list(flat_want)
    assert all(flat_got[k].shape == flat_want[k].shape for k in flat_want)
    fidelity = cosine(got, want)
    print(f"cosine {fidelity:.4f}")
    assert fidelity > minimum


# Thresholds: random weights amplify small changes layer by layer (in the detector head, quantizing the
# input image alone costs 0.017 of cosine), so the deep MobileNetV3 models keep a margin below what W8A8
# measured here (lraspp 0.988, deeplabv3 0.921, detector head 0.904-0.912); the token model measured 1.000.


@pytest.mark.parametrize("method", ["rtn", pytest.param("adaround", marks=pytest.mark.slow)])
@pytest.mark.parametrize("residual", ["skip", "both"])
def test_segmentation_model_with_a_dict_output(method: str, residual: str) -> None:
    torch.manual_seed(0)
    data = _images((3, 64, 64))
    model = _trained_like(_lraspp(), data)
    result = _quantize(model, data, method, residual)
    quantized, info = result.state.model, result.info
    out = call_model(quantized, data[0][0][None])
    assert isinstance(out, dict) and list(out) == ["out"] and out["out"].shape == (1, 4, 64, 64)
    assert info["activation_quantizers"] > 0 and len(info["bits"]) == len(quant_layers(quantized))
    _check_fidelity(model, quantized, data, minimum=0.95)


@pytest.mark.parametrize("residual", ["skip", "both"])
def test_deeplabv3_quantizes(residual: str) -> None:
    torch.manual_seed(0)
    data = _images((3, 64, 64))
    model = _trained_like(_deeplab(), data)
    quantized = _quantize(model, data, "rtn", residual).state.model
    _check_fidelity(model, quantized, data, minimum=0.88)


@pytest.mark.parametrize("method", ["rtn", pytest.param("adaround", marks=pytest.mark.slow)])
def test_detector_head_with_a_tuple_output(method: str) -> None:
    torch.manual_seed(0)
    data = _images((3, 128, 128), count=16 if method == "rtn" else 8)
    model = _trained_like(SSDLiteHead(), data)
    quantized = _quantize(model, data, method, "both" if method == "rtn" else "skip").state.model
    boxes, scores = call_model(quantized, data[0][0][None])
    assert boxes.shape[-1] == 4 and scores.shape[-1] == 5 and boxes.shape[1] == scores.shape[1]
    _check_fidelity(model, quantized, data, minimum=0.88)


@pytest.mark.parametrize("method", ["rtn", "adaround"])
def test_token_ids_through_an_embedding(method: str) -> None:
    torch.manual_seed(0)
    model = TokenModel().eval()
    data = TensorDataset(torch.randint(0, 50, (16, 12), generator=torch.Generator().manual_seed(0)))
    result = _quantize(model, data, method, "skip")
    quantized, info = result.state.model, result.info
    assert sorted(info["bits"]) == ["fc1", "fc2"]  # the embedding stays float
    assert isinstance(quantized.get_submodule("embed"), nn.Embedding)
    _check_fidelity(model, quantized, data, minimum=0.95)


def test_dict_samples_and_an_input_the_data_leaves_out_survive_a_checkpoint() -> None:
    torch.manual_seed(0)
    model = TokenModel().eval()
    ids = torch.randint(0, 50, (16, 12), generator=torch.Generator().manual_seed(0))
    for mask in (None, (ids % 3 != 0).float()):
        data = DictSamples(ids=ids, mask=mask)
        state = _quantize(model, data, "adaround", "skip").state
        quantized = state.model
        _check_fidelity(model, quantized, data, minimum=0.95)
        assert state.quant["inputs"] == (["ids"] if mask is None else ["ids", "mask"])
        # a stage checkpoint rebuilds the same graph (mask fixed at None or not) on the original architecture
        payload = state.checkpoint()
        rebuilt = ModelState.from_checkpoint(TokenModel().eval(), payload).model
        batch = {"ids": ids[:4], **({"mask": mask[:4]} if mask is not None else {})}
        assert torch.equal(call_model(rebuilt, batch), call_model(quantized, batch))


def test_auto_bits_on_unlabelled_data_ranks_by_noise_to_signal() -> None:
    torch.manual_seed(0)
    model = TokenModel().eval()
    data = TensorDataset(torch.randint(0, 50, (16, 12), generator=torch.Generator().manual_seed(0)))
    cfg = QuantizeConfig(weight_bits="auto", budget={"average_bits": 5}, bits_choices=[4, 8])
    result = quantize_rtn(ModelState(copy.deepcopy(model)), cfg, cosine_context(model, data))
    auto = result.info["auto_bits"]
    assert auto["divergence"] == "noise_to_signal"
    assert auto["average_bits"] <= 5 and set(result.info["bits"].values()) <= {4, 8}
