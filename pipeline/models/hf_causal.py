"""`hf-causal`: any decoder-only LM (Llama, Qwen, Mistral, GPT-2) as the generator p(y | x, z), optionally with LoRA.

One row per (question, passage) pair is the prompt followed by the answer:

    [pad ... pad | prompt tokens | answer tokens, EOS | pad ... pad]
      left padding   <= max_source_length   <= max_target_length + 1, right padding

The prompt is `prompt_template` filled with the passage (title + text) and the question (and, with
`chat_template`, wrapped as a user turn of the tokenizer's chat template with the assistant cue). Prompts are left
padded, so every row's answer starts at the same column: the K passages' answer log-likelihoods come from one
batched forward whose logits are read at the same positions for all rows, and decoding appends new tokens on the
right of that same layout. Position ids count real tokens only (cumsum of the attention mask), so a row scores
exactly as it would alone. The loss covers the answer tokens and EOS only. A prompt over `max_source_length` is cut
in the passage, never in the question (cut first to `question_budget()` tokens) and never in the answer.

Checkpoint directory (`save` / `load_generator`):
    generator.json   kind, base reference and fingerprint, prompt, lengths, lora settings, dtype
    tokenizer/       the tokenizer (with the pad token decided at build time)
    adapter/         LoRA: peft's adapter_config.json + adapter_model.safetensors (adapter weights only)
    base/            LoRA over a base that no name or path can load again (a model built in memory, as in tests):
                     the base weights as well. A hub name or a local model directory is referenced, not copied.
    model/           full fine-tuning: the whole model (safetensors)
The base is checked on load against the fingerprint saved with the adapter: an adapter is refused on another base.

Pad token: a tokenizer without one (Llama, Mistral and most base models) pads with its EOS token, logged. Padding is
masked out of attention and of the loss, so which id fills it never matters; a tokenizer with neither is refused.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
from pathlib import Path

import torch

from pipeline.config import DEFAULT_PROMPT_TEMPLATE, check_prompt_template
from pipeline.models.generator import Generator

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class CausalConfigError(ValueError):
    """An hf-causal generator that cannot be built as configured; the message says why and what to change."""


def _is_referenceable(name_or_path: str | None) -> bool:
    """True when `name_or_path` loads the same base again elsewhere: a local model directory or a hub id."""
    if not name_or_path:
        return False
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return (path / "config.json").is_file()
    parts = str(name_or_path).split("/")
    return not str(name_or_path).startswith((".", "/", "~")) and 1 <= len(parts) <= 2 and all(parts)


def base_fingerprint(model) -> dict:
    """Architecture + a hash of the first values of every weight (as bf16, so fp32 and bf16 loads of one checkpoint
    agree): enough to tell Qwen2.5-1.5B from Qwen2.5-1.5B-Instruct, which share a config."""
    cfg = model.config
    quantized = bool(getattr(model, "is_quantized", False) or getattr(cfg, "quantization_config", None))
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()) if not quantized else ():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        if p.is_floating_point():
            h.update(p.detach().reshape(-1)[:16].to(torch.bfloat16).float().cpu().numpy().tobytes())
    return {"model_type": cfg.model_type, "vocab_size": int(cfg.vocab_size),
            "hidden_size": int(getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 0)) or 0),
            "num_hidden_layers": int(getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", 0)) or 0),
            # a 4/8-bit base's packed weights match no unquantized load of it: architecture only
            "weights_sha256": None if quantized else h.hexdigest()[:16]}


def _same_base(expected: dict, got: dict) -> bool:
    return all(got.get(k) == v for k, v in expected.items() if not (k == "weights_sha256" and v is None))


def check_tokenizer(tok, vocab: int, chat_template: bool, where: str = "generator", name: str | None = None) -> None:
    """What a causal generator needs of its tokenizer: EOS (it ends answers, and pads when there is no pad token),
    no ids beyond the model's embedding, and a chat template when one is asked for."""
    if tok.eos_token_id is None:
        raise CausalConfigError(f"{where}: the tokenizer has neither a pad token nor an EOS token; a causal "
                                "generator needs EOS to end answers (and pads with it)" if tok.pad_token_id is None
                                else f"{where}: the tokenizer has no EOS token to end answers")
    if len(tok) > vocab:
        # we never add tokens (padding reuses EOS), so no embedding is resized and nothing but adapters trains
        raise CausalConfigError(f"{where}: the tokenizer has {len(tok)} tokens but the model's embedding {vocab}; "
                                "use the tokenizer the model was trained with")
    if chat_template and not getattr(tok, "chat_template", None):
        raise CausalConfigError(f"{where}.chat_template: true, but the tokenizer of {name or 'the model'} has no "
                                "chat template; set generator.chat_template=false to use the prompt as is")


def lora_target_arg(model, targets: list[str], where: str = "generator", name: str | None = None):
    """peft's target_modules for `targets`, each of which must name a module of `model` (peft itself only fails
    when none does)."""
    if targets == ["all-linear"]:
        return "all-linear"
    names = [n for n, _ in model.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
        raise CausalConfigError(f"{where}.lora.target_modules: {', '.join(unmatched)} match no module of "
                                f"the {model.config.model_type} model {name or ''}".rstrip()
                                + f"; its linear layers are {', '.join(linear)} (or use all-linear)")
    return targets


def preflight(cfg) -> None:
    """The checks of building an hf-causal generator from a `GeneratorConfig` that need no weights (tokenizer,
    prompt template, LoRA target modules against the model built on the meta device): for a driver, so that a bad
    setting fails before Ray or any download of weights starts."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pipeline.models.retriever import resolve_encoder_path

    check_prompt_template(cfg.prompt_template)
    path = resolve_encoder_path(cfg.name_or_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    check_tokenizer(AutoTokenizer.from_pretrained(path), model.get_input_embeddings().num_embeddings,
                    cfg.chat_template, name=path)
    if cfg.lora is not None:
        lora_target_arg(model, list(cfg.lora.target_modules), name=path)


class HFCausalGenerator(Generator):
    """Any `AutoModelForCausalLM` behind the Generator interface (see the module doc)."""

    def __init__(self, model, tokenizer, *, name_or_path: str | None = None,
                 prompt_template: str = DEFAULT_PROMPT_TEMPLATE, chat_template: bool = False,
                 max_source_length: int = 256, max_target_length: int = 32, lora: dict | None = None,
                 dtype: str = "float32", gradient_checkpointing: bool = False, adapter_dir: str | Path | None = None,
                 expected_base: dict | None = None, where: str = "generator"):
        super().__init__()
        check_prompt_template(prompt_template, f"{where}.prompt_template")
        if name_or_path and Path(name_or_path).expanduser().is_dir():
            name_or_path = str(Path(name_or_path).expanduser().resolve())    # the reference survives a cd
        self.name_or_path = name_or_path
        self.prompt_template = prompt_template
        self.chat_template = bool(chat_template)
        self.max_source_length = int(max_source_length)
        self.max_target_length = int(max_target_length)
        self.lora = dict(lora) if lora else None
        self.dtype = dtype
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.tokenizer = tokenizer
        check_tokenizer(tokenizer, model.get_input_embeddings().num_embeddings, self.chat_template, where,
                        name_or_path)
        self._set_pad_token(where)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        # the base is fingerprinted before any adapter is attached: the adapter is refused on another base
        self.base_fingerprint = base_fingerprint(model)
        if expected_base is not None and not _same_base(expected_base, self.base_fingerprint):
            diff = {k: (expected_base.get(k), v) for k, v in self.base_fingerprint.items()
                    if expected_base.get(k) != v}
            raise CausalConfigError(f"{where}: the adapter was trained on another base model than "
                                    f"{name_or_path!r} (saved vs loaded: {diff}); load it onto its own base")
        # a base that no name or path loads again is kept (frozen, unchanged by training) to be saved with adapters
        # (in a list: not a submodule, so neither trained, moved nor in the state dict)
        self._bundled_base = []
        if self.lora is not None and not _is_referenceable(name_or_path):
            self._bundled_base.append(copy.deepcopy(model))
        if self.gradient_checkpointing:
            # non-reentrant: frozen embeddings under LoRA would otherwise stop the gradient at the first layer
            # (transformers 5.2x renamed gradient_checkpointing_enable; the old name warns)
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.lora is not None:
            model = self._with_lora(model, adapter_dir, where)
        self.model = model
        head = self._base().get_output_embeddings()
        if head is not None:
            # logits_to_keep hands the head a slice of the hidden states (not contiguous); with a frozen head (LoRA)
            # torch's linear then runs as a bmm over an expanded weight, twice the time of one matmul on CPU
            head.register_forward_pre_hook(_contiguous_input)
        self._trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        self._cache_arg = "cache" if "cache" in inspect.signature(self._base().forward).parameters \
            else "past_key_values"
        self._keep_arg = "logits_to_keep" in inspect.signature(self._base().forward).parameters
        self._prefix = self._bos_prefix()
        overhead = len(self._render("", ""))
        if overhead + 2 > self.max_source_length:
            raise CausalConfigError(f"{where}.max_source_length: {self.max_source_length} tokens do not hold the "
                                    f"prompt template itself ({overhead} tokens) and a question; raise it")
        self._template_tokens = overhead
        self._answer_sep = "" if self._render_text("q", "p")[-1:].isspace() else " "

    # ------------------------------------------------------------------------------------------ construction
    def _set_pad_token(self, where: str) -> None:
        tok = self.tokenizer
        if tok.pad_token_id is not None:
            return
        log.warning("%s: the tokenizer has no pad token; padding with its EOS token %r (padding is masked out of "
                    "attention and loss, so the id never matters)", where, tok.eos_token)
        tok.pad_token = tok.eos_token

    def _with_lora(self, model, adapter_dir, where: str):
        import peft

        target_arg = lora_target_arg(model, list(self.lora["target_modules"]), where, self.name_or_path)
        if adapter_dir is not None:
            return peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
        config = peft.LoraConfig(r=int(self.lora["r"]), lora_alpha=float(self.lora["alpha"]),
                                 lora_dropout=float(self.lora["dropout"]), target_modules=target_arg,
                                 task_type="CAUSAL_LM", bias="none")
        return peft.get_peft_model(model, config)

    @classmethod
    def from_config(cls, cfg) -> "HFCausalGenerator":
        """From a `GeneratorConfig` (kind hf-causal): the model and tokenizer of `name_or_path`."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline.models.retriever import resolve_encoder_path

        path = resolve_encoder_path(cfg.name_or_path)
        kwargs = {"dtype": DTYPES[cfg.dtype]}
        if cfg.quantize != "none":
            kwargs.update(_quantization_kwargs(cfg.quantize, cfg.dtype))
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if cfg.quantize != "none":
            import peft

            model = peft.prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
        lora = None if cfg.lora is None else {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                                              "target_modules": list(cfg.lora.target_modules)}
        return cls(model, AutoTokenizer.from_pretrained(path), name_or_path=path,
                   prompt_template=cfg.prompt_template, chat_template=cfg.chat_template,
                   max_source_length=cfg.max_source_length, max_target_length=cfg.max_target_length, lora=lora,
                   dtype=cfg.dtype, gradient_checkpointing=cfg.gradient_checkpointing)

    def _base(self):
        """The transformers model under any peft wrapper."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def requires_grad_(self, requires_grad: bool = True):
        """Only what trains (the adapters under LoRA, everything otherwise) follows `requires_grad`: the trainer
        switches whole generators on and off, and must never unfreeze a LoRA base."""
        for name, p in self.named_parameters():
            p.requires_grad_(bool(requires_grad) and name in self._trainable)
        return self

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.named_parameters() if n in self._trainable]

    # ------------------------------------------------------------------------------------------ tokens
    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def start_token_id(self) -> int:
        # decoding prefixes start with this id; it is never fed to the model (the prompt's last token precedes
        # the answer)
        return self.tokenizer.pad_token_id

    def _bos_prefix(self) -> list[int]:
        # Llama/Mistral-style tokenizers start a text with BOS; Qwen has none, and GPT-2's BOS is its EOS (not
        # prepended). A chat template writes its own.
        tok = self.tokenizer
        if self.chat_template or tok.bos_token_id is None or tok.bos_token_id == tok.eos_token_id:
            return []
        return [tok.bos_token_id]

    @property
    def uses_history(self) -> bool:
        """Earlier chat turns go into the prompt with a chat template (they precede the user turn that holds the
        passage and question); a plain prompt has no place for them."""
        return self.chat_template

    def _render_text(self, question: str, passage: str, history: tuple = ()) -> str:
        text = self.prompt_template.format(passage=passage, question=question)
        if self.chat_template:
            turns = [{"role": m["role"], "content": m["content"]} for m in history]
            text = self.tokenizer.apply_chat_template(turns + [{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return text

    def _render(self, question: str, passage: str, history: tuple = ()) -> list[int]:
        return self._render_many([question], [passage], [history])[0]

    def _render_many(self, questions: list[str], passages: list[str], histories=None) -> list[list[int]]:
        histories = histories or [()] * len(questions)
        texts = [self._render_text(q, p, h) for q, p, h in zip(questions, passages, histories)]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [self._prefix + row for row in ids]

    def fit_history(self, question: str, history) -> tuple:
        """The newest earlier turns that fit: the oldest go first until the prompt without its passage leaves the
        passage at least what it has without history (half of what the template leaves). `question` is already
        cut to `question_budget()`."""
        history = tuple(history or ())
        if not history or not self.uses_history:
            return ()
        limit = self.max_source_length - self.question_budget()
        while history and len(self._render(question, "", history)) > limit:
            history = history[1:]
        return history

    def question_budget(self) -> int:
        """Half of what the template leaves of max_source_length: the passage always has the other half."""
        return max(1, (self.max_source_length - self._template_tokens) // 2)

    def _prompts(self, questions: list[str], passages: list[str], histories=None) -> list[list[int]]:
        """Prompt ids of at most max_source_length tokens; an over-long prompt loses the end of its passage."""
        limit = self.max_source_length
        histories = histories or [()] * len(questions)
        prompts = self._render_many(questions, passages, histories)
        over = [i for i, p in enumerate(prompts) if len(p) > limit]
        if not over:
            return prompts
        tok = self.tokenizer
        bare = self._render_many([questions[i] for i in over], [""] * len(over), [histories[i] for i in over])
        enc = tok([passages[i] for i in over], add_special_tokens=False, return_offsets_mapping=tok.is_fast)
        for j, i in enumerate(over):
            budget = limit - len(bare[j])
            ids = enc["input_ids"][j]
            while True:
                if budget <= 0:
                    cut = ""
                elif tok.is_fast:
                    cut = passages[i][:enc["offset_mapping"][j][min(budget, len(ids)) - 1][1]]
                else:
                    cut = tok.decode(ids[:budget])
                prompt = self._render(questions[i], cut, histories[i])
                # tokens can merge differently across the cut: shrink until the whole prompt fits
                if len(prompt) <= limit or budget <= 0:
                    break
                budget -= len(prompt) - limit
            if len(prompt) > limit:
                raise ValueError(f"the prompt without any passage is {len(prompt)} tokens, over max_source_length "
                                 f"{limit}: the question was not cut to question_budget() (use fit_question)")
            prompts[i] = prompt
        return prompts

    def encode_inputs(self, questions, passages, histories=None):
        """`histories`: per row, the earlier chat turns ({role, content}, oldest first) before the question, with a
        chat template (see `fit_history`); ignored without one."""
        questions = [self.fit_question(q) for q in questions]
        if histories is not None and self.uses_history:
            histories = [self.fit_history(q, h) for q, h in zip(questions, histories)]
        else:
            histories = None
        prompts = self._prompts(questions, list(passages), histories)
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):                       # left padding: every answer starts at column `width`
            if p:
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
        device = self._device()
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    def encode_targets(self, answers):
        """(labels [N, T], mask [N, T]): the answer's tokens then EOS; -100 on padding (pad may equal EOS)."""
        enc = self.tokenizer([self._answer_sep + a for a in answers], add_special_tokens=False, truncation=True,
                             max_length=self.max_target_length)["input_ids"]
        rows = [row + [self.eos_token_id] for row in enc]
        width = max(len(r) for r in rows)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            labels[i, :len(r)] = torch.tensor(r)
        device = self._device()
        return labels.to(device), labels.ne(-100).long().to(device)

    # ------------------------------------------------------------------------------------------ scoring
    def _forward(self, ids, mask, keep: int, cache=None, position_ids=None, use_cache=False):
        if position_ids is None:
            position_ids = (mask.cumsum(1) - 1).clamp_min(0)
        kwargs = {self._cache_arg: cache} if cache is not None else {}
        if self._keep_arg:
            kwargs["logits_to_keep"] = keep
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=use_cache,
                         **kwargs)
        logits = out.logits if self._keep_arg else out.logits[:, -keep:]
        return logits, getattr(out, self._cache_arg, None) if use_cache else None

    def token_logprobs(self, inputs, labels):
        real = labels.ne(-100)                                # encode_targets marks padding -100
        target = labels.masked_fill(~real, self.tokenizer.pad_token_id)
        ids = torch.cat([inputs["input_ids"], target], 1)
        mask = torch.cat([inputs["attention_mask"], real.to(inputs["attention_mask"].dtype)], 1)
        # the logits of the last prompt token and of every answer token but the last predict the answer tokens
        logits, _ = self._forward(ids, mask, keep=labels.size(1) + 1)
        logits = _at_least_fp32(logits[:, :-1])
        out = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
        return out.masked_fill(~real, 0.0)

    # ------------------------------------------------------------------------------------------ decoding
    # The state holds the prompts, the model's key/value cache (transformers' DynamicCache) and the prefix it was
    # built for. A prefix that extends the cached one by a token runs the model on that token only; any other
    # prefix is recomputed whole (and cached), so callers that pass arbitrary prefixes stay correct. The prefix's
    # first column is `start_token_id`, which the model never sees: the prompt's last position predicts the first
    # answer token, computed once in `start_decoding`.
    def start_decoding(self, inputs):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        logits, cache = self._forward(ids, mask, keep=1, use_cache=True)
        start = torch.full((ids.size(0), 1), self.start_token_id, dtype=torch.long, device=ids.device)
        return {"input_ids": ids, "attention_mask": mask, "first": torch.log_softmax(_at_least_fp32(logits[:, -1]), -1),
                "cache": cache, "cache_prefix": start}

    def decode_step(self, state, prefix, use_cache: bool = True):
        if prefix.size(1) == 1:
            return state["first"]
        ids, mask = state["input_ids"], state["attention_mask"]
        cache, cached = state.get("cache"), state.get("cache_prefix")
        extends = (use_cache and cache is not None and cached is not None and cached.size(0) == prefix.size(0)
                   and cached.size(1) == prefix.size(1) - 1 and torch.equal(cached, prefix[:, :-1]))
        new = prefix[:, 1:]
        full_mask = torch.cat([mask, torch.ones_like(new)], 1)
        if extends:
            position = (mask.sum(1, keepdim=True) + new.size(1) - 1)
            logits, cache = self._forward(new[:, -1:], full_mask, keep=1, cache=cache, position_ids=position,
                                          use_cache=True)
        else:
            logits, cache = self._forward(torch.cat([ids, new], 1), full_mask, keep=1, use_cache=use_cache)
        if use_cache:
            state["cache"], state["cache_prefix"] = cache, prefix
        return torch.log_softmax(_at_least_fp32(logits[:, -1]), -1)

    # ------------------------------------------------------------------------------------------ sharding (FSDP2)
    # `train.parallel: fsdp`: torch's FSDP2 `fully_shard` on every decoder layer and on the peft/transformers model
    # (in place: the generator keeps its methods, each model call all-gathers a layer's weights just in time and
    # frees them after). Every parameter becomes a DTensor holding 1/world of it; under LoRA the frozen base is
    # sharded too and only the adapters get gradients (FSDP2 keeps the original parameters, frozen ones included,
    # which is what FSDP1 needed use_orig_params for). Model calls are then collectives: every rank must make the
    # same calls (training steps do; evaluation runs on every rank).
    @property
    def is_sharded(self) -> bool:
        return getattr(self, "_sharded", False)

    def shard(self, mesh=None) -> "HFCausalGenerator":
        """Shard the model over the default process group (or `mesh`). Call it before building the optimizer: the
        parameters are replaced by sharded ones."""
        from torch.distributed.fsdp import fully_shard

        base = self._base()
        layers = getattr(getattr(base, "model", None), "layers", None)          # Llama, Qwen2, Mistral
        if layers is None:
            layers = getattr(getattr(base, "transformer", None), "h", None)    # GPT-2
        for layer in layers or ():
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self._sharded, self._gathered = True, None
        return self

    def gather_for_save(self, rank: int) -> None:
        """A collective (every rank calls it): the full values of what `save` writes (the adapters under LoRA, else
        the whole model) are gathered to CPU on rank 0 and kept for the next `save`."""
        state = {}
        for name, value in self.model.state_dict().items():
            if self.lora is not None and "lora_" not in name:
                continue                                      # the frozen base is never saved with adapters
            full = value.full_tensor() if hasattr(value, "full_tensor") else value
            if rank == 0:
                state[name] = full.detach().cpu().clone()
        self._gathered = state if rank == 0 else None

    # ------------------------------------------------------------------------------------------ saving
    def settings(self) -> dict:
        return {"kind": "hf-causal", "base": self.name_or_path if _is_referenceable(self.name_or_path) else None,
                "base_fingerprint": self.base_fingerprint, "prompt_template": self.prompt_template,
                "chat_template": self.chat_template, "max_source_length": self.max_source_length,
                "max_target_length": self.max_target_length, "lora": self.lora, "dtype": self.dtype,
                "gradient_checkpointing": self.gradient_checkpointing}

    def save(self, out_dir):
        out_dir = Path(out_dir)
        gathered = {}
        if self.is_sharded:
            # the local shards are 1/world of each weight: write the full values gathered on every rank
            if self._gathered is None:
                raise RuntimeError("a sharded generator saves what gather_for_save() collected: call it on every "
                                   "rank first, then save on rank 0")
            gathered, self._gathered = {"state_dict": self._gathered}, None
        out_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(out_dir / "tokenizer")
        if self.lora is not None:
            self.model.save_pretrained(out_dir / "adapter", safe_serialization=True, **gathered)
            for base in self._bundled_base:
                base.save_pretrained(out_dir / "base", safe_serialization=True)
        else:
            self.model.save_pretrained(out_dir / "model", safe_serialization=True, **gathered)
        (out_dir / "generator.json").write_text(json.dumps(self.settings(), indent=2))

    @classmethod
    def load(cls, path, base: str | None = None) -> "HFCausalGenerator":
        """A generator saved by `save`. `base`: where the LoRA base is now, when it moved (checked by fingerprint)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        meta = json.loads((path / "generator.json").read_text())
        dtype = DTYPES[meta.get("dtype", "float32")]
        lora = meta.get("lora")
        if lora is None:
            source = path / "model"
        elif (path / "base").is_dir() and base is None:
            source = path / "base"
        else:
            source = base or meta.get("base")
            if not source:
                raise FileNotFoundError(f"{path}: the adapter's base model is neither saved with it nor named")
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
        return cls(model, AutoTokenizer.from_pretrained(str(path / "tokenizer")),
                   name_or_path=None if source == path / "base" else str(source),
                   prompt_template=meta["prompt_template"], chat_template=meta["chat_template"],
                   max_source_length=meta["max_source_length"], max_target_length=meta["max_target_length"],
                   lora=lora, dtype=meta.get("dtype", "float32"),
                   gradient_checkpointing=meta.get("gradient_checkpointing", False),
                   adapter_dir=path / "adapter" if lora is not None else None,
                   expected_base=meta.get("base_fingerprint") if lora is not None else None,
                   where=str(path))

    def export_merged(self, out_dir) -> Path:
        """One plain Hugging Face model directory (adapters merged into the base weights) + tokenizer, loadable with
        AutoModelForCausalLM alone; `latentrag_prompt.json` records how latentrag prompts it. The live generator is
        unchanged (the merge happens on a copy)."""
        out_dir = Path(out_dir)
        model = copy.deepcopy(self.model)
        if self.lora is not None:
            model = model.merge_and_unload()
        if self.gradient_checkpointing:
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.save_pretrained(out_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir)
        (out_dir / "latentrag_prompt.json").write_text(json.dumps(
            {"prompt_template": self.prompt_template, "chat_template": self.chat_template,
             "max_source_length": self.max_source_length, "answer_separator": self._answer_sep}, indent=2))
        return out_dir


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:])


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # log-probabilities of bf16 logits in fp32; float64 (gradient checks) stays float64
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _quantization_kwargs(quantize: str, dtype: str) -> dict:
    """from_pretrained arguments of a 4-bit (NF4) or 8-bit base (QLoRA): CUDA and bitsandbytes only."""
    if not torch.cuda.is_available():
        raise CausalConfigError(f"generator.quantize={quantize}: 4-bit/8-bit bases need a CUDA GPU (bitsandbytes); "
                                "this machine has none. Set generator.quantize=none on CPU")
    try:
        import bitsandbytes  # noqa: F401  (optional, GPU only)
    except ImportError:
        raise CausalConfigError(f"generator.quantize={quantize}: install bitsandbytes on the GPU workers") from None
    from transformers import BitsAndBytesConfig

    compute = DTYPES["bfloat16" if dtype == "float32" else dtype]
    bnb = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                              bnb_4bit_use_double_quant=True) if quantize == "4bit"
           else BitsAndBytesConfig(load_in_8bit=True))
    return {"quantization_config": bnb, "device_map": {"": torch.cuda.current_device()}}

