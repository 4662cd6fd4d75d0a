"""Tiny real checkpoints for the serving tests: the embedded MiniLM query encoder, a 6-passage index and a small
copy-bart generator, written with pipeline.checkpoint.save_checkpoint (no training, a few seconds)."""
import socket

import pytest
from serve_testlib import BODY_LIMIT, TOKEN
from testlib import ANSWERS, PASSAGES, minilm_index

from serving.app import use_serve_throughput_env

use_serve_throughput_env()      # Serve's request path as `latentrag serve` runs it (read when Ray starts)


def write_index(root, encoder):
    return minilm_index(root, PASSAGES, encoder)


def write_checkpoint(out_dir, encoder, index_dir, step: int, seed: int = 0):
    import torch

    from pipeline.checkpoint import save_checkpoint
    from pipeline.config import Config, GeneratorConfig
    from pipeline.index import load_index
    from pipeline.models.generator import build_generator
    from pipeline.rag import RagModel

    torch.manual_seed(seed)
    gen = build_generator(GeneratorConfig(dropout=0.0, d_model=64, ffn_dim=128, encoder_layers=1, decoder_layers=1,
                                          max_target_length=8), ANSWERS)
    model = RagModel(encoder, gen, load_index(index_dir), tau=0.05)
    return save_checkpoint(out_dir, model, Config(), step=step)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """(checkpoint A on index v1, checkpoint B on index v2, index root)."""
    from pipeline.models.retriever import TextEncoder

    root = tmp_path_factory.mktemp("serving")
    encoder = TextEncoder()
    v1 = write_index(root / "index", encoder)
    a = write_checkpoint(root / "ckpt_a", encoder, v1, step=10, seed=0)
    v2 = write_index(root / "index", encoder)
    b = write_checkpoint(root / "ckpt_b", encoder, v2, step=20, seed=1)
    return a, b, root / "index"


@pytest.fixture(scope="session")
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def served(ray_local, tiny_checkpoints, free_port):
    """The application on 127.0.0.1 (checkpoint A), and a second one with tiny queue limits and default_k=2 under
    /tight. Session-scoped: test_app.py and test_fuzz.py share it."""
    from ray import serve

    from serving.app import build_app

    a, _, _ = tiny_checkpoints
    serve.start(http_options={"host": "127.0.0.1", "port": free_port})
    zero = {"ray_actor_options": {"num_cpus": 0}}
    light = {name: dict(zero) for name in ("Ingress", "Retriever", "Generator")}
    serve.run(build_app({"checkpoint": str(a), "admin_token": TOKEN, "max_batch_size": 8,
                         "batch_wait_timeout_s": 0.005, "generator_threads": 1, "max_body_bytes": BODY_LIMIT}, light),
              name="latentrag-test", route_prefix="/")
    # a second application with tiny queue limits, for the overload test
    tight = {**light, "Ingress": {**zero, "max_ongoing_requests": 1, "max_queued_requests": 1}}
    serve.run(build_app({"checkpoint": str(a), "generator_threads": 1, "default_k": 2}, tight),
              name="latentrag-tight", route_prefix="/tight")
    yield f"http://127.0.0.1:{free_port}"
    serve.delete("latentrag-test")
    serve.delete("latentrag-tight")
    serve.shutdown()
