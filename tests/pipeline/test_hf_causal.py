"""hf-causal generator: prompts, padding, truncation, per-passage log-likelihoods, cached decoding, LoRA, checkpoints,
bad input. Tiny random Llama / Qwen2 (and GPT-2, whose absolute positions catch wrong position ids) models, no
downloads (see test_hf_causal_helpers)."""
import json
import logging

import pytest
import torch
from test_hf_causal_helpers import (ALL_FAMILIES, FAMILIES, lora_settings, save_tiny_base, tiny_generator,
                                    tiny_model, tiny_tokenizer)

from pipeline.config import ConfigError, GeneratorConfig, LoraConfig, from_dict, load_config
from pipeline.decoding import beam_search
from pipeline.models.generator import build_generator, load_generator
from pipeline.models.hf_causal import CausalConfigError, HFCausalGenerator

QUESTIONS = ["Where was Varnel Ostrik born?", "Who employed Varnel Ostrik?",
             "What does Kela Dorn play at festivals in the town of Meridale?"]
PASSAGES = ["Varnel Ostrik was born in the town of Meridale.",
            "Varnel Ostrik worked for the Quendle Guild. " * 12,            # over max_source_length: cut
            "Kela Dorn plays the zumbrel."]
ANSWERS = ["Meridale", "Quendle Guild", "the zumbrel at festivals"]


def lora(**kw):
    return lora_settings(target_modules=["c_attn"], **kw) if kw.pop("family", None) == "gpt2" else lora_settings(**kw)


def one_at_a_time(gen, questions, passages, answers):
    """Each pair alone: no padding anywhere."""
    out = []
    for q, p, a in zip(questions, passages, answers):
        labels, mask = gen.encode_targets([a])
        lp = gen.token_logprobs(gen.encode_inputs([q], [p]), labels)
        out.append((lp * mask).sum())
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------ prompts
def test_prompt_holds_passage_question_and_cue_and_only_the_passage_is_cut():
    gen = tiny_generator("llama", max_source_length=64)
    inputs = gen.encode_inputs(QUESTIONS, PASSAGES)
    mask = inputs["attention_mask"]
    lengths = mask.sum(1)
    assert int(lengths.max()) <= 64 and len(set(lengths.tolist())) == 3           # mixed lengths, within limit
    assert bool((mask[:, -1] == 1).all()) and bool((mask[:, 0] == 0).any())      # left padding
    texts = [gen.tokenizer.decode(row[m.bool()]) for row, m in zip(inputs["input_ids"], mask)]
    assert texts[0] == "<s>Passage: " + PASSAGES[0] + "\nQuestion: " + QUESTIONS[0] + "\nAnswer:"
    # the long passage lost its end; the question and the cue are whole
    assert texts[1].endswith("\nQuestion: " + QUESTIONS[1] + "\nAnswer:")
    assert "Quendle Guild" in texts[1] and len(texts[1]) < len(PASSAGES[1])
    # a question over its budget is cut to it, the passage keeps the rest
    long_q = "Where was Varnel Ostrik born and " * 20 + "?"
    row = gen.encode_inputs([long_q], [PASSAGES[0]])
    text = gen.tokenizer.decode(row["input_ids"][0])
    assert row["input_ids"].size(1) <= 64 and "Passage: Varnel" in text and text.endswith("\nAnswer:")


def test_chat_template_wraps_the_prompt_as_a_user_turn():
    gen = tiny_generator("qwen2", tokenizer=tiny_tokenizer(chat=True), chat_template=True)
    inputs = gen.encode_inputs(QUESTIONS[:1], PASSAGES[:1])
    text = gen.tokenizer.decode(inputs["input_ids"][0])
    assert text == ("<s>user: Passage: " + PASSAGES[0] + "\nQuestion: " + QUESTIONS[0] + "\nAnswer:\n"
                    "<s>assistant:")
    with pytest.raises(CausalConfigError, match="no chat template"):
        tiny_generator("qwen2", chat_template=True)


def test_targets_are_the_answer_then_eos_with_padding_marked():
    gen = tiny_generator("llama")
    labels, mask = gen.encode_targets(["Meridale", "Quendle Guild"])
    eos = gen.eos_token_id
    for row, m, answer in zip(labels, mask, ["Meridale", "Quendle Guild"]):
        ids = row[m.bool()].tolist()
        assert ids[-1] == eos and gen.decode(ids[:-1]) == answer
    assert bool((labels[mask.eq(0)] == -100).all()) and bool(mask.eq(0).any())


# ------------------------------------------------------------------------------------------------ likelihoods
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_batched_answer_loglik_equals_one_pair_at_a_time(family):
    gen = tiny_generator(family, max_source_length=64)
    qs, ps, ans = QUESTIONS * 2, PASSAGES + PASSAGES[::-1], ANSWERS + ANSWERS[::-1]
    inputs = gen.encode_inputs(qs, ps)
    assert len(set(inputs["attention_mask"].sum(1).tolist())) >= 3              # mixed prompt lengths
    labels, mask = gen.encode_targets(ans)
    token_lp = gen.token_logprobs(inputs, labels)
    assert bool((token_lp[mask.eq(0)] == 0).all())
    batched = (token_lp * mask).sum(-1)
    alone = one_at_a_time(gen, qs, ps, ans)
    assert torch.allclose(batched, alone, atol=1e-5), (batched, alone)
    assert float(batched.detach().std()) > 0.1                                            # they do differ by pair


def test_the_loglik_is_of_the_answer_given_the_prompt():
    """Against a plain forward over prompt + answer text: sum of log p(answer tokens, EOS | prompt)."""
    gen = tiny_generator("qwen2")
    tok = gen.tokenizer
    prompt = tok("Passage: " + PASSAGES[0] + "\nQuestion: " + QUESTIONS[0] + "\nAnswer:")["input_ids"]
    answer = tok(" " + ANSWERS[0])["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([[tok.bos_token_id] + prompt + answer])
    logp = torch.log_softmax(gen.model(input_ids=ids).logits[0], -1)
    start = len(prompt) + 1
    expected = sum(float(logp[start - 1 + t, a]) for t, a in enumerate(answer))
    got = one_at_a_time(gen, QUESTIONS[:1], PASSAGES[:1], ANSWERS[:1])
    assert float(got[0]) == pytest.approx(expected, abs=1e-5)


# ------------------------------------------------------------------------------------------------ decoding cache
def reference_step(gen, state, prefix):
    """The whole prompt + prefix through the model, no cache."""
    ids = torch.cat([state["input_ids"], prefix[:, 1:]], 1)
    mask = torch.cat([state["attention_mask"], torch.ones_like(prefix[:, 1:])], 1)
    logits = gen.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0)).logits
    return torch.log_softmax(logits[:, -1], -1)


@pytest.mark.parametrize("family", ALL_FAMILIES)
@torch.no_grad()
def test_cached_steps_equal_full_recomputation_through_reorders(family):
    gen = tiny_generator(family, max_source_length=64).eval()
    inputs = gen.encode_inputs(QUESTIONS * 2, PASSAGES * 2)
    n = inputs["input_ids"].size(0)
    cached, plain = gen.start_decoding(inputs), gen.start_decoding(inputs)
    prefix = torch.full((n, 1), gen.start_token_id)
    g = torch.Generator().manual_seed(0)
    for t in range(6):
        a = gen.decode_step(cached, prefix)
        b = gen.decode_step(plain, prefix, use_cache=False)
        c = reference_step(gen, plain, prefix)
        assert a.shape == (n, len(gen.tokenizer))
        assert torch.allclose(a, c, atol=1e-5) and torch.allclose(b, c, atol=1e-5)
        if t:
            assert cached["cache"].get_seq_length() == inputs["input_ids"].size(1) + t
        rows = torch.randint(0, n, (n - 1,), generator=g) if t % 2 else torch.randperm(n, generator=g)
        tokens = torch.multinomial(a.exp(), 1, generator=g)
        cached, plain = gen.select_state(cached, rows), gen.select_state(plain, rows)
        prefix = torch.cat([prefix, tokens], 1)[rows]
        n = rows.numel()


@pytest.mark.parametrize("num_beams", [1, 3])
@torch.no_grad()
def test_beam_search_with_the_cache_equals_recomputation(num_beams):
    gen = tiny_generator("llama", max_source_length=64).eval()
    inputs = gen.encode_inputs(QUESTIONS, PASSAGES)
    n = inputs["input_ids"].size(0)
    args = (gen.start_token_id, gen.eos_token_id, gen.tokenizer.pad_token_id, num_beams, 6)
    full = gen.select_state(gen.start_decoding(inputs), torch.arange(n).repeat_interleave(num_beams))
    expected = beam_search(lambda p: reference_step(gen, full, p), n, *args)
    box = {"state": gen.start_decoding(inputs)}

    def reorder(parents):
        box["state"] = gen.select_state(box["state"], parents)

    got = beam_search(lambda p: gen.decode_step(box["state"], p), n, *args, reorder=reorder)
    assert [[ids for ids, _ in src] for src in got] == [[ids for ids, _ in src] for src in expected]
    assert [s for src in got for _, s in src] == pytest.approx([s for src in expected for _, s in src], abs=1e-4)
    assert any(ids for src in got for ids, _ in src)


# ------------------------------------------------------------------------------------------------ LoRA
def _train_step(gen, lr=0.05):
    inputs = gen.encode_inputs(QUESTIONS, PASSAGES)
    labels, mask = gen.encode_targets(ANSWERS)
    loss = -(gen.token_logprobs(inputs, labels) * mask).sum()
    loss.backward()
    opt = torch.optim.AdamW([p for p in gen.parameters()], lr=lr)          # the trainer passes all parameters
    opt.step()


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_with_lora_only_adapter_parameters_change(family):
    gen = tiny_generator(family, lora=lora(family=family))
    gen.train().requires_grad_(True)                   # what the trainer does every step: must not unfreeze the base
    before = {n: p.detach().clone() for n, p in gen.named_parameters()}
    _train_step(gen)
    changed = {n for n, p in gen.named_parameters() if not torch.equal(p, before[n])}
    adapters = {n for n in before if "lora_" in n}
    assert adapters and changed and changed <= adapters
    assert {n for n, p in gen.named_parameters() if p.requires_grad} == adapters
    gen.requires_grad_(False)
    assert not any(p.requires_grad for p in gen.parameters())


def test_full_fine_tuning_changes_the_base():
    gen = tiny_generator("llama").train()
    before = {n: p.detach().clone() for n, p in gen.named_parameters()}
    _train_step(gen)
    changed = {n for n, p in gen.named_parameters() if not torch.equal(p, before[n])}
    assert "model.model.layers.0.self_attn.q_proj.weight" in changed


def _logits(gen):
    inputs = gen.encode_inputs(QUESTIONS, PASSAGES)
    labels, _ = gen.encode_targets(ANSWERS)
    with torch.no_grad():
        return gen.eval().token_logprobs(inputs, labels)


def test_lora_save_load_gives_identical_logits_and_references_the_base(tmp_path):
    base = save_tiny_base(tmp_path / "base", "qwen2")
    cfg = GeneratorConfig(kind="hf-causal", name_or_path=str(base), max_source_length=64, max_target_length=8,
                          lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    gen = build_generator(cfg).train()
    gen.requires_grad_(True)
    _train_step(gen)
    gen.save(tmp_path / "ckpt")
    files = {p.relative_to(tmp_path / "ckpt").as_posix() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    assert "adapter/adapter_model.safetensors" in files and "adapter/adapter_config.json" in files
    assert not any(f.startswith(("base/", "model/")) for f in files)         # the base is referenced, not copied
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    assert sum(v.numel() for v in saved.values()) < 0.2 * sum(p.numel() for p in tiny_model("qwen2").parameters())
    meta = json.loads((tmp_path / "ckpt" / "generator.json").read_text())
    assert meta["kind"] == "hf-causal" and meta["base"] == str(base) and meta["lora"]["r"] == 4
    loaded = load_generator(tmp_path / "ckpt")
    assert isinstance(loaded, HFCausalGenerator)
    assert torch.equal(_logits(loaded), _logits(gen))
    assert not torch.equal(_logits(loaded), _logits(build_generator(cfg)))     # the trained adapter, not a new one
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {n for n in loaded._trainable}


def test_lora_over_an_in_memory_base_saves_the_base_too(tmp_path):
    gen = tiny_generator("llama", lora=lora_settings()).train()
    _train_step(gen)
    gen.save(tmp_path / "g")
    assert (tmp_path / "g" / "base" / "model.safetensors").is_file()
    loaded = load_generator(tmp_path / "g")
    assert torch.equal(_logits(loaded), _logits(gen))
    loaded.save(tmp_path / "again")                       # and it keeps the base through another save
    assert torch.equal(_logits(load_generator(tmp_path / "again")), _logits(gen))


def test_full_fine_tuning_save_load_gives_identical_logits(tmp_path):
    gen = tiny_generator("qwen2").train()
    _train_step(gen)
    gen.save(tmp_path / "g")
    assert (tmp_path / "g" / "model" / "model.safetensors").is_file()
    assert torch.equal(_logits(load_generator(tmp_path / "g")), _logits(gen))


def test_an_adapter_is_refused_on_another_base(tmp_path):
    base = save_tiny_base(tmp_path / "base", "llama", seed=0)
    gen = HFCausalGenerator(tiny_model("llama", 0).eval(), tiny_tokenizer(), name_or_path=str(base),
                            lora=lora_settings(), max_source_length=64)
    gen.save(tmp_path / "ckpt")
    save_tiny_base(tmp_path / "other", "llama", seed=1)           # same architecture, other weights
    with pytest.raises(CausalConfigError, match="another base model"):
        HFCausalGenerator.load(tmp_path / "ckpt", base=str(tmp_path / "other"))
    save_tiny_base(tmp_path / "base", "qwen2", seed=0)             # the referenced base replaced by another family
    with pytest.raises(CausalConfigError, match="another base model"):
        load_generator(tmp_path / "ckpt")
    save_tiny_base(tmp_path / "moved", "llama", seed=0)            # the same base somewhere else is fine
    assert isinstance(HFCausalGenerator.load(tmp_path / "ckpt", base=str(tmp_path / "moved")), HFCausalGenerator)


def test_export_merged_is_one_plain_model_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    gen = tiny_generator("llama", lora=lora_settings()).train()
    _train_step(gen)
    gen.eval()
    out = gen.export_merged(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = gen.encode_inputs(QUESTIONS[:1], PASSAGES[:1])["input_ids"]
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, gen.model(input_ids=ids).logits, atol=1e-5)
    assert any("lora_" in n for n, _ in gen.named_parameters())             # the live generator keeps its adapters
    assert json.loads((out / "latentrag_prompt.json").read_text())["prompt_template"] == gen.prompt_template


def test_export_merged_cli_writes_the_merged_model_of_a_checkpoint(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from jobs import cli

    gen = tiny_generator("llama", lora=lora_settings()).train()
    _train_step(gen)
    gen.eval()
    gen.save(tmp_path / "ckpt" / "generator")
    assert cli.main(["export-merged", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = gen.encode_inputs(QUESTIONS[:1], PASSAGES[:1])["input_ids"]
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, gen.model(input_ids=ids).logits, atol=1e-5)
    assert cli.main(["export-merged", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "merged")]) == 2
    assert "is not empty" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ memory settings
def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        gen = tiny_generator("llama", lora=lora_settings(), gradient_checkpointing=checkpointing).train()
        inputs = gen.encode_inputs(QUESTIONS, PASSAGES)
        labels, mask = gen.encode_targets(ANSWERS)
        (-(gen.token_logprobs(inputs, labels) * mask).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in gen.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-5) for n in grads[0])
    base = tiny_generator("llama", gradient_checkpointing=True)._base()
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing


def test_bfloat16_weights_train_on_cpu(tmp_path):
    base = save_tiny_base(tmp_path / "base", "qwen2")
    cfg = GeneratorConfig(kind="hf-causal", name_or_path=str(base), dtype="bfloat16", max_source_length=64,
                          lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    gen = build_generator(cfg).train()
    assert gen._base().model.layers[0].self_attn.k_proj.weight.dtype == torch.bfloat16
    fp32 = build_generator(GeneratorConfig(kind="hf-causal", name_or_path=str(base), max_source_length=64))
    inputs = gen.encode_inputs(QUESTIONS, PASSAGES)
    labels, mask = gen.encode_targets(ANSWERS)
    lp = gen.token_logprobs(inputs, labels)
    assert lp.dtype == torch.float32
    assert torch.allclose((lp * mask).sum(-1), (fp32.token_logprobs(inputs, labels) * mask).sum(-1), atol=0.3)
    (-(lp * mask).sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gen.trainable_parameters())
    gen.save(tmp_path / "g")
    assert load_generator(tmp_path / "g")._base().model.norm.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("template, slot", [("Question: {question}\nAnswer:", "passage"),
                                            ("Passage: {passage}\nAnswer:", "question"),
                                            ("{passage} {question} {passage}", "passage")])
def test_a_template_without_a_slot_is_refused(template, slot):
    with pytest.raises(ConfigError, match=r"\{" + slot + r"\}"):
        from_dict({"generator": {"kind": "hf-causal", "name_or_path": "x", "prompt_template": template}}).validate()
    with pytest.raises(ConfigError, match=r"\{" + slot + r"\}"):
        tiny_generator("llama", prompt_template=template)
    with pytest.raises(ConfigError, match=r"unknown slot\(s\) \{answer\}"):
        from_dict({"generator": {"kind": "hf-causal", "name_or_path": "x",
                                 "prompt_template": "{passage} {question} {answer}"}}).validate()


def test_lora_target_modules_that_match_nothing_are_refused(tmp_path):
    with pytest.raises(CausalConfigError, match=r"c_attn match no module .*q_proj"):
        tiny_generator("llama", lora=lora_settings(target_modules=["q_proj", "c_attn"]))
    base = save_tiny_base(tmp_path / "base", "qwen2")
    cfg = load_config(None, ["generator.kind=hf-causal", f"generator.name_or_path={base}",
                             "generator.lora.target_modules=query,value"])
    with pytest.raises(CausalConfigError, match="query, value match no module"):
        build_generator(cfg.generator)


def test_no_pad_token_pads_with_eos_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        gen = tiny_generator("llama", tokenizer=tiny_tokenizer(pad=False), max_source_length=64)
    assert gen.tokenizer.pad_token_id == gen.eos_token_id
    assert "no pad token; padding with its EOS token" in caplog.text
    # EOS as pad changes nothing: padding is masked, EOS at the end of each answer still counts
    ref = tiny_generator("llama", max_source_length=64)
    qs, ps, ans = QUESTIONS, PASSAGES, ANSWERS
    labels, mask = gen.encode_targets(ans)
    assert int(mask.sum()) == int(ref.encode_targets(ans)[1].sum())
    assert torch.allclose((gen.token_logprobs(gen.encode_inputs(qs, ps), labels) * mask).sum(-1),
                          one_at_a_time(ref, qs, ps, ans), atol=1e-5)
    with pytest.raises(CausalConfigError, match="neither a pad token nor an EOS"):
        tiny_generator("llama", tokenizer=tiny_tokenizer(pad=False, eos=False))


def test_quantized_base_is_refused_on_cpu():
    with pytest.raises(ConfigError, match="need a CUDA GPU"):
        load_config(None, ["generator.kind=hf-causal", "generator.name_or_path=x", "generator.quantize=4bit",
                           "generator.lora.r=8"])
    with pytest.raises(ConfigError, match="add a generator.lora section"):
        load_config(None, ["generator.kind=hf-causal", "generator.name_or_path=x", "generator.quantize=8bit",
                           "train.use_gpu=true"])
    if not torch.cuda.is_available():
        cfg = GeneratorConfig(kind="hf-causal", name_or_path="x", quantize="4bit", lora=LoraConfig())
        with pytest.raises(CausalConfigError, match="this machine has none"):
            build_generator(cfg)


def test_lora_keys_work_like_any_other_key(tmp_path):
    cfg = load_config(None, ["generator.kind=hf-causal", "generator.name_or_path=x", "generator.lora.r=8"])
    assert cfg.generator.lora == LoraConfig(r=8)                      # --set turns the section on with defaults
    assert load_config(None, ["generator.kind=hf-causal", "generator.name_or_path=x"]).generator.lora is None
    path = tmp_path / "c.yaml"
    path.write_text("generator:\n  kind: hf-causal\n  name_or_path: x\n  lora:\n    r: 4\n    alpha: 1e1\n"
                    "    target_modules: [q_proj, v_proj]\n")
    cfg = load_config(path, ["generator.lora.dropout=0.1"])
    assert cfg.generator.lora == LoraConfig(r=4, alpha=10.0, dropout=0.1, target_modules=["q_proj", "v_proj"])
    from pipeline.config import save_config

    save_config(cfg, tmp_path / "back.yaml")
    assert load_config(tmp_path / "back.yaml").generator == cfg.generator
    assert load_config(tmp_path / "back.yaml", ["generator.lora=null"]).generator.lora is None
    with pytest.raises(ConfigError, match=r"generator.lora.r: expected int"):
        load_config(path, ["generator.lora.r=1.5"])
    with pytest.raises(ConfigError, match=r"unknown key 'rank'"):
        load_config(path, ["generator.lora.rank=8"])
    with pytest.raises(ConfigError, match="only for generator.kind=hf-causal"):
        load_config(None, ["generator.lora.r=8"])
    for family in FAMILIES:                                          # the default targets exist in both families
        tiny_generator(family, lora={**lora_settings(), "target_modules": LoraConfig().target_modules})


def test_the_real_qwen_lora_config_loads_and_its_targets_exist_in_qwen2(tmp_path):
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "real_qwen_lora.yaml")
    g = cfg.generator
    assert g.kind == "hf-causal" and g.lora is not None and cfg.train.estimator == "jsa" and cfg.train.use_gpu
    gen = tiny_generator("qwen2", tokenizer=tiny_tokenizer(chat=True), chat_template=g.chat_template,
                         prompt_template=g.prompt_template, max_source_length=g.max_source_length,
                         lora={"r": g.lora.r, "alpha": g.lora.alpha, "dropout": g.lora.dropout,
                               "target_modules": g.lora.target_modules})
    wrapped = [n.split(".")[-4] for n, _ in gen.named_parameters() if "lora_A" in n]     # <module>.lora_A.default.weight
    assert sorted(set(wrapped)) == sorted(g.lora.target_modules) and len(wrapped) == 2 * 7     # 2 layers


def test_a_quantized_base_is_fingerprinted_by_architecture_only():
    """A QLoRA adapter (trained on a 4/8-bit base, whose packed weights no unquantized load reproduces) loads onto
    the unquantized base for eval and serving, and is still refused on another architecture."""
    from pipeline.models.hf_causal import base_fingerprint

    model = tiny_model("llama")
    model.config.quantization_config = {"load_in_4bit": True}          # what a bitsandbytes load leaves
    packed = base_fingerprint(model)
    assert packed["weights_sha256"] is None and packed["model_type"] == "llama"
    other_weights = tiny_model("llama", seed=5)
    assert isinstance(HFCausalGenerator(other_weights, tiny_tokenizer(), lora=lora_settings(), expected_base=packed),
                      HFCausalGenerator)
    with pytest.raises(CausalConfigError, match="another base model"):
        HFCausalGenerator(tiny_model("qwen2"), tiny_tokenizer(), lora=lora_settings(), expected_base=packed)


def test_preflight_refuses_bad_settings_without_loading_weights(tmp_path, monkeypatch):
    """What a driver can call before Ray starts: the model is built on the meta device, no weights are read."""
    from pipeline.models import hf_causal

    base = save_tiny_base(tmp_path / "base", "llama", pad=False)
    good = GeneratorConfig(kind="hf-causal", name_or_path=str(base), lora=LoraConfig())
    (base / "model.safetensors").unlink()                                 # no weights needed
    hf_causal.preflight(good)
    with pytest.raises(CausalConfigError, match="c_attn match no module"):
        hf_causal.preflight(GeneratorConfig(kind="hf-causal", name_or_path=str(base),
                                            lora=LoraConfig(target_modules=["c_attn"])))
    with pytest.raises(CausalConfigError, match="no chat template"):
        hf_causal.preflight(GeneratorConfig(kind="hf-causal", name_or_path=str(base), chat_template=True))
    with pytest.raises(ConfigError, match=r"\{passage\}"):
        hf_causal.preflight(GeneratorConfig(kind="hf-causal", name_or_path=str(base), prompt_template="{question}"))
    tiny_tokenizer(pad=False, eos=False).save_pretrained(base)
    with pytest.raises(CausalConfigError, match="neither a pad token nor an EOS"):
        hf_causal.preflight(good)
