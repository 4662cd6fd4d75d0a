"""Top-K marginal likelihoods of RAG (Lewis et al. 2020). A public contract:

token_logprobs [B, K, T] = log p(y_t | x, z_k, y_<t) of the target tokens,
doc_logprobs   [B, K]    = log p(z_k | x), normalised over the K passages,
target_mask    [B, T]    = 1 on real target tokens.

Both equal Hugging Face `RagSequenceForGeneration.get_nll` / `RagTokenForGeneration.get_nll`
(label_smoothing 0, exclude_bos_score False) on the same inputs.
"""
from __future__ import annotations

import torch


def sequence_logprobs(token_logprobs: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """[B, K] log p(y | x, z_k) = sum over real target tokens."""
    return (token_logprobs * target_mask.unsqueeze(1).to(token_logprobs.dtype)).sum(-1)


def rag_sequence_nll(token_logprobs: torch.Tensor, doc_logprobs: torch.Tensor,
                     target_mask: torch.Tensor) -> torch.Tensor:
    """-log sum_k p(z_k|x) p(y|x,z_k), per example: [B]."""
    return -torch.logsumexp(doc_logprobs + sequence_logprobs(token_logprobs, target_mask), dim=1)


def rag_token_nll(token_logprobs: torch.Tensor, doc_logprobs: torch.Tensor,
                  target_mask: torch.Tensor) -> torch.Tensor:
    """-sum_t log sum_k p(z_k|x) p(y_t|x,z_k,y_<t), per example: [B]."""
    per_token = torch.logsumexp(doc_logprobs.unsqueeze(-1) + token_logprobs, dim=1)   # [B, T]
    return -(per_token * target_mask.to(per_token.dtype)).sum(-1)


def passage_posterior(token_logprobs: torch.Tensor, doc_logprobs: torch.Tensor,
                      target_mask: torch.Tensor) -> torch.Tensor:
    """[B, K] p(z_k | x, y) within the top-K: what rag-sequence's gradient weights each passage by."""
    joint = doc_logprobs + sequence_logprobs(token_logprobs, target_mask)
    return torch.softmax(joint, dim=1)
