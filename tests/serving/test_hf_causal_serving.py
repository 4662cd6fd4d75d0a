"""Serving an hf-causal (LoRA) checkpoint: the Generator deployment's loading, batching (left-padded prompts of
different lengths decoded together give what each request alone gives) and token streaming, without Ray; and one
HTTP round trip through `build_app` on the shared Ray, whose answers equal in-process decoding."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))       # the tiny-model helpers
from test_hf_causal_helpers import lora_settings, save_tiny_base  # noqa: E402

from serving.app import _decode_group, _retrieve_group, _text_pieces  # noqa: E402
from serving.batching import AnswerItem, RetrieveItem  # noqa: E402
from serving.loading import load_generator_part, load_retriever_part, resolve_model_ref  # noqa: E402

PASSAGES = [
    {"id": "a", "title": "Varnel Ostrik", "text": "Varnel Ostrik was born in the town of Meridale."},
    {"id": "b", "title": "Varnel Ostrik", "text": "Varnel Ostrik worked for the Quendle Guild."},
    {"id": "c", "title": "Kela Dorn", "text": "Kela Dorn plays the zumbrel at festivals, " * 6},
    {"id": "d", "title": "Kela Dorn", "text": "Kela Dorn grew up beside the river Ashvane."},
]
QUESTIONS = ["Where was Varnel Ostrik born?", "Who?", "What does Kela Dorn play at the festivals of the town?"]


@pytest.fixture(scope="module")
def causal_checkpoint(tmp_path_factory):
    from pipeline.checkpoint import save_checkpoint
    from pipeline.config import Config, GeneratorConfig, LoraConfig
    from pipeline.index import load_index, passage_text, write_index_version
    from pipeline.models.generator import build_generator
    from pipeline.models.retriever import TextEncoder, encoder_fingerprint
    from pipeline.rag import RagModel

    root = tmp_path_factory.mktemp("causal_serving")
    encoder = TextEncoder()
    emb = encoder.encode([passage_text(p["title"], p["text"]) for p in PASSAGES]).numpy()
    version = write_index_version(root / "index", emb, [p["id"] for p in PASSAGES], "flat", encoder_name="minilm",
                                  encoder_fingerprint=encoder_fingerprint("minilm"), corpus_fingerprint="tiny",
                                  titles=[p["title"] for p in PASSAGES], texts=[p["text"] for p in PASSAGES])
    base = save_tiny_base(root / "base", "qwen2", pad=False)                   # pads with EOS, as Qwen bases do
    cfg = Config(generator=GeneratorConfig(kind="hf-causal", name_or_path=str(base), max_source_length=48,
                                           max_target_length=6, lora=LoraConfig(**lora_settings())))
    gen = build_generator(cfg.generator)
    with torch.no_grad():                     # a non-zero adapter, so that serving must load it to agree
        for n, p in gen.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    ckpt = save_checkpoint(root / "ckpt", RagModel(encoder, gen, load_index(version), tau=0.05), cfg, step=3)
    return ckpt, gen


@pytest.fixture(scope="module")
def parts(causal_checkpoint):
    ref = resolve_model_ref(str(causal_checkpoint[0]))
    return load_retriever_part(ref), load_generator_part(ref)


def items(retriever, mode, k, num_beams):
    found = _retrieve_group(retriever, [RetrieveItem({}, q, k) for q in QUESTIONS])
    return [AnswerItem({}, q, mode, k, num_beams, 6, retrieved=r) for q, r in zip(QUESTIONS, found)]


def test_serving_loads_base_and_adapter(causal_checkpoint, parts):
    from pipeline.models.hf_causal import HFCausalGenerator

    ckpt, trained = causal_checkpoint
    gen = parts[1]
    assert isinstance(gen, HFCausalGenerator) and not gen.training
    assert not (Path(ckpt) / "generator" / "base").exists()                  # referenced by path, not copied
    inputs = gen.encode_inputs(QUESTIONS, [p["text"] for p in PASSAGES[:3]])
    labels, _ = gen.encode_targets(["Meridale", "Quendle Guild", "zumbrel"])
    with torch.no_grad():
        assert torch.equal(gen.token_logprobs(inputs, labels), trained.eval().token_logprobs(inputs, labels))


@pytest.mark.parametrize("mode, num_beams", [("rag-sequence", 1), ("rag-sequence", 2), ("rag-token", 2)])
def test_a_batch_of_causal_requests_equals_one_at_a_time(parts, monkeypatch, mode, num_beams):
    retriever, gen = parts
    batch = items(retriever, mode, 3, num_beams)
    alone = [_decode_group(gen, [it], thorough=False)[0] for it in batch]
    rows = []
    start = gen.start_decoding

    def counting_start(inputs):
        rows.append(inputs["attention_mask"])
        return start(inputs)

    monkeypatch.setattr(gen, "start_decoding", counting_start)
    together = _decode_group(gen, batch, thorough=False)
    assert len(rows) == 1 and rows[0].size(0) == len(QUESTIONS) * 3            # one prompt pass for the batch
    assert len(set(rows[0].sum(1).tolist())) > 2 and bool((rows[0][:, -1] == 1).all())   # left padded, mixed
    assert [o.answer for o in together] == [o.answer for o in alone]
    assert [o.score for o in together] == pytest.approx([o.score for o in alone], abs=1e-4)
    assert all(o.answer for o in together)


def test_streamed_tokens_make_the_answer(parts):
    retriever, gen = parts
    item = items(retriever, "rag-token", 3, 1)[0]
    prefixes = []
    stop = {gen.eos_token_id, gen.tokenizer.pad_token_id}

    def on_step(prefix):
        ids = prefix[0, 1:].tolist()
        if ids and ids[-1] not in stop:
            prefixes.append(ids)

    out = _decode_group(gen, [item], thorough=False, on_step=on_step)[0]
    pieces = list(_text_pieces(gen, prefixes))
    assert len(pieces) >= 2 and "".join(pieces) == out.answer


@pytest.mark.ray
def test_served_answers_equal_in_process_decoding(ray_local, causal_checkpoint, parts, free_port):
    import requests
    from ray import serve

    from serving.app import build_app

    ckpt, _ = causal_checkpoint
    retriever, gen = parts
    zero = {"ray_actor_options": {"num_cpus": 0}}
    serve.start(http_options={"host": "127.0.0.1", "port": free_port})
    serve.run(build_app({"checkpoint": str(ckpt), "generator_threads": 1, "default_k": 3},
                        {name: dict(zero) for name in ("Ingress", "Retriever", "Generator")}),
              name="latentrag-causal", route_prefix="/causal")
    try:
        url = f"http://127.0.0.1:{free_port}/causal"
        for mode in ("rag-sequence", "rag-token"):
            expected = _decode_group(gen, items(retriever, mode, 3, 1), thorough=False)
            for question, want in zip(QUESTIONS, expected):
                r = requests.post(f"{url}/v1/answer", json={"question": question, "k": 3, "mode": mode,
                                                           "max_new_tokens": 6}, timeout=120)
                assert r.status_code == 200, r.text
                assert r.json()["answer"] == want.answer
                assert r.json()["score"] == pytest.approx(want.score, abs=1e-4)
        r = requests.post(f"{url}/v1/answer/stream", json={"question": QUESTIONS[0], "k": 3, "mode": "rag-token",
                                                           "max_new_tokens": 6}, stream=True, timeout=120)
        events, name = [], None
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("event:"):
                name = line[len("event:"):].strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line[len("data:"):])))
        tokens = [e["text"] for n, e in events if n == "token"]
        done = [e for n, e in events if n == "done"]
        assert len(tokens) >= 2 and done and "".join(tokens) == done[-1]["answer"]
    finally:
        serve.delete("latentrag-causal")
