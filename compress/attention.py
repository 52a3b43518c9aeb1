"""Multi-head attention as explicit layers: a packed qkv Linear, matmuls, softmax, an output Linear.

torch's nn.MultiheadAttention keeps its input projection as a bare parameter and computes attention in
one opaque function (with a fused fast path), and torchvision's Swin passes its weights into a
functional kernel. Neither shows its Linear layers or its matmuls to torch.fx, so quantization could
neither wrap the projections nor place Q/DQ before the attention matmuls, and Torch-Pruning could not
see heads. `convert_attention` (called when a model is built) swaps them for modules that compute the
same function, op for op visible:

    qkv   = Linear(E -> 3*H*d)          packed projection, one Q/DQ'd Gemm/MatMul
    q,k,v = reshape(B, N, 3, H, d)      heads as structured groups of d channels (Torch-Pruning num_heads)
    attn  = softmax((q * d^-0.5) @ k^T [+ bias]) @ v      the two MatMuls get Q/DQ on both inputs
    out   = Linear(H*d -> E)

The attention width H*d is independent of the residual width E, so removing a head removes d rows of
each of q, k, v and d columns of the output projection and nothing else. State-dict keys stay those of
the original modules (nn.MultiheadAttention's in_proj_weight/in_proj_bias load into qkv), so
pretrained torchvision checkpoints still load.

Not handled, with the module path in the error: attention whose key/value come from another tensor
(cross-attention), kdim/vdim different from embed_dim, masks, and Swin V2's cosine attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.errors import BadInput


class UnsupportedLayer(BadInput):
    """A layer a pass cannot handle; the message starts with its module path and says why."""

    def __init__(self, path: str, kind: str, reason: str) -> None:
        super().__init__(f"module {path or '(root)'!r} ({kind}): {reason}")
        self.path, self.kind, self.reason = path, kind, reason


class HeadAttention(nn.Module):
    """Base of the converted attentions: `qkv` packed Linear, `num_heads` heads of `head_dim`."""

    qkv: nn.Linear
    num_heads: int
    head_dim: int
    path: str = ""
    hide_bias: bool = False  # set while Torch-Pruning traces the model (see WindowAttention)

    def _heads(self, x: Tensor, out: nn.Module, dropout: float, source: Tensor | None = None) -> Tensor:
        """Self-attention over tokens x [B, N, E] -> [B, N, out_features]; `source` is what the
        attention bias needs to know (Swin: the feature map the windows came from)."""
        batch, tokens = x.shape[0], x.shape[1]
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
        attn = self._attention_bias(attn, source)
        attn = attn.softmax(dim=-1)
        attn = F.dropout(attn, p=dropout, training=self.training)
        heads = (attn @ v).transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
        return out(heads)

    def _attention_bias(self, attn: Tensor, source: Tensor | None) -> Tensor:
        return attn

    def keep_heads(self, kept: list[int]) -> None:
        """Called after Torch-Pruning removed heads: `kept` are the surviving heads' original indices."""
        self.num_heads = len(kept)


class SelfAttention(HeadAttention):
    """nn.MultiheadAttention (self-attention, no masks), explicit. Call signature and output as torch's."""

    def __init__(self, embed_dim: int, num_heads: int, *, bias: bool, batch_first: bool, dropout: float, path: str) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self.dropout = dropout
        self.path = path
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        # keeps nn.TransformerEncoder(Layer)'s fused fast path (which reads in_proj_weight) switched off
        self._qkv_same_embed_dim = False

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, path: str) -> SelfAttention:
        if not mha._qkv_same_embed_dim:
            raise UnsupportedLayer(path, "MultiheadAttention", "kdim/vdim differ from embed_dim (cross-attention)")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise UnsupportedLayer(path, "MultiheadAttention", "add_bias_kv / add_zero_attn are not supported")
        bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, bias=bias, batch_first=mha.batch_first, dropout=mha.dropout, path=path)
        with torch.no_grad():
            new.qkv.weight.copy_(mha.in_proj_weight)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                new.qkv.bias.copy_(mha.in_proj_bias)
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.to(mha.out_proj.weight.device).train(mha.training)

    @property
    def in_proj_bias(self) -> Tensor | None:  # read by nn.TransformerEncoderLayer's fast-path checks
        return self.qkv.bias

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        if key is not query or value is not query:
            raise UnsupportedLayer(self.path, "MultiheadAttention", "key/value differ from query (cross-attention)")
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise UnsupportedLayer(self.path, "MultiheadAttention", "attention masks are not supported")
        x = query if self.batch_first else query.transpose(0, 1)
        out = self._heads(x, self.out_proj, self.dropout)
        # attention weights are not returned (None), as with need_weights=False
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # a checkpoint of the original nn.MultiheadAttention: its packed projection is this qkv Linear
        for old, new in (("in_proj_weight", "qkv.weight"), ("in_proj_bias", "qkv.bias")):
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# --- Swin: shifted windows --------------------------------------------------------------------------------
# The window bookkeeping depends on the feature map's size (padding, whether to shift), which torch.fx
# cannot see symbolically; these helpers are leaves of the fx graph (torch.fx.wrap), and move data only.
# The projections and matmuls stay in the module's forward, where quantization sees them.


def _spatial(x: Tensor) -> tuple[int, int]:
    # Python ints: the map's size decides padding and shifting (as in torchvision), and an ONNX export
    # fixes it (only the batch axis is dynamic)
    return int(x.shape[1]), int(x.shape[2])


def _effective_shift(height: int, width: int, window: list[int], shift: list[int]) -> list[int]:
    pad_h = height + (window[0] - height % window[0]) % window[0]
    pad_w = width + (window[1] - width % window[1]) % window[1]
    # a window as large as the (padded) map: no shift, as torchvision does
    return [0 if window[0] >= pad_h else shift[0], 0 if window[1] >= pad_w else shift[1]]


def window_partition(x: Tensor, window: list[int], shift: list[int]) -> Tensor:
    """[B, H, W, C] -> [B * windows, window tokens, C]: pad, cyclic shift, partition."""
    batch, channels = x.shape[0], x.shape[3]
    height, width = _spatial(x)
    x = F.pad(x, (0, 0, 0, (window[1] - width % window[1]) % window[1], 0, (window[0] - height % window[0]) % window[0]))
    pad_h, pad_w = int(x.shape[1]), int(x.shape[2])
    s = _effective_shift(height, width, window, shift)
    if sum(s) > 0:
        x = torch.roll(x, shifts=(-s[0], -s[1]), dims=(1, 2))
    x = x.view(batch, pad_h // window[0], window[0], pad_w // window[1], window[1], channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], channels)


def window_mask(attn: Tensor, x: Tensor, window: list[int], shift: list[int]) -> Tensor:
    """attn [B * windows, heads, N, N] plus Swin's -100 mask between tokens of different shifted regions."""
    height, width = _spatial(x)
    s = _effective_shift(height, width, window, shift)
    if sum(s) == 0:
        return attn
    pad_h = height + (window[0] - height % window[0]) % window[0]
    pad_w = width + (window[1] - width % window[1]) % window[1]
    mask = attn.new_zeros((pad_h, pad_w))
    count = 0
    for h in ((0, -window[0]), (-window[0], -s[0]), (-s[0], None)):
        for w in ((0, -window[1]), (-window[1], -s[1]), (-s[1], None)):
            mask[h[0] : h[1], w[0] : w[1]] = count
            count += 1
    windows = (pad_h // window[0]) * (pad_w // window[1])
    mask = mask.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    mask = mask.permute(0, 2, 1, 3).reshape(windows, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
    heads, tokens = attn.shape[1], attn.shape[2]
    attn = attn.view(-1, windows, heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
    return attn.view(-1, heads, tokens, tokens)


def window_reverse(windows: Tensor, x: Tensor, window: list[int], shift: list[int]) -> Tensor:
    """[B * windows, N, C'] back to [B, H, W, C'] of x's map: merge, reverse shift, unpad."""
    batch = x.shape[0]
    height, width = _spatial(x)
    pad_h = height + (window[0] - height % window[0]) % window[0]
    pad_w = width + (window[1] - width % window[1]) % window[1]
    channels = windows.shape[-1]
    out = windows.view(batch, pad_h // window[0], pad_w // window[1], window[0], window[1], channels)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(batch, pad_h, pad_w, channels)
    s = _effective_shift(height, width, window, shift)
    if sum(s) > 0:
        out = torch.roll(out, shifts=(s[0], s[1]), dims=(1, 2))
    return out[:, :height, :width, :].contiguous()


for _name in ("window_partition", "window_mask", "window_reverse"):
    torch.fx.wrap(_name)


class WindowAttention(HeadAttention):
    """torchvision's ShiftedWindowAttention (Swin V1), explicit; same parameter and buffer names."""

    def __init__(self, source: nn.Module, path: str) -> None:
        super().__init__()
        self.window_size = list(source.window_size)
        self.shift_size = list(source.shift_size)
        self.num_heads = source.num_heads
        self.head_dim = source.qkv.out_features // (3 * source.num_heads)
        self.attention_dropout = source.attention_dropout
        self.dropout = source.dropout
        self.path = path
        self.qkv = source.qkv
        self.proj = source.proj
        self.relative_position_bias_table = source.relative_position_bias_table
        self.register_buffer("relative_position_index", source.relative_position_index)

    def relative_position_bias(self) -> Tensor:
        tokens = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index]
        return bias.view(tokens, tokens, -1).permute(2, 0, 1).contiguous().unsqueeze(0)

    def _attention_bias(self, attn: Tensor, source: Tensor | None) -> Tensor:
        assert source is not None
        bias = self.relative_position_bias()
        if self.hide_bias:
            # Torch-Pruning follows autograd: through the bias table it would couple the heads axis to
            # channel indices; keep_heads prunes the table's head columns instead
            bias = bias.detach()
        return window_mask(attn + bias, source, self.window_size, self.shift_size)

    def forward(self, x: Tensor) -> Tensor:
        windows = window_partition(x, self.window_size, self.shift_size)
        out = self._heads(windows, self.proj, self.attention_dropout, source=x)
        out = F.dropout(out, p=self.dropout, training=self.training)
        return window_reverse(out, x, self.window_size, self.shift_size)

    def keep_heads(self, kept: list[int]) -> None:
        super().keep_heads(kept)
        table = self.relative_position_bias_table
        self.relative_position_bias_table = nn.Parameter(table.detach()[:, kept].clone(), requires_grad=table.requires_grad)


# --- conversion --------------------------------------------------------------------------------------------


def _swin_types() -> tuple[type, type | None]:
    try:
        from torchvision.models import swin_transformer as swin
    except ImportError:  # torchvision is an optional extra
        return (), None  # type: ignore[return-value]
    return (swin.ShiftedWindowAttention,), getattr(swin, "ShiftedWindowAttentionV2", None)


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def convert_attention(model: nn.Module) -> list[str]:
    """Replace, in place, every attention this module knows by its explicit form; returns their paths.

    Attention it cannot convert is left as it is (the float passes still run it); quantization and
    structured pruning then refuse it with its path (see `unsupported_attention`).
    """
    v1, v2 = _swin_types()
    converted = []
    for path, module in list(model.named_modules()):
        if v2 is not None and isinstance(module, v2):
            continue
        if type(module) is nn.MultiheadAttention:
            try:
                new: nn.Module = SelfAttention.from_torch(module, path)
            except UnsupportedLayer:
                continue
        elif v1 and type(module) in v1:
            new = WindowAttention(module, path)
        else:
            continue
        _set(model, path, new)
        converted.append(path)
    # torch's encoder forwards branch on tensor properties for their fused path (which these layers no
    # longer take); the explicit subclasses run the same layers without the branching
    for path, module in model.named_modules():
        if type(module) is nn.TransformerEncoderLayer and isinstance(module.self_attn, SelfAttention):
            module.__class__ = ExplicitEncoderLayer
            module.path = path
    for path, module in model.named_modules():
        if type(module) is nn.TransformerEncoder and all(type(m) is ExplicitEncoderLayer for m in module.layers):
            module.__class__ = ExplicitEncoder
            module.path = path
    return converted


class ExplicitEncoderLayer(nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer without the fused fast path (unmasked self-attention only)."""

    path: str = ""

    def forward(  # type: ignore[override]
        self, src: Tensor, src_mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        if src_mask is not None or src_key_padding_mask is not None or is_causal:
            raise UnsupportedLayer(self.path, "TransformerEncoderLayer", "attention masks are not supported")
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), None, None)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, None, None))
        return self.norm2(x + self._ff_block(x))


class ExplicitEncoder(nn.TransformerEncoder):
    """nn.TransformerEncoder without the nested-tensor fast path (no masks)."""

    path: str = ""

    def forward(  # type: ignore[override]
        self, src: Tensor, mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None, is_causal: bool | None = None
    ) -> Tensor:
        if mask is not None or src_key_padding_mask is not None or is_causal:
            raise UnsupportedLayer(self.path, "TransformerEncoder", "attention masks are not supported")
        output = src
        for layer in self.layers:
            output = layer(output)
        return self.norm(output) if self.norm is not None else output


def unsupported_attention(model: nn.Module) -> UnsupportedLayer | None:
    """The first attention module that stayed opaque, as the error to raise, or None."""
    _, v2 = _swin_types()
    for path, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            try:
                SelfAttention.from_torch(module, path)
            except UnsupportedLayer as exc:
                return exc
            return UnsupportedLayer(path, "MultiheadAttention", "not converted to explicit attention (convert_attention)")
        if v2 is not None and isinstance(module, v2):
            return UnsupportedLayer(
                path, type(module).__name__, "Swin V2 cosine attention (logit_scale, cpb_mlp) is not supported"
            )
    return None


def attention_modules(model: nn.Module) -> dict[str, HeadAttention]:
    return {name: m for name, m in model.named_modules() if isinstance(m, HeadAttention)}


# --- transformers' attention, as loaded ------------------------------------------------------------------
# Hugging Face models keep q, k and v as separate Linear layers and split heads with view(..., -1, d), so
# Torch-Pruning sees whole heads once it is told each projection's head count (its examples for HF BERT
# and ViT); only the modules' own head-count attributes need setting afterwards.

_SEPARATE_QKV = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))
_HEAD_COUNTS = ("num_attention_heads", "num_heads")
_HEAD_SIZES = ("attention_head_size", "head_dim")
# what head pruning changes on such a module: BERT's all_head_size, GPT-2's split_size (c_attn's q, k, v widths)
HEAD_COUNT_ATTRIBUTES = (*_HEAD_COUNTS, "all_head_size", "split_size")


@dataclass(eq=False)
class TransformersHeads:
    """A `transformers` attention module with separate q, k, v Linear layers of heads x head_dim features
    (BERT's BertSelfAttention, ViT's ViTAttention): what head pruning needs to know and to update."""

    path: str
    module: nn.Module
    projections: tuple[nn.Linear, ...]  # q, k, v
    count: str  # the module's head-count attribute (head_count_attribute)
    head_dim: int

    @property
    def num_heads(self) -> int:
        return int(getattr(self.module, self.count))

    def sync(self) -> None:
        """After Torch-Pruning removed heads: the module's head count (and BERT's all_head_size) as its
        q/k/v layers now hold them (the forward reshapes with -1 heads; these keep the module honest)."""
        width = self.projections[0].out_features
        setattr(self.module, self.count, width // self.head_dim)
        if isinstance(getattr(self.module, "all_head_size", None), int):
            self.module.all_head_size = width


def head_count_attribute(module: nn.Module) -> str | None:
    """Where a `transformers` attention module keeps its head count (num_attention_heads: BERT, ViT;
    num_heads: GPT-2); None for any other module."""
    if not type(module).__module__.startswith("transformers."):
        return None
    return next((name for name in _HEAD_COUNTS if isinstance(getattr(module, name, None), int)), None)


def transformers_attention(model: nn.Module) -> dict[str, TransformersHeads]:
    """Every `transformers` attention module whose heads Torch-Pruning can remove whole, by path. One that
    cannot (a packed projection, grouped-query k/v, no q/k/v Linear layers) is an UnsupportedLayer naming
    it; GPT-2's packed Conv1D c_attn never comes here (channels.ChannelPruner: compress.conv1d_channels)."""
    found: dict[str, TransformersHeads] = {}
    for path, module in model.named_modules():
        count = head_count_attribute(module)
        if count is None:
            continue
        kind = type(module).__name__
        children = dict(module.named_children())
        names = next((n for n in _SEPARATE_QKV if all(type(children.get(c)) is nn.Linear for c in n)), None)
        if names is None:
            layers = ", ".join(
                f"{name} ({type(child).__name__})" for name, child in children.items() if any(True for _ in child.parameters())
            ) or "no layers"
            raise UnsupportedLayer(
                path, kind,
                "granularity channels: head pruning needs separate q/k/v nn.Linear layers (query/key/value or "
                f"q_proj/k_proj/v_proj); this attention has {layers}, a packed projection its forward splits. "
                "Prune it unstructured or nm",
            )  # fmt: skip
        projections = tuple(children[name] for name in names)
        heads = int(getattr(module, count))
        head_dim = next(
            (int(getattr(module, name)) for name in _HEAD_SIZES if isinstance(getattr(module, name, None), int)),
            projections[0].out_features // heads,
        )
        widths = [layer.out_features for layer in projections]
        if widths != [heads * head_dim] * 3:
            raise UnsupportedLayer(
                path, kind,
                f"granularity channels: q/k/v have {widths} features for {heads} heads of {head_dim} "
                "(grouped-query attention is not supported); prune it unstructured or nm",
            )  # fmt: skip
        found[path] = TransformersHeads(path, module, projections, count, head_dim)
    return found
