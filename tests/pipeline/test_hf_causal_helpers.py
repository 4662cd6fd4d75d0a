"""Tiny decoder-only models for the hf-causal tests (no downloads): a byte-level BPE tokenizer trained here on a few
sentences, and random Llama-family / Qwen2-family models (hidden 32, 2 layers) built from configs.

Imported by tests/pipeline/test_hf_causal*.py and tests/serving/test_hf_causal_serving.py (which adds this directory
to sys.path). It holds no tests."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.index import ArrayIndex
from pipeline.rag import POSTERIOR_SEP, RagModel

CORPUS = [
    "Passage: Varnel Ostrik was born in the town of Meridale. Question: Where was Varnel Ostrik born? Answer:",
    "Varnel Ostrik worked for the Quendle Guild. Who employed Varnel Ostrik? Quendle Guild",
    "Kela Dorn plays the zumbrel at festivals. What does Kela Dorn play? zumbrel",
    "Kela Dorn grew up beside the river Ashvane. Ashvane Meridale the a of in and is was by for at to",
    "Title. Text about towns, guilds, inventions and people: 0 1 2 3 4 5 6 7 8 9 user assistant",
]
FAMILIES = ("llama", "qwen2")
# GPT-2 has absolute position embeddings: a wrong position id changes its scores, where RoPE (Llama, Qwen2) is
# blind to the constant shift that left padding adds
ALL_FAMILIES = FAMILIES + ("gpt2",)
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


@functools.cache
def _trained_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>", "<pad>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok.to_str()


def tiny_tokenizer(pad: bool = True, eos: bool = True, bos: bool = True, chat: bool = False):
    """A fresh PreTrainedTokenizerFast (callers may change its pad token). pad=False: no pad token, as Llama's."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
                                  eos_token="<|endoftext|>" if eos else None, pad_token="<pad>" if pad else None,
                                  bos_token="<s>" if bos else None)
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(family: str = "llama", seed: int = 0, vocab_size: int | None = None):
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    vocab = vocab_size or len(tiny_tokenizer())
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=0,
                  bos_token_id=2, pad_token_id=None,
                  initializer_range=0.2)   # sharper than the default 0.02: positions and passages matter
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=512,
                                           eos_token_id=0, bos_token_id=0, initializer_range=0.2,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    else:
        raise ValueError(family)
    return model.eval()


def tiny_generator(family: str = "llama", seed: int = 0, lora: dict | None = None, tokenizer=None, **kwargs):
    from pipeline.models.hf_causal import HFCausalGenerator

    kwargs.setdefault("max_source_length", 96)
    kwargs.setdefault("max_target_length", 8)
    return HFCausalGenerator(tiny_model(family, seed), tokenizer or tiny_tokenizer(), lora=lora, **kwargs)


def lora_settings(**kw) -> dict:
    return {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], **kw}


def save_tiny_base(out_dir: str | Path, family: str = "llama", seed: int = 0, pad: bool = True) -> Path:
    """A tiny model + tokenizer saved as a Hugging Face model directory (what `generator.name_or_path` names)."""
    out_dir = Path(out_dir)
    tiny_model(family, seed).save_pretrained(out_dir)
    tiny_tokenizer(pad=pad).save_pretrained(out_dir)
    return out_dir


# ------------------------------------------------------------------------------ a RagModel over a causal generator
TITLES = ["Varnel Ostrik", "Varnel Ostrik", "Kela Dorn", "Kela Dorn", "Tamsin Vey"]
TEXTS = ["Varnel Ostrik was born in the town of Meridale.", "Varnel Ostrik worked for the Quendle Guild.",
         "Kela Dorn plays the zumbrel at festivals.", "Kela Dorn grew up beside the river Ashvane.",
         "Tamsin Vey sails a boat called the Gullwing, " * 3]
QUESTIONS = ["Where was Varnel Ostrik born?", "What does Kela Dorn play at the festivals of the town?"]
ANSWERS = ["Meridale", "the zumbrel"]


class TableEncoder(nn.Module):
    """A question (or "question [SEP] answer") -> its row of a trainable table: a differentiable query encoder."""

    def __init__(self, questions, dim=8, seed=0, dtype=torch.float32):
        super().__init__()
        self.rows = {q: i for i, q in enumerate(questions)}
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(len(questions), dim, generator=g, dtype=dtype))

    def forward(self, texts):
        return self.table[[self.rows[t.split(POSTERIOR_SEP)[0]] for t in texts]]


def causal_rag(family="llama", lora=True, seed=0, dtype=torch.float32):
    settings = lora_settings(target_modules=["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"])
    gen = tiny_generator(family, seed=seed, lora=settings if lora else None, max_source_length=48)
    gen = gen.to(dtype)
    emb = np.random.default_rng(seed).standard_normal((len(TEXTS), 8)).astype(np.float32)
    index = ArrayIndex(emb, texts=TEXTS, titles=TITLES)
    model = RagModel(TableEncoder(QUESTIONS, dtype=dtype), gen, index, tau=1.0)
    model.posterior_encoder = TableEncoder(QUESTIONS, seed=1, dtype=dtype)
    return model
