"""`builtin:transformer`: a plain nn.TransformerEncoder image classifier (patch embedding, encoder, mean pool).

The smallest model that exercises torch's own transformer layers (nn.TransformerEncoderLayer and its
nn.MultiheadAttention) through every pass; compress.attention makes its attention explicit when built.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from compress.models.registry import register_builtin


class TransformerClassifier(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 32,
        patch: int = 8,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_dim: int = 128,
    ) -> None:
        super().__init__()
        if input_size % patch:
            raise ValueError(f"input_size {input_size} must be a multiple of patch {patch}")
        if dim % heads:
            raise ValueError(f"dim {dim} must be a multiple of heads {heads}")
        tokens = (input_size // patch) ** 2
        self.embed = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.position = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, mlp_dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)
        # nn.TransformerEncoder deep-copies one layer: without this every layer starts identical
        for param in self.encoder.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2) + self.position
        return self.head(self.encoder(x).mean(dim=1))


@register_builtin("transformer")
def transformer(**kwargs) -> TransformerClassifier:
    return TransformerClassifier(**kwargs)
