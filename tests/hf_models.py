"""The kinds of model users bring, tiny and random-init (never downloaded): Hugging Face BERT,
GPT-2 and ViT built from configs through slimline's own loader, and a classifier built from
torch's ``nn.TransformerEncoder`` (``nn.MultiheadAttention`` inside). Shared by the tests of
every stage on user models."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from slimline.data import Dataset
from slimline.inputs import InputSpec

pytest.importorskip("transformers")

from slimline.models.hf import build_hf_model  # noqa: E402

TOPICS = Path(__file__).parent / "fixtures" / "text" / "topics.tsv"
VOCAB = 200
SEQ = 16
TOKENS = InputSpec((SEQ,), "int64", ((5, VOCAB),), cls_id=2, sep_id=3, pad_id=0)
IMAGE = InputSpec((1, 16, 16))
FEATURES = InputSpec((12, 8))

BERT = {"model_type": "bert", "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64,
        "pad_token_id": 0}
GPT2 = {"model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4,
        "n_positions": 64, "bos_token_id": 1, "eos_token_id": 1}
VIT = {"model_type": "vit", "image_size": 16, "patch_size": 4, "num_channels": 1,
       "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
       "intermediate_size": 64, "num_labels": 10}


class TorchEncoderClassifier(nn.Module):
    """A sequence classifier from torch's own layers: Linear in, TransformerEncoder, mean."""

    def __init__(self, features: int = 8, width: int = 32, classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(features, width)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.inp(x)).mean(1))


def bert(task: str = "feature-extraction", **extra) -> nn.Module:
    return build_hf_model({"task": task, "hf_config": {**BERT, **extra}})


def gpt2() -> nn.Module:
    return build_hf_model({"task": "causal-lm", "hf_config": dict(GPT2)})


def vit() -> nn.Module:
    return build_hf_model({"task": "image-classification", "hf_config": dict(VIT)})


# name -> (builder, input spec); every one returns (batch, outputs) or (batch, seq, vocab)
USER_MODELS = {
    "bert": (bert, TOKENS),
    "gpt2": (gpt2, TOKENS),
    "vit": (vit, IMAGE),
    "torch-encoder": (TorchEncoderClassifier, FEATURES),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, InputSpec]:
    torch.manual_seed(seed)
    make, spec = USER_MODELS[name]
    return make().eval(), spec


def dataset(spec: InputSpec, samples: int = 96, classes: int = 10) -> Dataset:
    """Synthetic inputs of ``spec`` with random labels (calibration and shape only)."""
    x = spec.random(samples, seed=1)
    y = torch.randint(0, classes, (samples,), generator=torch.Generator().manual_seed(1))
    a, b = samples * 2 // 3, samples * 5 // 6
    return Dataset("synthetic", x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:], classes, spec=spec)


def write_tokenizer(directory: Path) -> Path:
    """A local BERT word-piece tokenizer over the fixture's words (what a checkpoint ships)."""
    from transformers import BertTokenizer

    words = sorted({w for line in TOPICS.read_text().splitlines()
                    for w in re.findall(r"[a-z]+", line.split("\t", 1)[1].lower())})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(directory)
    return directory
