"""A tiny RagModel on its own index (the embedded MiniLM, a small copy-bart), for checkpoints written by tests."""
from testlib import ANSWERS, PASSAGES, minilm_index


def tiny_model(index_root, passages=PASSAGES, seed: int = 0):
    """`passages`: a list of {id, title?, text}, or a number: the first that many of the six fixture passages."""
    import torch

    from pipeline.config import GeneratorConfig
    from pipeline.index import load_index
    from pipeline.models.generator import build_generator
    from pipeline.models.retriever import TextEncoder
    from pipeline.rag import RagModel

    passages = PASSAGES[:passages] if isinstance(passages, int) else passages
    encoder = TextEncoder()
    version = minilm_index(index_root, passages, encoder)
    torch.manual_seed(seed)
    gen = build_generator(GeneratorConfig(dropout=0.0, d_model=64, ffn_dim=128, encoder_layers=1, decoder_layers=1,
                                          max_target_length=8), ANSWERS)
    return RagModel(encoder, gen, load_index(version), tau=0.05)
