"""The exact marginal over the whole knowledge base, and the estimators measured against it (issue 22).

The tiny "model" is test_estimators.fake_model: a real RagModel whose encoders and generator are lookup tables over
N_PASSAGES = 6 passages (double precision), so brute force is a loop over six passages.
"""
import numpy as np
import pytest
import torch
from test_estimators import N_PASSAGES, _fd_check, fake_model, seq_loglik
from testlib import ANSWERS, PASSAGES

from pipeline.config import ConfigError, EstimatorConfig, GeneratorConfig, load_config
from pipeline.estimators import build_estimator
from pipeline.index import ArrayIndex, passage_text
from pipeline.models.generator import build_generator
from pipeline.models.retriever import TextEncoder
from pipeline.rag import RagModel
from pipeline.training import RagTrainer


def brute_force_nll(model, q: int) -> float:
    """-log sum_z p(z|x) p(y|x,z), one passage at a time."""
    prior = torch.softmax(model.query_encoder.table[q].detach(), 0)
    lik = seq_loglik(model, q).exp()
    return -float(torch.log(sum(prior[z] * lik[z] for z in range(N_PASSAGES))))


# ------------------------------------------------------------------------------------------------ exact
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_exact_marginal_equals_brute_force(chunk):
    model = fake_model(11)
    est = build_estimator("exact", k=2, cfg=EstimatorConfig(exact_chunk_size=chunk))
    out = est.loss(model, ["q0", "q1"], ["a", "a"])
    expected = np.mean([brute_force_nll(model, q) for q in range(2)])
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.diagnostics["gen_rows_per_example"] == N_PASSAGES
    assert 0.0 < out.diagnostics["posterior_mass_in_prior_topk"] < 1.0      # top-2 of 6 misses some of it


def test_exact_marginal_equals_brute_force_on_a_real_generator_and_minilm():
    """Six real passages, the MiniLM retriever and a copy-bart generator: the chunked, checkpointed exact marginal
    and its gradient equal one pair_logprobs call per passage summed by hand."""
    encoder = TextEncoder("minilm")
    texts = [passage_text(p["title"], p["text"]) for p in PASSAGES]
    index = ArrayIndex(encoder.encode(texts).numpy(), ids=[p["id"] for p in PASSAGES],
                       texts=[p["text"] for p in PASSAGES], titles=[p["title"] for p in PASSAGES])
    torch.manual_seed(0)
    gen = build_generator(GeneratorConfig(dropout=0.0, d_model=32, ffn_dim=64, encoder_layers=1, decoder_layers=1,
                                          attention_heads=2, init="random"), ANSWERS)
    model = RagModel(encoder, gen, index, tau=0.05).eval()
    questions, answers = ["Where was Varnel Ostrik born?", "What does Tamsin Vey keep?"], ["Meridale", "bees"]
    params = list(model.parameters())

    def grads():
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])

    model.zero_grad()
    out = build_estimator("exact", cfg=EstimatorConfig(exact_chunk_size=4)).loss(model, questions, answers)
    out.loss.backward()
    ours = grads()
    model.zero_grad()
    total = 0.0
    for question, answer in zip(questions, answers):
        scores = model.score_rows(model.query_encoder([question]), np.arange(len(PASSAGES))[None, :])[0]
        log_prior = torch.log_softmax(scores, -1)
        terms = []
        for z in range(len(PASSAGES)):                         # one passage at a time
            lp, mask = model.pair_logprobs([question], [model.row_text(z)], [answer])
            terms.append(log_prior[z] + (lp * mask).sum())
        total = total - torch.logsumexp(torch.stack(terms), 0) / len(questions)
    total.backward()
    assert out.loss.item() == pytest.approx(total.item(), abs=1e-6)
    assert torch.allclose(ours, grads(), atol=1e-6, rtol=1e-4)
    assert float(grads().abs().sum()) > 0


def test_exact_gradient_matches_finite_differences():
    model = fake_model(12)                              # its posterior table gets no gradient: not checked
    est = build_estimator("exact", cfg=EstimatorConfig(exact_chunk_size=4))     # 12 pairs: three chunks
    checked = _fd_check(model, lambda: est.loss(model, ["q0", "q1"], ["a", "a"]).loss, coords=8)
    assert checked == 16                                  # the prior table and the generator table both checked


def test_exact_refuses_an_index_above_the_limit_before_any_work():
    model = fake_model(13)
    calls = []
    original = model.generator.token_logprobs
    model.generator.token_logprobs = lambda *a: calls.append(1) or original(*a)
    est = build_estimator("exact", cfg=EstimatorConfig(exact_max_passages=N_PASSAGES - 1))
    with pytest.raises(ValueError, match=r"index holds 6 passages, more than estimator\.exact_max_passages=5.*"
                                         r"Raise estimator\.exact_max_passages"):
        est.loss(model, ["q0"], ["a"])
    with pytest.raises(ValueError, match=r"estimator\.exact_max_passages"):      # a trainer refuses it at set-up
        RagTrainer(model, est, [{"question": "q0", "answers": ["a"]}], load_config(None, []).train, 0.1, 0.1)
    assert calls == []
    at_limit = build_estimator("exact", cfg=EstimatorConfig(exact_max_passages=N_PASSAGES))
    assert torch.isfinite(at_limit.loss(model, ["q0"], ["a"]).loss) and calls
    with pytest.raises(ConfigError, match=r"^estimator\.exact_chunk_size: must be >= 1, got 0$"):
        load_config(None, ["estimator.exact_chunk_size=0"])



def test_exact_trains_a_small_kb_through_the_trainer():
    """Small-KB training: the trainer's steps (per-module clipping, optimiser) lower the exact -log p(y|x)."""
    model = fake_model(14)
    est = build_estimator("exact", cfg=EstimatorConfig(exact_chunk_size=5))
    rows = [{"question": f"q{i % 2}", "answers": ["a"]} for i in range(4)]
    cfg = load_config(None, ["train.batch_size=2", "train.warmup_steps=0", "train.lr_decay=constant"]).train
    before = est.loss(model, ["q0", "q1"], ["a", "a"]).loss.item()
    trainer = RagTrainer(model, est, rows, cfg, 0.5, 0.5)
    for _ in range(20):
        m = trainer.step()
    assert m["grad_norm/retriever"] > 0 and m["grad_norm/generator"] > 0
    assert est.loss(model, ["q0", "q1"], ["a", "a"]).loss.item() < before - 0.1

# -------------------------------------------------------------------------------- estimators vs the truth
def _grad(model, params, loss_fn) -> torch.Tensor:
    for p in params:
        p.grad = None
    loss_fn().backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def _monte_carlo(model, params, est, groups: int, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean gradient over groups x copies independent estimates (each group one batch of `copies` copies of q0 and
    q1, its own seed) and the standard error of that mean per coordinate (spread of the group means)."""
    means = []
    for g in range(groups):
        torch.manual_seed(1000 + g)
        means.append(_grad(model, params, lambda: est.loss(model, ["q0", "q1"] * copies, ["a", "a"] * copies).loss))
    means = torch.stack(means)
    return means.mean(0), means.std(0) / groups ** 0.5


def test_sampled_vrag_mean_gradient_is_the_enumerated_elbo_gradient():
    """4,000 score-function estimates (3 samples each from q over the posterior top-3): their mean gradient (prior,
    posterior and generator tables, 48 coordinates) is within 5 standard errors of the enumerated ELBO gradient in
    every coordinate; the Monte-Carlo error of the mean is about 1.2% of the gradient's norm (measured: relative
    error 0.009). One estimate alone is far off: the test is about the mean, not a copy of the enumerated loss."""
    model = fake_model(4)
    params = [model.query_encoder.table, model.posterior_encoder.table, model.generator.logits]
    cfg = dict(vrag_beta=0.7)
    enumerated = _grad(model, params, lambda: build_estimator("vrag", k=3, cfg=EstimatorConfig(**cfg)).loss(
        model, ["q0", "q1"], ["a", "a"]).loss)
    sampled = build_estimator("vrag", k=3, cfg=EstimatorConfig(**cfg, vrag_mode="sampled", vrag_num_samples=3))
    mean, se = _monte_carlo(model, params, sampled, groups=20, copies=100)
    z = (mean - enumerated).abs() / se.clamp_min(1e-12)
    assert float(z.max()) < 5.0, z
    assert float((mean - enumerated).norm() / enumerated.norm()) < 0.05
    assert float(se.norm() / enumerated.norm()) < 0.03                          # the error stated above
    torch.manual_seed(0)
    one = _grad(model, params, lambda: sampled.loss(model, ["q0", "q1"], ["a", "a"]).loss)
    assert float((one - enumerated).norm() / enumerated.norm()) > 0.1          # it really samples
    out = sampled.loss(model, ["q0", "q1"], ["a", "a"])
    assert out.diagnostics["distinct_samples"] <= 3 and out.diagnostics["kl"] >= 0


def test_sampled_vrag_settings_are_validated():
    with pytest.raises(ConfigError, match=r"^estimator\.vrag_mode: 'reinforce'; choose enumerated or sampled$"):
        load_config(None, ["estimator.vrag_mode=reinforce"])
    with pytest.raises(ConfigError, match=r"^estimator\.vrag_num_samples: must be >= 1, got 0$"):
        load_config(None, ["estimator.vrag_num_samples=0"])
    assert load_config(None, []).estimator.vrag_mode == "enumerated"


def test_jsa_mean_gradient_approaches_the_exact_gradient_as_chains_grow():
    """K = all six passages, so JSA's C (prior top-K ∪ posterior top-K) is the whole knowledge base and its p(z|x)
    the true prior: the chain's stationary law is the true posterior p(z|x,y), and by Fisher's identity the expected
    prior and generator gradient of a chain's states tends to the exact -grad log p(y|x) as its length n grows (no
    cache: every chain starts from a q sample, the bias of the time average decays like 1/n). 2,000 chains per n;
    the Monte-Carlo error of each mean is under 10% of the exact gradient's norm (measured 8% at n=1, 1.5% at
    n=64; relative errors about 1.0, 0.45, 0.12, 0.03 at n = 1, 4, 16, 64)."""
    model = fake_model(4)
    params = [model.query_encoder.table, model.generator.logits]
    exact = _grad(model, params, lambda: build_estimator("exact").loss(model, ["q0", "q1"], ["a", "a"]).loss)
    errors, mc = [], []
    for n in (1, 4, 16, 64):
        est = build_estimator("jsa", k=N_PASSAGES, cfg=EstimatorConfig(jsa_num_proposals=n, jsa_cache=False))
        mean, se = _monte_carlo(model, params, est, groups=10, copies=100)
        errors.append(float((mean - exact).norm() / exact.norm()))
        mc.append(float(se.norm() / exact.norm()))
    assert max(mc) < 0.1, mc
    assert errors[0] > errors[1] > errors[2] > errors[3], errors
    assert errors[3] < 0.3 * errors[1] and errors[3] < 0.1, (errors, mc)
