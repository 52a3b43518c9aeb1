"""Whole attention heads and MLP channels of transformers' Conv1D blocks (GPT-2), removed by slicing.

Torch-Pruning has no pruner for transformers' Conv1D (a Linear whose weight is stored [in, out]), and
GPT-2's attention packs q, k and v into one c_attn whose output its forward splits at `split_size`. The
groups that must go together are fixed by the blocks' code, so they are named here instead of traced:

  attention (GPT2Attention): head h is columns [h*d, (h+1)*d) of each of c_attn's three output parts
      (q, k, v, each num_heads * d wide) and the same rows of c_proj's weight; the module's num_heads and
      split_size follow (its forward splits at split_size and views with -1 heads of head_dim). embed_dim
      stays: it is the residual width, which c_proj still writes, and the forward does not read it.
  MLP (GPT2MLP): channel j is c_fc's output column j (and bias) and row j of the MLP's c_proj.

The residual width (every LayerNorm's) stays, as channels.ChannelPruner keeps it for other transformers.
Ranking is the rule ChannelPruner gives Torch-Pruning (GroupMagnitudeImportance(p=2) with its defaults):
a channel's importance is the sum of its squared weights over the group's layers (each layer's output
column or input row), divided by the mean over the block's channels; a head's is the mean of its
channels'. Global scope ranks heads against heads and MLP channels against MLP channels across blocks
(at least one head and one channel stay in each); layer scope prunes each block by the ratio. Ratios are
cumulative over steps, of the counts before the first step.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from compress.attention import UnsupportedLayer
from compress.sparsity import transposed_linear_types

Block = TypeVar("Block")


def _normalized(per_channel: Tensor) -> Tensor:
    """Torch-Pruning's 'mean' normaliser: importance relative to the block's mean."""
    return per_channel / per_channel.mean().clamp_min(torch.finfo(per_channel.dtype).tiny)


def _keep_columns(layer: Any, index: Tensor) -> None:
    """A Conv1D's outputs `index` kept: weight columns, bias entries, nf."""
    layer.weight = nn.Parameter(layer.weight.detach()[:, index].clone(), requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(layer.bias.detach()[index].clone(), requires_grad=layer.bias.requires_grad)
    layer.nf = len(index)


def _keep_rows(layer: Any, index: Tensor) -> None:
    """A Conv1D's inputs `index` kept: weight rows, nx."""
    layer.weight = nn.Parameter(layer.weight.detach()[index].clone(), requires_grad=layer.weight.requires_grad)
    layer.nx = len(index)


@dataclass(eq=False)
class PackedHeads:
    """GPT2Attention: c_attn [E, 3 * heads * d] (q, k, v side by side), c_proj [heads * d, E]."""

    path: str
    module: Any  # GPT2Attention
    qkv: Any  # c_attn (Conv1D)
    out: Any  # c_proj (Conv1D)

    @property
    def num_heads(self) -> int:
        return int(self.module.num_heads)

    @property
    def head_dim(self) -> int:
        return int(self.module.head_dim)

    def importance(self) -> Tensor:
        """One score per head."""
        width = self.num_heads * self.head_dim
        columns = self.qkv.weight.detach().float().pow(2).sum(dim=0).view(3, width).sum(dim=0)
        rows = self.out.weight.detach().float().pow(2).sum(dim=1)
        return _normalized(columns + rows).view(self.num_heads, self.head_dim).mean(dim=1)

    def keep(self, heads: Sequence[int]) -> None:
        width, d = self.num_heads * self.head_dim, self.head_dim
        channels = torch.tensor([h * d + i for h in sorted(heads) for i in range(d)], dtype=torch.long)
        _keep_columns(self.qkv, torch.cat([channels + part * width for part in range(3)]))
        _keep_rows(self.out, channels)
        self.module.num_heads = len(heads)
        self.module.split_size = len(heads) * d


@dataclass(eq=False)
class Conv1DMLP:
    """GPT2MLP: c_fc [E, hidden], c_proj [hidden, E]."""

    path: str
    fc: Any  # c_fc (Conv1D)
    proj: Any  # c_proj (Conv1D)

    @property
    def width(self) -> int:
        return int(self.fc.nf)

    def importance(self) -> Tensor:
        """One score per hidden channel."""
        columns = self.fc.weight.detach().float().pow(2).sum(dim=0)
        return _normalized(columns + self.proj.weight.detach().float().pow(2).sum(dim=1))

    def keep(self, channels: Sequence[int]) -> None:
        index = torch.tensor(sorted(channels), dtype=torch.long)
        _keep_columns(self.fc, index)
        _keep_rows(self.proj, index)


def conv1d_blocks(model: nn.Module) -> tuple[list[PackedHeads], list[Conv1DMLP]]:
    """The model's GPT-2 attention and MLP blocks. A Conv1D outside them is an UnsupportedLayer naming it
    (as is cross-attention: its c_attn packs only k and v, its q_attn is separate)."""
    conv1d = transposed_linear_types()

    def is_conv1d(module: Any) -> bool:
        return isinstance(module, conv1d)

    attention: list[PackedHeads] = []
    mlps: list[Conv1DMLP] = []
    claimed: set[Any] = set()
    for path, module in model.named_modules():
        qkv: Any = getattr(module, "c_attn", None)
        out: Any = getattr(module, "c_proj", None)
        fc: Any = getattr(module, "c_fc", None)
        if is_conv1d(qkv) and is_conv1d(out):
            heads = PackedHeads(path, module, qkv, out)
            _check_packed(heads)
            attention.append(heads)
            claimed |= {qkv, out}
        elif is_conv1d(fc) and is_conv1d(out) and fc.nf == out.nx:
            mlps.append(Conv1DMLP(path, fc, out))
            claimed |= {fc, out}
    for path, module in model.named_modules():
        if is_conv1d(module) and module not in claimed:
            raise UnsupportedLayer(
                path, type(module).__name__,
                "granularity channels: a Conv1D outside GPT-2's attention (c_attn, c_proj) and MLP (c_fc, c_proj) "
                "blocks, whose channel groups are not known; prune it unstructured or nm",
            )  # fmt: skip
    return attention, mlps


def _check_packed(heads: PackedHeads) -> None:
    module, kind = heads.module, type(heads.module).__name__
    sizes: dict[str, Any] = {name: getattr(module, name, None) for name in ("num_heads", "head_dim", "split_size")}
    if not all(isinstance(value, int) for value in sizes.values()):
        raise UnsupportedLayer(heads.path, kind, f"granularity channels: packed c_attn without integer {', '.join(sizes)}")
    if getattr(module, "is_cross_attention", False) or hasattr(module, "q_attn"):
        raise UnsupportedLayer(
            heads.path, kind,
            "granularity channels: cross-attention (c_attn packs k and v, q_attn is separate) is not supported; "
            "prune it unstructured or nm",
        )  # fmt: skip
    width = sizes["num_heads"] * sizes["head_dim"]
    if sizes["split_size"] != width or heads.qkv.nf != 3 * width or heads.out.nx != width:
        raise UnsupportedLayer(
            heads.path, kind,
            f"granularity channels: c_attn has {heads.qkv.nf} outputs and c_proj {heads.out.nx} inputs for "
            f"{sizes['num_heads']} heads of {sizes['head_dim']} (split_size {sizes['split_size']})",
        )  # fmt: skip


def _round(keep: int, current: int, round_to: int | None) -> int:
    """Torch-Pruning's round_to: the kept count down to a multiple of round_to (at least one multiple, or
    everything when fewer remain)."""
    if round_to:
        keep = max(keep - keep % round_to, min(current, round_to))
    return max(1, min(keep, current))


def _global_counts(scores: dict[Block, Tensor], count: int) -> dict[Block, int]:
    """How many of each block's entries are among the `count` lowest scores of all blocks (ties: the block
    listed first, then the lower index), never leaving a block without one."""
    owners = list(scores)
    order = sorted((float(value), k, i) for k, owner in enumerate(owners) for i, value in enumerate(scores[owner]))
    taken = dict.fromkeys(owners, 0)
    for _, k, _ in order:
        if count <= 0:
            break
        owner = owners[k]
        if len(scores[owner]) - taken[owner] > 1:
            taken[owner] += 1
            count -= 1
    return taken


def _highest(scores: Tensor, keep: int) -> list[int]:
    return sorted(scores.argsort(descending=True, stable=True)[:keep].tolist())


class Conv1DChannelPruner:
    """channels.ChannelPruner's work on a model of GPT-2 blocks: heads and MLP channels of the blocks whose
    first layer (c_attn, c_fc) is not in `ignored`, in steps whose cumulative ratios are `ratios`."""

    def __init__(
        self,
        model: nn.Module,
        *,
        ratios: Sequence[float],
        global_ranking: bool,
        ignored: Collection[nn.Module],
        round_to: int | None,
    ) -> None:
        attention, mlps = conv1d_blocks(model)
        self.attention = [a for a in attention if a.qkv not in ignored]
        self.mlps = [m for m in mlps if m.fc not in ignored]
        self.ratios = list(ratios)
        self.global_ranking = global_ranking
        self.round_to = round_to
        self.steps_done = 0
        self.initial_heads = {a: a.num_heads for a in self.attention}
        self.initial_channels = {m: m.width for m in self.mlps}

    def step(self) -> None:
        ratio = self.ratios[min(self.steps_done, len(self.ratios) - 1)]
        self.steps_done += 1
        self._prune_heads(ratio)
        self._prune_mlps(ratio)

    def _prune_heads(self, ratio: float) -> None:
        scores = {a: a.importance() for a in self.attention}
        if self.global_ranking:
            total = sum(self.initial_heads.values())
            counts = _global_counts(scores, sum(a.num_heads for a in self.attention) - int(total * (1 - ratio)))
        else:  # Torch-Pruning's per-module head count: ceil(ratio * heads)
            counts = {a: a.num_heads - (n - math.ceil(ratio * n)) for a, n in self.initial_heads.items()}
        for heads in self.attention:
            keep = max(1, heads.num_heads - counts[heads])
            if keep < heads.num_heads:
                heads.keep(_highest(scores[heads], keep))

    def _prune_mlps(self, ratio: float) -> None:
        scores = {m: m.importance() for m in self.mlps}
        if self.global_ranking:
            total = sum(self.initial_channels.values())
            counts = _global_counts(scores, sum(m.width for m in self.mlps) - int(total * (1 - ratio)))
        else:
            counts = {m: m.width - int(n * (1 - ratio)) for m, n in self.initial_channels.items()}
        for mlp in self.mlps:
            keep = _round(mlp.width - counts[mlp], mlp.width, self.round_to)
            if keep < mlp.width:
                mlp.keep(_highest(scores[mlp], keep))
