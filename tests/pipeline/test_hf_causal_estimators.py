"""hf-causal through the estimators, strategies and decoders: a real RagModel (in-memory index, a table query
encoder) over tiny Llama / Qwen2 generators. Marginals and decoded scores against direct computations, every
estimator's loss backpropagates into the adapters and the retriever, finite differences for the exact ones."""
import numpy as np
import pytest
import torch
from test_hf_causal_helpers import ANSWERS, FAMILIES, QUESTIONS, TEXTS, TITLES, causal_rag

from pipeline.config import EstimatorConfig, TrainConfig
from pipeline.decoding import beam_search, rag_sequence_decode, rag_token_decode
from pipeline.estimators import REGISTRY, build_estimator
from pipeline.estimators import registry as est_registry
from pipeline.index import passage_text
from pipeline.training import RagTrainer

K = 3

def direct_loglik(gen, question, passage, answer):
    """[T] log p(y_t | prompt, y_<t) from one plain forward over this one pair, no padding."""
    ids = gen.encode_inputs([question], [passage])["input_ids"][0].tolist()
    labels, mask = gen.encode_targets([answer])
    target = labels[0][mask[0].bool()].tolist()
    logits = gen.model(input_ids=torch.tensor([ids + target])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return torch.stack([logp[len(ids) - 1 + t, y] for t, y in enumerate(target)])


@pytest.mark.parametrize("family", FAMILIES)
def test_rag_sequence_and_rag_token_losses_equal_a_direct_computation(family):
    model = causal_rag(family).eval()
    cand = model.retrieve(QUESTIONS, K)
    doc_lp = torch.log_softmax(model.doc_scores(QUESTIONS, cand), -1).detach()
    seq, tok = [], []
    for b, (q, a) in enumerate(zip(QUESTIONS, ANSWERS)):
        per = [direct_loglik(model.generator, q, p, a).detach() for p in cand.texts[b]]          # K x [T]
        seq.append(-torch.logsumexp(doc_lp[b] + torch.stack([x.sum() for x in per]), 0))
        tok.append(-torch.logsumexp(doc_lp[b].unsqueeze(1) + torch.stack(per), 0).sum())
    got_seq = build_estimator("rag-sequence", k=K).loss(model, QUESTIONS, ANSWERS).loss
    got_tok = build_estimator("rag-token", k=K).loss(model, QUESTIONS, ANSWERS).loss
    assert float(got_seq) == pytest.approx(float(torch.stack(seq).mean()), abs=1e-5)
    assert float(got_tok) == pytest.approx(float(torch.stack(tok).mean()), abs=1e-5)
    assert abs(float(got_seq) - float(got_tok)) > 1e-3                    # the two marginals do differ here


def _estimator_cfg():
    return EstimatorConfig(jsa_num_proposals=4, jsa_cache=False)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_estimator_backpropagates_into_the_adapters_and_the_retriever(name):
    torch.manual_seed(0)
    model = causal_rag("qwen2").train()
    model.generator.requires_grad_(True)
    est = build_estimator(name, k=K, cfg=_estimator_cfg())
    est.prepare(model)
    rows = [{"question": q, "answers": [a], "id": str(i)} for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))]
    out = est.loss(model, QUESTIONS, ANSWERS, rows=rows if est.needs_rows else None)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    adapters = [p for n, p in model.generator.named_parameters() if "lora_B" in n]
    assert adapters and any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in adapters)
    assert all(p.grad is None for n, p in model.generator.named_parameters() if "lora_" not in n)
    assert model.query_encoder.table.grad is not None and float(model.query_encoder.table.grad.abs().sum()) > 0


def _params(model):
    lora_b = [p for n, p in model.generator.named_parameters() if "lora_B" in n]
    return [model.query_encoder.table, model.posterior_encoder.table, lora_b[0], lora_b[-1]]


@pytest.mark.parametrize("name", ["rag-sequence", "rag-token", "vrag", "jsa"])
def test_exact_estimators_gradients_match_finite_differences(name):
    """In float64 on GPT-2 (Llama's and Qwen2's RMSNorm compute in float32 whatever the weights' dtype, too coarse
    for differences of 1e-6); lora_B starts at zero, so it gets small random values to make every path matter."""
    model = causal_rag("gpt2", dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.generator.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    est = build_estimator(name, k=K, cfg=_estimator_cfg())

    def f():
        torch.manual_seed(123)
        return est.loss(model, QUESTIONS, ANSWERS).loss

    params = _params(model)
    f().backward()
    rng = np.random.default_rng(0)
    checked = 0
    for p in params:
        if p.grad is None:
            continue
        for _ in range(3):
            idx = tuple(int(rng.integers(s)) for s in p.shape)
            with torch.no_grad():
                orig = p[idx].item()
                p[idx] = orig + 1e-6
                up = float(f())
                p[idx] = orig - 1e-6
                down = float(f())
                p[idx] = orig
            assert p.grad[idx].item() == pytest.approx((up - down) / 2e-6, abs=1e-6, rel=1e-4), (name, p.shape, idx)
            checked += 1
    assert checked >= (12 if name in ("vrag", "jsa") else 9)


@pytest.mark.parametrize("strategy", list(est_registry.STRATEGIES))
def test_every_strategy_trains_the_adapters_only(strategy):
    torch.manual_seed(0)
    model = causal_rag("llama")
    model.posterior_encoder = None
    rows = [{"question": q, "answers": [a], "id": str(i), "gold_passage_ids": [f"p{2 * i}"]}
            for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))]
    cfg = TrainConfig(strategy=strategy, batch_size=2, max_steps=2, warmup_steps=0, lr_decay="constant", k=K,
                      estimator="jsa", independent_hard_negatives=1)
    trainer = RagTrainer(model, build_estimator("jsa", k=K, cfg=_estimator_cfg()), rows, cfg, 0.1, 0.1)
    before = {n: p.detach().clone() for n, p in model.generator.named_parameters()}
    for _ in range(2):
        m = trainer.step()
        assert np.isfinite(m["loss"])
    changed = {n for n, p in model.generator.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


# ------------------------------------------------------------------------------------------------ decoding
def _greedy_alone(gen, question, passage, max_len=6):
    """Greedy decoding of one pair with whole recomputation every step: (token ids, log-probability)."""
    ids = gen.encode_inputs([question], [passage])["input_ids"][0].tolist()
    out, total = [], 0.0
    for _ in range(max_len):
        logp = torch.log_softmax(gen.model(input_ids=torch.tensor([ids + out])).logits[0, -1].float(), -1)
        tok = int(logp.argmax())
        total += float(logp[tok])
        if tok == gen.eos_token_id:
            break
        out.append(tok)
    return out, total


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_rag_sequence_decoding_equals_a_direct_computation(family):
    model = causal_rag(family, lora=False).eval()
    gen = model.generator
    cand = model.retrieve(QUESTIONS, K)
    doc_lp = torch.log_softmax(model.doc_scores(QUESTIONS, cand), -1)
    fast = rag_sequence_decode(model, QUESTIONS, k=K, num_beams=1, max_len=6)
    thorough = rag_sequence_decode(model, QUESTIONS, k=K, num_beams=1, max_len=6, thorough=True)
    for b, q in enumerate(QUESTIONS):
        produced = {}
        for kk, p in enumerate(cand.texts[b]):
            ids, lp = _greedy_alone(gen, q, p)
            produced.setdefault(gen.decode(ids), {})[kk] = lp
        scores = {t: float(torch.logsumexp(torch.tensor([doc_lp[b, kk] + lp for kk, lp in per.items()]), 0))
                  for t, per in produced.items()}
        best = max(scores, key=scores.get)
        assert fast[b].answer == best and fast[b].score == pytest.approx(scores[best], abs=1e-4)
        # thorough: every distinct answer rescored under all K passages
        rescored = {t: float(torch.logsumexp(torch.stack(
            [doc_lp[b, kk] + direct_loglik(gen, q, p, t).sum() for kk, p in enumerate(cand.texts[b])]), 0))
            for t in produced}
        best = max(rescored, key=rescored.get)
        assert thorough[b].answer == best and thorough[b].score == pytest.approx(rescored[best], abs=1e-4)
    assert all(a.answer for a in fast)


@pytest.mark.parametrize("num_beams", [1, 3])
@torch.no_grad()
def test_rag_token_decoding_equals_the_uncached_marginal_beam_search(num_beams):
    model = causal_rag("qwen2", lora=False).eval()
    gen = model.generator
    got = rag_token_decode(model, QUESTIONS, k=K, num_beams=num_beams, max_len=6)
    cand = model.retrieve(QUESTIONS, K)
    prior = torch.log_softmax(model.doc_scores(QUESTIONS, cand), -1)
    b = len(QUESTIONS)
    prompts = [gen.encode_inputs([q], [p])["input_ids"][0].tolist() for q, row in zip(QUESTIONS, cand.texts)
               for p in row]

    def step(prefix):                     # [b * num_beams, t]: every beam under its question's K passages, alone
        rows = []
        for r in range(prefix.size(0)):
            qi = r // num_beams
            logps = [torch.log_softmax(gen.model(input_ids=torch.tensor([prompts[qi * K + kk] + prefix[r, 1:].tolist()]))
                                       .logits[0, -1].float(), -1) for kk in range(K)]
            rows.append(torch.logsumexp(torch.stack(logps) + prior[qi].unsqueeze(1), 0))
        return torch.stack(rows)

    expected = beam_search(step, b, gen.start_token_id, gen.eos_token_id, gen.tokenizer.pad_token_id, num_beams, 6)
    assert [a.answer for a in got] == [gen.decode(src[0][0]) for src in expected]
    assert [a.score for a in got] == pytest.approx([src[0][1] for src in expected], abs=1e-4)
    assert all(a.answer for a in got)


def test_passage_text_is_title_and_text():
    model = causal_rag("llama")
    assert model.row_text(0) == passage_text(TITLES[0], TEXTS[0]) == "Varnel Ostrik. " + TEXTS[0]
