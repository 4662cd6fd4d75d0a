"""Shared by the causal-generator benchmarks (causal_step_bench.py, causal_gpu_check.py): a RagModel whose generator
is a random-weight decoder-only model built from a config (no download) with the embedded MiniLM's WordPiece
tokenizer, a tiny trainable query encoder over an in-memory index, the real rag-sequence training step
(`RagTrainer`), token counts and model FLOPs.

No Ray, MLflow or FAISS search: it runs on a bare CUDA machine with torch, transformers and peft (FAISS is stubbed
where missing)."""
from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import nn

WORDS = ("alpha river town guild north stone lamp green harbor mill bridge tower meadow copper lantern orchard "
         "falcon quarry market chapel barley window anchor candle ferry forge hollow island juniper kettle").split()


class HashEncoder(nn.Module):
    """A question -> the mean of trainable embeddings of its hashed words: a differentiable query encoder that costs
    next to nothing, so the step time is the generator's."""

    def __init__(self, dim: int = 64, buckets: int = 4096, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.buckets = buckets
        self.table = nn.EmbeddingBag(buckets, dim, mode="mean")
        with torch.no_grad():
            self.table.weight.copy_(torch.randn(buckets, dim, generator=g) / dim ** 0.5)

    def forward(self, texts):
        ids = [[zlib.crc32(w.encode()) % self.buckets for w in t.lower().split()] or [0] for t in texts]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        flat = torch.tensor([x for i in ids for x in i])
        device = self.table.weight.device
        return self.table(flat.to(device), offsets.to(device))


def passage_texts(n: int, words: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(WORDS[j] for j in rng.integers(0, len(WORDS), words)) + f" item{i}." for i in range(n)]


def random_index(n: int, dim: int, words: int, seed: int = 0):
    """Exact inner-product search over n random vectors, passages of `words` words each."""
    from pipeline.index import ArrayIndex

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    return ArrayIndex(emb, texts=passage_texts(n, words, seed), titles=[f"Title {i}" for i in range(n)])


def question_rows(n: int) -> list[dict]:
    return [{"id": f"q{i}", "question": f"which harbor town near the river keeps item{i} and why",
             "answers": [f"the copper lantern of item{i}"]} for i in range(n)]


def minilm_tokenizer():
    """The embedded MiniLM's WordPiece tokenizer (the one tokenizer every install has), with [SEP] as EOS: a
    causal generator ends answers with EOS and pads with [PAD]."""
    from transformers import AutoTokenizer

    from pipeline.models.retriever import resolve_encoder_path

    tok = AutoTokenizer.from_pretrained(resolve_encoder_path("minilm"))
    tok.eos_token = tok.sep_token
    return tok


def build_rag(model, tokenizer, *, lora: dict | None, index, max_source_length: int, max_target_length: int = 16,
              dtype: str = "float32", gradient_checkpointing: bool = False, device="cpu"):
    from pipeline.models.hf_causal import HFCausalGenerator
    from pipeline.rag import RagModel

    gen = HFCausalGenerator(model, tokenizer, lora=lora, max_source_length=max_source_length,
                            max_target_length=max_target_length, dtype=dtype,
                            gradient_checkpointing=gradient_checkpointing)
    return RagModel(HashEncoder(index.dim), gen, index, tau=1.0).to(device)


def make_trainer(model, rows, *, k: int, batch_size: int, lr: float, autocast: str | None = None):
    """The project's training step: rag-sequence over the top-k, generator and query encoder trained, AdamW."""
    from pipeline.config import TrainConfig
    from pipeline.estimators import build_estimator
    from pipeline.training import RagTrainer

    cfg = TrainConfig(batch_size=batch_size, max_steps=10_000, warmup_steps=0, lr_decay="constant", k=k,
                      grad_clip=1.0)
    return RagTrainer(model, build_estimator("rag-sequence", k=k), rows, cfg, retriever_lr=1e-3, generator_lr=lr,
                      autocast=autocast)


@torch.no_grad()
def next_step_lengths(trainer, k: int) -> tuple[list[int], list[int]]:
    """(row lengths, answer positions) of the (question, passage) rows the trainer's next step feeds the generator:
    real prompt + answer + EOS tokens per row, padding excluded, and the logit positions read per row (answer +
    EOS). Computed with the weights the step starts from, so the retrieved passages are the step's own."""
    model = trainer.model
    rows = [trainer.rows[i] for m in range(trainer.accum_steps) for i in trainer.order.indices(trainer.step_num, m)]
    cands = model.retrieve([r["question"] for r in rows], k)
    gen = model.generator
    questions = [r["question"] for r in rows for _ in range(k)]
    answers = [r["answers"][0] for r in rows for _ in range(k)]
    inputs = gen.encode_inputs(questions, [t for texts in cands.texts for t in texts])
    _, mask = gen.encode_targets(answers)
    answer = mask.sum(1)
    return (inputs["attention_mask"].sum(1) + answer).tolist(), answer.tolist()


def parameter_counts(model) -> dict:
    """Parameters of the generator by what they cost per token: `body` (every linear weight of the decoder layers, the
    LoRA adapters included), `lm_head` (V x d, applied at the answer positions only), `embedding` (a lookup, no
    FLOPs), `trainable`, `lora` (the adapters) and `total` (the embedding counted once when tied)."""
    gen = model.generator
    base = gen._base()
    emb = base.get_input_embeddings().weight
    head = base.get_output_embeddings().weight
    seen, body, lora, total, trainable = set(), 0, 0, 0, 0
    for name, p in gen.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
        if "lora_" in name:
            lora += p.numel()
        if p is emb or p is head or p.dim() < 2:
            continue
        body += p.numel()
    return {"total": total, "trainable": trainable, "lora": lora, "body": body, "lm_head": head.numel(),
            "embedding": emb.numel(), "tied": emb is head}


def step_flops(counts: dict, lengths: list[int], answer_positions: list[int], num_layers: int, hidden: int,
               full_finetune: bool) -> float:
    """Model FLOPs of one training step (forward + backward), counted on real tokens (padding is waste, not work):

        per token       full fine-tuning: 6 * body          LoRA: 4 * (body - lora) + 6 * lora
        per answer pos. full fine-tuning: 6 * lm_head       LoRA: 4 * lm_head            (logits_to_keep)
        attention       12 * layers * hidden * L per token of a row of L tokens (QK^T and AV, forward 4*L*d per
                        layer, backward twice that; no causal halving, as in PaLM's MFU)

    A frozen weight costs its forward (2 per parameter and token) and the gradient of the activations through it
    (2 more) but no weight gradient (the last 2 of 6). The query encoder (a hashed bag of words) and recomputation
    under gradient checkpointing are not model FLOPs."""
    per_token = 6 * counts["body"] if full_finetune else 4 * (counts["body"] - counts["lora"]) + 6 * counts["lora"]
    head = (6 if full_finetune else 4) * counts["lm_head"]
    attention = sum(12 * num_layers * hidden * L * L for L in lengths)
    return float(per_token * sum(lengths) + head * sum(answer_positions) + attention)
