"""The marginal likelihoods equal Hugging Face's RAG get_nll, and brute force, on the same inputs."""

import pytest
import torch

from pipeline.estimators.marginals import passage_posterior, rag_sequence_nll, rag_token_nll

PAD = 1


@pytest.fixture(scope="module")
def hf_rag_models():
    from transformers import (BartConfig, DPRConfig, RagConfig, RagSequenceForGeneration, RagTokenForGeneration)

    q = DPRConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    g = BartConfig(vocab_size=50, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                   decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, pad_token_id=PAD,
                   bos_token_id=0, eos_token_id=2, max_position_embeddings=32)
    cfg = RagConfig.from_question_encoder_generator_configs(q, g, n_docs=3)
    return RagSequenceForGeneration(cfg), RagTokenForGeneration(cfg)


def _inputs(seed=0, b=4, k=3, length=7, vocab=50):
    gen = torch.Generator().manual_seed(seed)
    seq_logits = torch.randn(b * k, length, vocab, generator=gen, dtype=torch.float64)
    doc_scores = torch.randn(b, k, generator=gen, dtype=torch.float64)
    target = torch.randint(3, vocab, (b, length), generator=gen)
    target[0, 5:] = PAD                      # ragged targets: padding at the end
    target[2, 4:] = PAD
    # ours: token t of the target is HF's target shifted left by one (HF drops the first label)
    shifted = torch.cat([target[:, 1:], torch.full((b, 1), PAD)], 1)
    logp = torch.log_softmax(seq_logits, -1).view(b, k, length, vocab)
    token_logprobs = logp.gather(-1, shifted.view(b, 1, length, 1).expand(b, k, length, 1)).squeeze(-1)
    mask = shifted.ne(PAD).long()
    doc_logprobs = torch.log_softmax(doc_scores, -1)
    return seq_logits, doc_scores, target, token_logprobs, doc_logprobs, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rag_sequence_equals_hugging_face(hf_rag_models, seed):
    seq_model, _ = hf_rag_models
    seq_logits, doc_scores, target, token_lp, doc_lp, mask = _inputs(seed)
    theirs = seq_model.get_nll(seq_logits, doc_scores, target, reduce_loss=False, epsilon=0.0,
                               exclude_bos_score=False, n_docs=3)
    ours = rag_sequence_nll(token_lp, doc_lp, mask)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rag_token_equals_hugging_face(hf_rag_models, seed):
    _, tok_model = hf_rag_models
    seq_logits, doc_scores, target, token_lp, doc_lp, mask = _inputs(seed)
    theirs = tok_model.get_nll(seq_logits, doc_scores, target, reduce_loss=False, epsilon=0.0, n_docs=3)
    ours = rag_token_nll(token_lp, doc_lp, mask)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)


def test_rag_sequence_with_whole_corpus_is_exact_marginal():
    """K = every passage: the loss is -log sum_z p(z|x) p(y|x,z), computed here by brute-force enumeration."""
    gen = torch.Generator().manual_seed(3)
    n_passages, length, vocab = 4, 3, 5
    prior = torch.softmax(torch.randn(n_passages, generator=gen, dtype=torch.float64), 0)
    cond = torch.softmax(torch.randn(n_passages, length, vocab, generator=gen, dtype=torch.float64), -1)
    y = [1, 4, 2]
    exact = sum(prior[z] * torch.prod(torch.stack([cond[z, t, y[t]] for t in range(length)]))
                for z in range(n_passages))
    token_lp = torch.log(cond[:, torch.arange(length), torch.tensor(y)]).unsqueeze(0)
    ours = rag_sequence_nll(token_lp, prior.log().unsqueeze(0), torch.ones(1, length))
    assert torch.allclose(ours, -torch.log(exact).view(1), atol=1e-12)


def test_rag_token_is_per_token_marginal_by_enumeration():
    gen = torch.Generator().manual_seed(4)
    k, length = 3, 4
    prior = torch.softmax(torch.randn(k, generator=gen, dtype=torch.float64), 0)
    p_tok = torch.rand(k, length, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    expected = -sum(torch.log(sum(prior[z] * p_tok[z, t] for z in range(k))) for t in range(length))
    ours = rag_token_nll(p_tok.log().unsqueeze(0), prior.log().unsqueeze(0), torch.ones(1, length))
    assert torch.allclose(ours, expected.view(1), atol=1e-12)


def test_masked_tokens_do_not_count():
    token_lp = torch.log(torch.full((1, 2, 4), 0.5))
    token_lp[..., 3] = -50.0                        # garbage under the padding
    mask = torch.tensor([[1, 1, 1, 0]])
    doc_lp = torch.log(torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(rag_sequence_nll(token_lp, doc_lp, mask), torch.tensor([3 * 0.6931471805599453]))
    assert torch.allclose(rag_token_nll(token_lp, doc_lp, mask), torch.tensor([3 * 0.6931471805599453]))


def test_posterior_is_bayes_rule_and_gradients_flow():
    doc_scores = torch.randn(2, 3, requires_grad=True)
    token_lp = torch.randn(2, 3, 4).log_softmax(-1).requires_grad_(True)
    mask = torch.ones(2, 4)
    doc_lp = torch.log_softmax(doc_scores, -1)
    post = passage_posterior(token_lp, doc_lp, mask)
    joint = doc_lp.exp() * token_lp.sum(-1).exp()
    assert torch.allclose(post, joint / joint.sum(-1, keepdim=True), atol=1e-6)
    rag_sequence_nll(token_lp, doc_lp, mask).sum().backward()
    # d(-log sum_k p_k L_k)/d score_j = p_j - post_j (softmax prior): the retriever moves toward the posterior
    assert torch.allclose(doc_scores.grad, doc_lp.exp().detach() - post.detach(), atol=1e-5)
