"""Generators: p(y | x, z) for every (question, passage) pair of a batch in one forward pass.

`copy-bart` is the embedded default: a small BART built from config (random init) with a copy head
(pointer-generator, See et al. 2017). At initialisation the copy head attends almost uniformly over the source, so
p(answer | passage) is already much higher for passages that contain the answer's tokens: the retriever gets a real
signal from step one, and reading (where to copy from) is learnt within the demo budget. Hugging Face seq2seq and
decoder-only models (`hf-seq2seq`, `hf-causal`) are the choice for real runs; all kinds share one interface:

    inputs = gen.encode_inputs(questions, passages)       # flat lists of equal length N
    labels, mask = gen.encode_targets(answers)            # [N, T]
    gen.token_logprobs(inputs, labels) -> [N, T]          # log p(y_t | x, z, y_<t), 0 on padding
    state = gen.start_decoding(inputs); gen.decode_step(state, prefix) -> [N, V]   # decoding
"""
from __future__ import annotations

import copy
import inspect
import json
import math
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.retriever import resolve_encoder_path

_LOG_EPS = float(torch.log(torch.tensor(1e-12)))      # what CopyBart._mix gives a token with no mass
_NO_STOP = -1e4                                         # copy-bart's stop-slot logit where no span can end


def _load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_encoder_path(name_or_path))


class SerialTokenizer:
    """A tokenizer that several threads may call (the serving Generator decodes streams beside batches): a Hugging
    Face fast tokenizer sets its truncation and padding on the shared Rust object at every call, so two threads'
    calls interleave them ("Truncation error: Second sequence not provided"). Every method call holds one lock;
    attributes read through."""

    def __init__(self, tokenizer):
        object.__setattr__(self, "_tok", tokenizer)
        object.__setattr__(self, "_lock", threading.RLock())

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._tok(*args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("__") or name in ("_tok", "_lock"):
            raise AttributeError(name)
        attr = getattr(self._tok, name)
        if not callable(attr) or isinstance(attr, type):
            return attr

        def locked(*args, **kwargs):
            with self._lock:
                return attr(*args, **kwargs)
        return locked

    def __setattr__(self, name, value):           # e.g. tokenizer.pad_token = eos reaches the tokenizer itself
        if name in ("_tok", "_lock"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._tok, name, value)

    def __len__(self):
        return len(self._tok)

    def __deepcopy__(self, memo):
        return SerialTokenizer(copy.deepcopy(self._tok, memo))

    def __getstate__(self):
        return {"tok": self._tok}

    def __setstate__(self, state):
        object.__setattr__(self, "_tok", state["tok"])
        object.__setattr__(self, "_lock", threading.RLock())


class Generator(nn.Module):
    """Shared interface: inputs and targets to tensors, per-token log-likelihoods, step-wise decoding."""

    max_source_length: int = 128
    max_target_length: int = 16
    _frozen: set[str] = frozenset()          # parameter names that never train (a frozen pretrained part)

    def requires_grad_(self, requires_grad: bool = True):
        """The trainer switches whole generators on and off; a frozen part stays frozen."""
        for name, p in self.named_parameters():
            p.requires_grad_(bool(requires_grad) and name not in self._frozen)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n not in self._frozen]

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of a pretrained part, which train at `generator.encoder_lr`."""
        return []

    @property
    def tokenizer(self):
        return self.__dict__.get("_serial_tokenizer")

    @tokenizer.setter
    def tokenizer(self, tok):
        self.__dict__["_serial_tokenizer"] = tok if tok is None or isinstance(tok, SerialTokenizer) \
            else SerialTokenizer(tok)

    def encode_inputs(self, questions: list[str], passages: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    #: whether `encode_inputs` takes `histories=` (earlier chat turns before each question): a chat prompt
    uses_history = False

    def encode_targets(self, answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def token_logprobs(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def start_decoding(self, inputs: dict[str, torch.Tensor]) -> dict:
        """Run the encoder once; the returned state feeds `decode_step`."""
        raise NotImplementedError

    def decode_step(self, state: dict, prefix: torch.Tensor) -> torch.Tensor:
        """[N, V] log p(next token | x, z, prefix); prefix starts with `start_token_id`."""
        raise NotImplementedError

    @staticmethod
    def select_state(state: dict, rows: torch.Tensor) -> dict:
        """Keep (and repeat) the rows of a decoding state, for beam search. A decoder KV cache under "cache" moves
        to the new state (reordered in place; the old state loses it, with its "cache_prefix")."""
        out = {k: (v.index_select(0, rows) if torch.is_tensor(v) else v) for k, v in state.items()}
        if state.get("cache") is not None:
            out["cache"].reorder_cache(rows)
            state["cache"], state["cache_prefix"] = None, None
        return out

    decode_floor: float | None = None

    def support_columns(self, state: dict, group: int = 1) -> torch.Tensor | None:
        """[N / group, C] token ids outside which `decode_step` gives every row of each group of `group` consecutive
        rows the same value `decode_floor` (ids may repeat); None: no such bound, every token can differ."""
        return None

    @property
    def eos_token_id(self) -> int:
        raise NotImplementedError

    @property
    def start_token_id(self) -> int:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def question_budget(self) -> int:
        """Question tokens the generator reads: half its input length, less the pair's special tokens, so that
        cutting the passage (the tokenizer's `only_second`) always has passage left to cut."""
        return max(1, self.max_source_length // 2 - self.tokenizer.num_special_tokens_to_add(pair=True))

    def fit_question(self, question: str) -> str:
        """The question cut after its first `question_budget()` tokens, at a character boundary of the text. An
        over-long question would otherwise fail the whole batched (question, passage) tokenizer call."""
        budget = self.question_budget()
        if len(question) <= budget:                      # a token holds at least one character
            return question
        tok = self.tokenizer
        enc = tok(question, add_special_tokens=False, return_offsets_mapping=tok.is_fast)
        ids = enc["input_ids"]
        if len(ids) <= budget:
            return question
        if tok.is_fast:
            return question[:enc["offset_mapping"][budget - 1][1]]
        return tok.decode(ids[:budget])

    def _device(self):
        return next(self.parameters()).device


class CopyBart(Generator):
    """Small BART whose output mixes the vocabulary with copying from the source tokens.

    `encoder="bart"`: the BART's own small encoder, random init (reads template sentences after pre-training).
    `encoder=<a Hugging Face encoder>` (e.g. "minilm", the retriever's pretrained all-MiniLM-L6-v2): that encoder
    reads "question [SEP] passage" and the copy head points into its states, as an extractive reader's span head
    does; the decoder takes the encoder's width and its word embeddings (input, vocabulary head and copy keys), so
    it starts knowing English. The tokenizer must be the encoder's."""

    def __init__(self, tokenizer: str = "minilm", d_model: int = 128, encoder_layers: int = 2,
                 decoder_layers: int = 2, attention_heads: int = 4, ffn_dim: int = 512, dropout: float = 0.1,
                 max_source_length: int = 128, max_target_length: int = 16,
                 output_token_ids: list[int] | None = None, encoder: str = "bart", encoder_train_layers: int = -1):
        super().__init__()
        from transformers import AutoModel, BartConfig, BartModel

        self.tokenizer_name = tokenizer
        self.tokenizer = _load_tokenizer(tokenizer)
        tok = self.tokenizer
        self.text_encoder = None
        if encoder != "bart":
            self.text_encoder = AutoModel.from_pretrained(resolve_encoder_path(encoder))
            if self.text_encoder.config.vocab_size != len(tok):
                raise ValueError(f"generator.encoder {encoder!r} has a vocabulary of "
                                 f"{self.text_encoder.config.vocab_size} tokens but generator.tokenizer "
                                 f"{tokenizer!r} has {len(tok)}: use the encoder's own tokenizer")
            d_model, encoder_layers = int(self.text_encoder.config.hidden_size), 0
        self.hparams = dict(tokenizer=tokenizer, d_model=d_model, encoder_layers=encoder_layers,
                            decoder_layers=decoder_layers, attention_heads=attention_heads, ffn_dim=ffn_dim,
                            dropout=dropout, max_source_length=max_source_length,
                            max_target_length=max_target_length, encoder=encoder,
                            encoder_train_layers=encoder_train_layers)
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        # WordPiece tokenizers have [CLS]/[SEP]; they serve as BOS/EOS.
        self._bos = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        self._eos = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        config = BartConfig(
            vocab_size=len(tok), d_model=d_model, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
            encoder_attention_heads=attention_heads, decoder_attention_heads=attention_heads,
            encoder_ffn_dim=ffn_dim, decoder_ffn_dim=ffn_dim, dropout=dropout, attention_dropout=0.0,
            max_position_embeddings=max(max_source_length, max_target_length) + 8,
            pad_token_id=tok.pad_token_id, bos_token_id=self._bos, eos_token_id=self._eos,
            decoder_start_token_id=self._bos, forced_eos_token_id=None,
            scale_embedding=self.text_encoder is None,      # pretrained word embeddings already have their scale
        )
        self.bart = BartModel(config)
        if self.text_encoder is not None:
            self.bart.encoder = None                         # the pretrained encoder reads instead
            self._tie_embeddings()
            self._frozen = self._frozen_encoder_names(encoder_train_layers)
            self.requires_grad_(True)
        # The vocabulary head covers `output_token_ids` only (the tokens of the training answers): projecting
        # onto all 30k WordPiece ids dominated step time on a CPU. Other tokens are produced by copying.
        self.set_output_tokens(output_token_ids)
        self.copy_query = nn.Linear(d_model, d_model, bias=False)
        self.copy_key = nn.Linear(d_model, d_model, bias=False)
        # The key of source position i also sees the token before it (the cue words in front of an answer),
        # and a learnt bonus favours position i when token i-1 is the token just emitted: copying a multi-token
        # span then needs no learnt positional attention (an induction-head shortcut).
        self.copy_prev_key = nn.Linear(d_model, d_model, bias=False)
        self.span_bias = nn.Parameter(torch.tensor(3.0))
        self.gate = nn.Linear(2 * d_model, 1)
        # Start by preferring the copy distribution: answers are mostly spans of the passage.
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, -2.0)
        # Small copy logits at init: near-uniform attention over the source.
        nn.init.normal_(self.copy_query.weight, std=0.02)
        nn.init.normal_(self.copy_key.weight, std=0.02)
        nn.init.normal_(self.copy_prev_key.weight, std=0.02)
        # With a pretrained encoder, the first answer token also gets an extractive reader's start logit, a linear
        # function of each source state: where an answer starts is what such encoders learn to read fastest.
        # ... and the copy attention gets one more slot, "stop here" (it emits EOS), scored by an end logit of the
        # source position just copied: an extractive reader's end head. Answers then end where spans end without
        # the decoder having to learn it through the vocabulary head.
        self.start_head = self.end_head = None
        if self.text_encoder is not None:
            self.start_head, self.end_head = nn.Linear(d_model, 1), nn.Linear(d_model, 1)
            for head in (self.start_head, self.end_head):
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    def set_output_tokens(self, output_token_ids: list[int] | None) -> None:
        """Point the vocabulary head at these token ids (None: every token). The head is tied to the input
        embeddings, so this changes which tokens can be generated without copying, not any weight."""
        vocab = len(self.tokenizer)
        ids = sorted(set(output_token_ids) | {self._eos}) if output_token_ids else list(range(vocab))
        self.hparams["output_token_ids"] = ids if output_token_ids else None
        device = self.bart.shared.weight.device
        self.register_buffer("out_ids", torch.tensor(ids, dtype=torch.long, device=device), persistent=False)
        position = torch.full((vocab,), -1, dtype=torch.long, device=device)
        position[self.out_ids] = torch.arange(len(ids), device=device)
        self.register_buffer("out_position", position, persistent=False)

    def load_weights(self, file) -> None:
        """Weights saved by `save` (any float dtype); refuses weights of another architecture, naming the tensors."""
        from safetensors.torch import load_file

        state = load_file(str(file))
        own = self.state_dict()
        wrong = sorted(k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape))
        if wrong:
            raise ValueError(f"{file}: generator weights do not fit this architecture ({self._arch()}): "
                             + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:4]))
        missing, unexpected = self.load_state_dict(state, strict=False)
        tied = {"bart.encoder.embed_tokens.weight", "bart.decoder.embed_tokens.weight", "bart.shared.weight",
                "text_encoder.embeddings.word_embeddings.weight"}
        if unexpected or set(missing) - tied or len(tied & set(missing)) == len(tied & set(own)):
            raise ValueError(f"{file}: generator weights do not fit its config "
                             f"(missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)})")
        self._tie_embeddings()

    def pretrained_parameters(self) -> list[nn.Parameter]:
        if self.text_encoder is None:
            return []
        ids = {id(p) for p in self.text_encoder.parameters()}
        return [p for p in self.trainable_parameters() if id(p) in ids]

    def _frozen_encoder_names(self, train_layers: int) -> set[str]:
        """The pretrained encoder's parameters below its top `train_layers` layers (-1: none frozen). Frozen
        layers need no backward pass: most of a step's time on a CPU. Freezing the embeddings freezes the
        tied word embeddings of the decoder and vocabulary head too."""
        layers = self.text_encoder.encoder.layer
        if train_layers < 0 or train_layers >= len(layers):
            return set()
        frozen = [self.text_encoder.embeddings, *layers[:len(layers) - train_layers]]
        ids = {id(p) for m in frozen for p in m.parameters()}
        return {n for n, p in self.named_parameters(remove_duplicate=False) if id(p) in ids}

    def _tie_embeddings(self) -> None:
        """One word-embedding matrix for the encoder's input, the decoder's input, the vocabulary head and the copy
        keys: the pretrained encoder's when there is one. (load_state_dict copies into the shared tensor, so a
        checkpoint that stores it under one of its names fills all of them.)"""
        if self.text_encoder is not None:
            self.bart.shared.weight = self.text_encoder.embeddings.word_embeddings.weight
        else:
            self.bart.encoder.embed_tokens.weight = self.bart.shared.weight
        self.bart.decoder.embed_tokens.weight = self.bart.shared.weight

    def _arch(self) -> str:
        h = self.hparams
        return (f"d_model {h['d_model']}, encoder_layers {h['encoder_layers']}, decoder_layers {h['decoder_layers']}, "
                f"attention_heads {h['attention_heads']}, ffn_dim {h['ffn_dim']}")

    @property
    def eos_token_id(self) -> int:
        return self._eos

    @property
    def start_token_id(self) -> int:
        return self._bos

    def encode_inputs(self, questions, passages):
        questions = [self.fit_question(q) for q in questions]
        enc = self.tokenizer(questions, list(passages), padding=True, truncation="only_second",
                             max_length=self.max_source_length, return_tensors="pt",
                             return_token_type_ids=False)
        device = self._device()
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    def encode_targets(self, answers):
        enc = self.tokenizer(list(answers), padding=True, truncation=True, max_length=self.max_target_length,
                             add_special_tokens=False, return_tensors="pt", return_token_type_ids=False)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        # append EOS after the last real token
        lengths = mask.sum(1)
        ids = torch.cat([ids, torch.full((ids.size(0), 1), self.tokenizer.pad_token_id)], 1)
        mask = torch.cat([mask, torch.zeros(mask.size(0), 1, dtype=mask.dtype)], 1)
        ids[torch.arange(ids.size(0)), lengths] = self._eos
        mask[torch.arange(ids.size(0)), lengths] = 1
        device = self._device()
        return ids.to(device), mask.to(device)

    def _encode(self, inputs):
        encoder = self.text_encoder if self.text_encoder is not None else self.bart.encoder
        return encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state

    def _heads(self, inputs, enc, decoder_input_ids):
        """Decoder states -> (vocab logits [N,t,V], copy attention [N,t,S], p_gen [N,t,1], stop [N,t,1] or None)."""
        dec = self.bart.decoder(input_ids=decoder_input_ids, encoder_hidden_states=enc,
                                encoder_attention_mask=inputs["attention_mask"]).last_hidden_state
        return self._heads_from_states(inputs, enc, dec, decoder_input_ids)

    def _copy_parts(self, inputs, enc):
        """The decoder-independent half of the copy head, per source: keys [N, S, d], the token before each source
        position [N, S] and which positions may be copied [N, S] (never padding or [CLS]/[SEP])."""
        ids = inputs["input_ids"]
        before = torch.cat([torch.full_like(ids[:, :1], self.tokenizer.pad_token_id), ids[:, :-1]], 1)
        keys = self.copy_key(enc) + self.copy_prev_key(self.bart.shared(before))
        copyable = inputs["attention_mask"].bool() & ids.ne(self._bos) & ids.ne(self._eos)
        ends = None
        if self.start_head is not None:
            # [N, S, 2]: the start logit of position i, and the end logit of position i - 1 (the token just copied
            # when position i would continue the span)
            end = self.end_head(enc).squeeze(-1)
            ends = torch.stack([self.start_head(enc).squeeze(-1),
                                torch.cat([end.new_full((end.size(0), 1), _NO_STOP), end[:, :-1]], 1)], -1)
        return keys, before, copyable, ends

    def _heads_from_states(self, inputs, enc, dec, previous_tokens, copy_parts=None):
        """`previous_tokens` [N, t]: the token fed to the decoder at each position (the last one emitted).
        `copy_parts`: `_copy_parts(inputs, enc)` when already computed (decoding computes it once)."""
        vocab_logits = F.linear(dec, self.bart.shared.weight.index_select(0, self.out_ids))
        keys, before, copyable, ends = copy_parts if copy_parts is not None else self._copy_parts(inputs, enc)
        scores = self.copy_query(dec) @ keys.transpose(1, 2) / math.sqrt(dec.size(-1))
        emitted = previous_tokens.unsqueeze(-1)                                         # [N, t, 1]
        continues = before.unsqueeze(1).eq(emitted) & emitted.ne(self._bos) & emitted.ne(self.tokenizer.pad_token_id)
        scores = scores + self.span_bias * continues.to(scores.dtype)
        scores = scores.masked_fill(~copyable.unsqueeze(1), float("-inf"))
        if ends is None:
            attn = torch.softmax(scores, dim=-1)
            return vocab_logits, attn, torch.sigmoid(self.gate(torch.cat([dec, attn @ enc], -1))), None
        first = emitted.eq(self._bos).to(scores.dtype)                                 # [N, t, 1]
        scores = scores + first * ends[..., 0].unsqueeze(1)
        # stop slot: the end logits of the positions the span would continue at (-inf when none: nothing copied)
        # (a finite floor, not -inf: logsumexp over nothing but -inf has a NaN gradient)
        stop = ends[..., 1].unsqueeze(1).masked_fill(~continues, _NO_STOP).logsumexp(-1, keepdim=True)
        attn = torch.softmax(torch.cat([scores, stop], -1), dim=-1)
        attn, stop_prob = attn[..., :-1], attn[..., -1:]
        p_gen = torch.sigmoid(self.gate(torch.cat([dec, attn @ enc], -1)))
        return vocab_logits, attn, p_gen, stop_prob

    @staticmethod
    def _mix(vocab_prob, copy_prob, p_gen):
        return torch.log((p_gen * vocab_prob + (1 - p_gen) * copy_prob).clamp_min(1e-12))

    def _shift_right(self, labels):
        start = torch.full((labels.size(0), 1), self._bos, dtype=labels.dtype, device=labels.device)
        shifted = torch.cat([start, labels[:, :-1]], 1)
        return shifted.masked_fill(shifted.eq(-100), self.tokenizer.pad_token_id)

    def token_logprobs(self, inputs, labels):
        enc = self._encode(inputs)
        vocab_logits, attn, p_gen, stop_prob = self._heads(inputs, enc, self._shift_right(labels))
        target = labels.clamp_min(0)
        # only the target tokens' probabilities: no [N, T, V] copy distribution is materialised
        position = self.out_position[target].unsqueeze(-1)                                        # [N, T, 1]
        vocab_prob = torch.softmax(vocab_logits, -1).gather(-1, position.clamp_min(0))
        vocab_prob = vocab_prob.masked_fill(position.lt(0), 0.0)                                  # copy-only token
        same = inputs["input_ids"].unsqueeze(1).eq(target.unsqueeze(-1)).to(attn.dtype)           # [N, T, S]
        copy_prob = (attn * same).sum(-1, keepdim=True)
        if stop_prob is not None:
            copy_prob = copy_prob + stop_prob * target.eq(self._eos).unsqueeze(-1).to(stop_prob.dtype)
        out = self._mix(vocab_prob, copy_prob, p_gen).squeeze(-1)
        return out.masked_fill(labels.eq(self.tokenizer.pad_token_id) | labels.eq(-100), 0.0)

    # ----------------------------------------------------------------------------------------- decoding
    # The state holds the encoder output, the copy head's per-source half, and a key/value cache of the decoder
    # (self- and cross-attention, transformers' EncoderDecoderCache) with the prefix it was built for. A step whose
    # prefix extends that prefix by one token runs the decoder on the new token only; any other prefix is run whole
    # (and cached), so callers that pass arbitrary prefixes stay correct. `select_state` moves the cache along with
    # the rows (beam reordering, dropping finished beams).
    def _encode_by_length(self, inputs, chunks: int = 8):
        """The encoder over rows sorted by length in `chunks` groups, each cut to its own longest row: a batch of
        many (question, passage) pairs pads far less. Positions past a row's length hold whatever (they are masked
        everywhere downstream: cross-attention, copy attention)."""
        mask = inputs["attention_mask"]
        n = mask.size(0)
        if n < 2 * chunks:
            return self._encode(inputs)
        lengths = mask.sum(1)
        order = lengths.argsort(descending=True)
        enc = None
        for rows in order.chunk(chunks):
            width = int(lengths[rows[0]])
            part = self._encode({"input_ids": inputs["input_ids"][rows, :width], "attention_mask": mask[rows, :width]})
            if enc is None:
                enc = part.new_zeros(n, mask.size(1), part.size(-1))
            enc[rows, :width] = part
        return enc

    def start_decoding(self, inputs):
        enc = self._encode_by_length(inputs)
        keys, before, copyable, ends = self._copy_parts(inputs, enc)
        return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "enc": enc,
                "copy_keys": keys, "copy_before": before, "copyable": copyable, "copy_ends": ends, "cache": None,
                "cache_prefix": None}

    decode_floor = _LOG_EPS

    def support_columns(self, state, group=1):
        src = state["input_ids"]
        n = src.size(0) // group
        return torch.cat([self.out_ids.unsqueeze(0).expand(n, -1), src.reshape(n, -1)], 1)

    def decode_step(self, state, prefix, use_cache: bool = True):
        enc = state["enc"]
        cache, cached = state.get("cache"), state.get("cache_prefix")
        extends = (use_cache and cache is not None and cached.size(0) == prefix.size(0)
                   and cached.size(1) == prefix.size(1) - 1 and torch.equal(cached, prefix[:, :-1]))
        # transformers renamed `past_key_values` to `cache` (5.2x); pass and read whichever this version has
        cache_arg = self.__dict__.get("_cache_arg")
        if cache_arg is None:
            params = inspect.signature(self.bart.decoder.forward).parameters
            cache_arg = self.__dict__["_cache_arg"] = "cache" if "cache" in params else "past_key_values"
        out = self.bart.decoder(input_ids=prefix[:, -1:] if extends else prefix, encoder_hidden_states=enc,
                                encoder_attention_mask=state["attention_mask"], use_cache=use_cache,
                                **{cache_arg: cache if extends else None})
        if use_cache:
            state["cache"], state["cache_prefix"] = getattr(out, cache_arg), prefix
        dec = out.last_hidden_state[:, -1:]
        copy_parts = (state["copy_keys"], state["copy_before"], state["copyable"], state.get("copy_ends")) \
            if "copy_keys" in state else None
        vocab_logits, attn, p_gen, stop_prob = self._heads_from_states(state, enc, dec, prefix[:, -1:], copy_parts)
        # log p over the whole vocabulary, but the mixture and its log only where a token can have mass (the
        # vocabulary head's tokens and the source's); every other token gets log(1e-12), as `_mix` gives it.
        n, vocab, src = dec.size(0), len(self.out_position), state["input_ids"]
        p_gen, attn = p_gen[:, 0], attn[:, 0]                                          # [N, 1], [N, S]
        vocab_prob = torch.softmax(vocab_logits[:, 0], -1)                              # [N, O]
        cols = torch.cat([self.out_ids.unsqueeze(0).expand(n, -1), src], 1)            # [N, O + S]
        src_position = self.out_position[src]                                           # [N, S], -1: copy only
        src_vocab = vocab_prob.gather(1, src_position.clamp_min(0)).masked_fill(src_position.lt(0), 0.0)
        table = dec.new_zeros(n, vocab).scatter_add_(-1, src, attn)                     # copy probabilities
        if stop_prob is not None:
            table[:, self._eos] += stop_prob[:, 0, 0]
        copy_prob = table.gather(1, cols)
        mixed = self._mix(torch.cat([vocab_prob, src_vocab], 1), copy_prob, p_gen)
        return table.fill_(_LOG_EPS).scatter_(1, cols, mixed)

    def unique_state(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The state dict with tied weights (shared/embed_tokens) once, contiguous on CPU; floats cast to `dtype`
        when given. `load_weights` re-ties them."""
        seen, unique = set(), {}
        for k, v in self.state_dict().items():
            key = (v.data_ptr(), tuple(v.shape))
            if key in seen:
                continue
            seen.add(key)
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            unique[k] = v.detach().cpu().contiguous()
        return unique

    def save(self, out_dir):
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(self.unique_state(), str(out_dir / "model.safetensors"))
        (out_dir / "generator.json").write_text(json.dumps({"kind": "copy-bart", **self.hparams}, indent=2))
        self.tokenizer.save_pretrained(out_dir / "tokenizer")


class HFSeq2SeqGenerator(Generator):
    """Any Hugging Face encoder-decoder (BART, T5) via AutoModelForSeq2SeqLM."""

    def __init__(self, name_or_path: str, max_source_length: int = 256, max_target_length: int = 32, model=None,
                 tokenizer=None):
        super().__init__()
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.name_or_path = name_or_path
        self.model = model if model is not None else AutoModelForSeq2SeqLM.from_pretrained(name_or_path)
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(name_or_path)
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length

    @property
    def eos_token_id(self):
        return self.model.config.eos_token_id

    @property
    def start_token_id(self):
        return self.model.config.decoder_start_token_id

    def encode_inputs(self, questions, passages):
        texts = [f"question: {q} context: {p}" for q, p in zip(questions, passages)]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_source_length,
                             return_tensors="pt")
        device = self._device()
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    def encode_targets(self, answers):
        enc = self.tokenizer(text_target=list(answers), padding=True, truncation=True,
                             max_length=self.max_target_length, return_tensors="pt")
        device = self._device()
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def token_logprobs(self, inputs, labels):
        pad = self.tokenizer.pad_token_id
        masked = labels.masked_fill(labels.eq(pad), -100)
        logits = self.model(**inputs, labels=masked).logits
        out = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return out.masked_fill(labels.eq(pad), 0.0)

    def start_decoding(self, inputs):
        enc = self.model.get_encoder()(**inputs).last_hidden_state
        return {"attention_mask": inputs["attention_mask"], "enc": enc}

    def decode_step(self, state, prefix):
        from transformers.modeling_outputs import BaseModelOutput

        logits = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=state["enc"]),
                            attention_mask=state["attention_mask"], decoder_input_ids=prefix).logits[:, -1]
        return torch.log_softmax(logits.float(), -1)

    def save(self, out_dir):
        out_dir = Path(out_dir)
        self.model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        (out_dir / "generator.json").write_text(json.dumps({"kind": "hf-seq2seq", "name_or_path": ".",
                                                            "max_source_length": self.max_source_length,
                                                            "max_target_length": self.max_target_length}))


def answer_token_ids(tokenizer, answers: list[str], max_size: int) -> list[int]:
    """The `max_size` most frequent token ids of the answers: copy-bart's vocabulary head."""
    from collections import Counter

    counts = Counter(t for a in answers for t in tokenizer(a, add_special_tokens=False)["input_ids"])
    return [t for t, _ in counts.most_common(max_size)]


def build_generator(cfg, train_answers: list[str] | None = None) -> Generator:
    """From a `GeneratorConfig`; copy-bart's vocabulary head is built from the training answers when given."""
    if cfg.kind == "copy-bart":
        out_ids = None
        if train_answers and cfg.output_vocab_size:
            out_ids = answer_token_ids(_load_tokenizer(cfg.tokenizer), train_answers, cfg.output_vocab_size)
        gen = CopyBart(output_token_ids=out_ids, tokenizer=cfg.tokenizer, d_model=cfg.d_model,
                       encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
                       attention_heads=cfg.attention_heads, ffn_dim=cfg.ffn_dim, dropout=cfg.dropout,
                       max_source_length=cfg.max_source_length, max_target_length=cfg.max_target_length,
                       encoder=cfg.encoder, encoder_train_layers=cfg.encoder_train_layers)
        init = resolve_init(cfg)
        if init != "random":
            weights = reader_weights(init)
            try:
                gen.load_weights(weights)
            except ValueError as e:
                raise ValueError(f"generator.init={cfg.init!r}: {e}. Set generator.init=random to train this "
                                 f"architecture from scratch, or use the reader's sizes.") from None
        return gen
    if cfg.kind == "hf-seq2seq":
        return HFSeq2SeqGenerator(cfg.name_or_path, cfg.max_source_length, cfg.max_target_length)
    if cfg.kind == "hf-causal":
        from pipeline.models.hf_causal import HFCausalGenerator     # imports this module

        return HFCausalGenerator.from_config(cfg)
    raise ValueError(f"generator.kind {cfg.kind!r} is not supported yet")


READER_DIR = Path(__file__).resolve().parents[1] / "assets" / "reader"
_ARCH_KEYS = ("tokenizer", "d_model", "encoder_layers", "decoder_layers", "attention_heads", "ffn_dim")


def resolve_init(cfg) -> str:
    """`generator.init` as built: "auto" (the default) is the shipped "reader" when generator.kind is copy-bart at
    the reader's sizes (architecture and position count), else "random"; any other value is itself."""
    if cfg.init != "auto":
        return cfg.init
    if cfg.kind != "copy-bart" or not (READER_DIR / "generator.json").is_file():
        return "random"
    reader = json.loads((READER_DIR / "generator.json").read_text())
    same = all(getattr(cfg, key) == reader[key] for key in _ARCH_KEYS) and \
        cfg.encoder == reader.get("encoder", "bart") and \
        max(cfg.max_source_length, cfg.max_target_length) == max(reader["max_source_length"],
                                                                  reader["max_target_length"])
    return "reader" if same else "random"


def reader_weights(init: str) -> Path:
    """`generator.init` -> a safetensors file: "reader" is the shipped pre-trained copy-bart (jobs/pretrain_reader.py
    reproduces it); anything else is a directory holding model.safetensors (a generator saved by latentrag)."""
    folder = READER_DIR if init == "reader" else Path(init)
    file = folder / "model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"generator.init={init!r}: no {file}"
                                + (" (run `latentrag pretrain-reader` to rebuild it)" if init == "reader" else ""))
    return file


def load_generator(path) -> Generator:
    path = Path(path)
    meta_file = path / "generator.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"no generator.json in {path}: not a latentrag generator directory")
    meta = json.loads(meta_file.read_text())
    kind = meta.pop("kind")
    if kind == "copy-bart":
        if (path / "tokenizer").is_dir():              # checkpoints carry their tokenizer; the shipped reader does not
            meta["tokenizer"] = str(path / "tokenizer")
        gen = CopyBart(**meta)
        gen.load_weights(path / "model.safetensors")
        return gen
    if kind == "hf-seq2seq":
        return HFSeq2SeqGenerator(str(path), meta["max_source_length"], meta["max_target_length"])
    if kind == "hf-causal":
        from pipeline.models.hf_causal import HFCausalGenerator

        return HFCausalGenerator.load(path)
    raise ValueError(f"{meta_file}: unknown generator kind {kind!r}")
