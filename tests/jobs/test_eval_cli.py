"""`latentrag eval --k`: validated (1 <= k <= passages in the index) with exit 2 and nothing written, and recorded in
metrics.json (issue 18 item 9). A tiny real checkpoint (embedded MiniLM, 6 passages, small copy-bart), no training,
no Ray."""
import json

import pytest
from testlib import minilm_index

from jobs import cli

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    from pipeline.checkpoint import save_checkpoint
    from pipeline.config import Config, GeneratorConfig
    from pipeline.index import load_index
    from pipeline.models.generator import build_generator
    from pipeline.models.retriever import TextEncoder
    from pipeline.rag import RagModel

    root = tmp_path_factory.mktemp("eval_cli")
    encoder = TextEncoder()
    version = minilm_index(root / "index", encoder=encoder)
    torch.manual_seed(0)
    gen = build_generator(GeneratorConfig(d_model=32, ffn_dim=64, encoder_layers=1, decoder_layers=1,
                                          attention_heads=2, max_target_length=4), ["Meridale", "Orrin"])
    ckpt = save_checkpoint(root / "ckpt", RagModel(encoder, gen, load_index(version), tau=0.05), Config(), step=1)
    qa = root / "qa.jsonl"
    qa.write_text(json.dumps({"question": "Where was Varnel Ostrik born?", "answer": "Meridale",
                              "gold_passage_ids": ["a"]}) + "\n")
    return ckpt, qa


def _eval(checkpoint, out, *extra):
    ckpt, qa = checkpoint
    return cli.main(["eval", "--checkpoint", str(ckpt), "--eval-qa", str(qa), "--output-dir", str(out), *extra])


@pytest.mark.parametrize("flag, value", [("--k", "0"), ("--k", "-3"), ("--k", "two"), ("--num-beams", "0")])
def test_k_below_one_is_refused(checkpoint, tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        _eval(checkpoint, out, flag, value)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and (">= 1" in err) and "Traceback" not in err
    assert not out.exists()


def test_k_above_the_index_size_is_refused_before_evaluating(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert _eval(checkpoint, out, "--k", "5000") == 2
    err = capsys.readouterr().err
    assert "--k 5000" in err and "holds only 6 passage(s)" in err and "between 1 and 6" in err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("extra, k", [(["--k", "6"], 6), (["--k", "2"], 2), ([], 5)])
def test_metrics_record_k(checkpoint, tmp_path, extra, k):
    out = tmp_path / "out"
    assert _eval(checkpoint, out, *extra) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["k"] == k                    # [] = the checkpoint's eval.k (5)
    assert metrics["num_beams"] == 1 and metrics["decode"] == "fast" and metrics["num_questions"] == 1


def test_hybrid_k_reads_k_plus_h_candidates_and_is_refused_beyond_the_index(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert _eval(checkpoint, out, "--k", "5", "--hybrid-k", "2") == 2        # 5 + 2 > 6 passages
    err = capsys.readouterr().err
    assert "--k 5 + 2 BM25 candidates (hybrid_k)" in err and "between 1 and 4" in err and not out.exists()
    assert _eval(checkpoint, out, "--k", "2", "--hybrid-k", "2") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["hybrid_k"] == 2 and metrics["candidates"] == 4 and metrics["k"] == 2
