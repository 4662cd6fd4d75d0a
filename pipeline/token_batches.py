"""Passage encoding split in two: tokenization (CPU) and the model (CPU or GPU). No Ray here: jobs/encode.py runs
the first part in Ray Data tasks and the second in encoder actors; benchmarks call both without Ray.

`tokenize_window` turns passage texts into unpadded token ids, sorts them by length and cuts them into forward-pass
batches sized by tokens: each batch's padded size (rows x its longest row) stays within `max_tokens`, and its rows
within `max_rows`. `pad_batch` makes the model's input tensors of one such batch from the flat ids, and
`plan_token_batches` is the cut itself.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

DEFAULT_MAX_LENGTH = 128        # TextEncoder's truncation unless a saved encoder says otherwise
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def encoder_meta(path: str | Path) -> dict:
    """A saved encoder's latentrag_encoder.json (pooling, normalize, max_length), {} for a plain Hugging Face one."""
    meta = Path(path) / "latentrag_encoder.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}


def encoder_max_length(path: str) -> int:
    """The truncation length the encoder at `path` (resolved) uses."""
    return int(encoder_meta(path).get("max_length", DEFAULT_MAX_LENGTH))


@lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """The encoder's tokenizer, loaded once per process (Ray reuses worker processes across tasks)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def plan_token_batches(lengths: np.ndarray, max_tokens: int, max_rows: int) -> np.ndarray:
    """Forward-pass batch number of each row of `lengths` (ascending token counts): consecutive rows share a
    batch while rows x the batch's longest row (the last one) stays within `max_tokens` and rows within
    `max_rows`. A row longer than `max_tokens` gets a batch of its own."""
    out = np.empty(len(lengths), np.int32)
    batch, rows = 0, 0
    for i, n in enumerate(lengths):
        if rows and ((rows + 1) * int(n) > max_tokens or rows + 1 > max_rows):
            batch, rows = batch + 1, 0
        out[i] = batch
        rows += 1
    return out


def tokenize_window(tokenizer, texts: list[str], max_length: int, max_tokens: int,
                    max_rows: int) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
    """(order, token ids in that order, batch number per row): `texts` tokenized without padding (truncated to
    `max_length`, special tokens as the encoder's own tokenizer call adds them), sorted by token count (stable) and
    cut by `plan_token_batches`. `order[j]` is the input row of output row j."""
    ids = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False,
                    return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
    order = np.argsort(lengths, kind="stable")
    return order, [ids[i] for i in order], plan_token_batches(lengths[order], max_tokens, max_rows)


def pad_batch(values: np.ndarray, offsets: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask [rows, longest] (int64, right-padded with `pad_id`) of rows whose ids lie
    back to back in `values`, row r at values[offsets[r]:offsets[r+1]] (an Arrow list array's layout)."""
    lengths = np.diff(offsets)
    width = int(lengths.max()) if len(lengths) else 0
    mask = np.arange(width)[None, :] < lengths[:, None]
    ids = np.full(mask.shape, pad_id, np.int64)
    ids[mask] = values[offsets[0]:offsets[-1]]          # row-major fill of the True cells = each row's ids in order
    return ids, mask.astype(np.int64)
