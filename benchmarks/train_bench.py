"""Training benchmark (issue #5): Ray Train throughput with 1 and 2 workers, and a rag-sequence step against
Hugging Face `RagSequenceForGeneration` at the same model sizes and K.

    # the full run (a quiet machine; ~10 min on 2 cores):
    .venv/bin/python benchmarks/train_bench.py --steps 40 --repeats 10 --out benchmarks/results/train_bench.json
    # a small correctness run (numbers meaningless):
    .venv/bin/python benchmarks/train_bench.py --small --out /tmp/train_bench.json

1. throughput: `jobs.train.train_loop_per_worker` under a TorchTrainer on the demo config (MiniLM query encoder,
   copy-bart, K=5, batch 16 per worker; DDP when 2 workers), examples/s measured by the workers after their first
   step (model loading and start-up excluded), for num_workers = 1 and 2 at the same total CPUs.
2. rag-sequence step: forward + backward of one batch, both sides with the same tiny-from-config models (a BERT query
   encoder and a BART generator of equal sizes), the same flat index, K and batch:
     ours  RagModel(query encoder, HFSeq2SeqGenerator) + the rag-sequence estimator;
     HF    DPR question encoder -> the same index search -> context tokenisation (what RagRetriever does) ->
           doc_scores = q . d -> RagSequenceForGeneration(context_input_ids, doc_scores, labels).loss.
   Target: ratio ours / HF <= 1.0 (median over repeats).
Prints a table and writes JSON (no files under benchmarks/results unless --out says so).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.gpu_host import stub_missing_faiss  # noqa: E402

# the vs-HF part runs without FAISS (an exact numpy index), e.g. on a bare CUDA/CPU box; HF's RAG module checks for
# FAISS itself, so it is imported before the stub
stub_missing_faiss(import_first=("transformers.models.rag.modeling_rag",))

from pipeline.index import ArrayIndex  # noqa: E402


# --------------------------------------------------------------------------------------------- 1. throughput
def bench_throughput(workers: list[int], steps: int, batch: int, entities: int, total_cpus: int) -> dict:
    import ray

    from benchmarks.common import synthetic_index
    from jobs.train import make_torch_trainer
    from pipeline.config import load_config
    from pipeline.models.retriever import TextEncoder
    from pipeline.synthetic import generate_knowledge_base

    if not ray.is_initialized():
        ray.init(num_cpus=total_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    kb = generate_knowledge_base(seed=0, num_entities=entities)
    index = synthetic_index(kb, TextEncoder("minilm"), 0, "default")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in workers:
            per = max(1, total_cpus // n)
            cfg = load_config(ROOT / "configs" / "demo.yaml",
                              [f"train.max_steps={steps}", f"train.batch_size={batch}", f"train.num_workers={n}",
                               f"train.cpus_per_worker={per}", f"train.torch_threads={per}", "train.eval_every=0",
                               "train.checkpoint_every=0", f"train.log_every={steps}"])
            cfg.output_dir = str(Path(tmp) / f"w{n}")
            trainer = make_torch_trainer(
                cfg, {"cfg": cfg.to_dict(), "index_dir": str(index.path), "train_rows": kb.train, "dev_rows": [],
                      "tracking_uri": None, "run_id": None, "resume_from": None},
                f"bench-w{n}-{int(time.time())}", Path(tmp) / "ray", use_dev=False)
            t = time.time()
            result = trainer.fit()
            if result.error:
                raise RuntimeError(result.error)
            eps = result.metrics["train_examples_per_s"]
            out[n] = {"examples_per_s": eps, "global_batch": batch * n, "steps": steps,
                      "fit_seconds": time.time() - t, "cpus_per_worker": per}
            print(f"  {n} worker(s) x {per} CPU: {eps:7.1f} examples/s  (global batch {batch * n}, {steps} steps)",
                  flush=True)
    if 1 in out and 2 in out:
        out["speedup_2_over_1"] = out[2]["examples_per_s"] / out[1]["examples_per_s"]
    return out


# --------------------------------------------------------------------------------------------- 2. vs HF RAG
def tiny_models(d: int, layers: int, heads: int, ffn: int, tmp: Path, tokenizer: str | None = None):
    """A random BERT query encoder saved as a local model dir (for our TextEncoder) + matching DPR/BART configs."""
    from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration, BertConfig, BertModel, DPRConfig

    from pipeline.models.retriever import resolve_encoder_path

    tok = AutoTokenizer.from_pretrained(tokenizer or resolve_encoder_path("minilm"))
    bert = dict(vocab_size=tok.vocab_size, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=ffn, max_position_embeddings=512)
    torch.manual_seed(0)
    enc_dir = tmp / "query_encoder"
    BertModel(BertConfig(**bert), add_pooling_layer=False).save_pretrained(enc_dir)
    tok.save_pretrained(enc_dir)
    bart_cfg = BartConfig(vocab_size=tok.vocab_size, d_model=d, encoder_layers=layers, decoder_layers=layers,
                          encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn,
                          decoder_ffn_dim=ffn, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                          eos_token_id=tok.sep_token_id, decoder_start_token_id=tok.sep_token_id,
                          forced_eos_token_id=None, max_position_embeddings=512, dropout=0.0)
    return tok, enc_dir, DPRConfig(**bert), bart_cfg, BartForConditionalGeneration(bart_cfg)


def bench_vs_hf(batch: int, k: int, repeats: int, d: int, layers: int, heads: int, ffn: int, entities: int,
                threads: int, tokenizer: str | None = None) -> dict:
    from transformers import RagConfig, RagSequenceForGeneration

    from pipeline.estimators import build_estimator
    from pipeline.index import passage_text
    from pipeline.models.generator import HFSeq2SeqGenerator
    from pipeline.models.retriever import TextEncoder
    from pipeline.rag import RagModel
    from pipeline.synthetic import generate_knowledge_base

    torch.set_num_threads(threads)
    kb = generate_knowledge_base(seed=0, num_entities=entities)
    rows = kb.train[:batch]
    questions, answers = [r["question"] for r in rows], [r["answers"][0] for r in rows]
    src_len, tgt_len = 128, 16
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok, enc_dir, dpr_cfg, bart_cfg, bart = tiny_models(d, layers, heads, ffn, tmp, tokenizer)
        encoder = TextEncoder(str(enc_dir), pooling="cls", normalize=False, max_length=64)
        texts = [passage_text(x.get("title", ""), x["text"]) for x in kb.passages]
        with torch.no_grad():
            emb = encoder.encode(texts).numpy()
        index = ArrayIndex(emb, ids=[p["id"] for p in kb.passages], texts=[p["text"] for p in kb.passages],
                           titles=[p.get("title", "") for p in kb.passages])

        # ours
        gen = HFSeq2SeqGenerator("tiny-bart", src_len, tgt_len, model=bart, tokenizer=tok)
        ours = RagModel(encoder, gen, index, tau=1.0)
        est = build_estimator("rag-sequence", k=k)
        ours.train()

        def ours_step():
            ours.zero_grad(set_to_none=True)
            est.loss(ours, questions, answers).loss.backward()

        # Hugging Face: same sizes, same K, same index; the retriever part done as RagRetriever does it
        hf = RagSequenceForGeneration(RagConfig.from_question_encoder_generator_configs(dpr_cfg, bart_cfg, n_docs=k))
        hf.rag.question_encoder.question_encoder.bert_model.load_state_dict(encoder.model.state_dict(), strict=False)
        hf.rag.generator.load_state_dict(bart.state_dict())
        hf.train()

        def hf_step():
            hf.zero_grad(set_to_none=True)
            q = tok(questions, padding=True, truncation=True, max_length=64, return_tensors="pt")
            q_vec = hf.rag.question_encoder(q["input_ids"], attention_mask=q["attention_mask"])[0]      # [B, d]
            _, found = index.search(q_vec.detach().numpy().astype(np.float32), k)
            doc_emb = torch.from_numpy(np.asarray(index.embeddings[np.asarray(found).reshape(-1)],
                                                  dtype=np.float32)).view(len(questions), k, -1)
            doc_scores = torch.bmm(q_vec.unsqueeze(1), doc_emb.transpose(1, 2)).squeeze(1)
            ctx = [f"question: {qq} context: {ours.row_text(int(r))}" for qq, row in zip(questions, found)
                   for r in row]
            c = tok(ctx, padding=True, truncation=True, max_length=src_len, return_tensors="pt")
            labels = tok(text_target=answers, padding=True, truncation=True, max_length=tgt_len,
                         return_tensors="pt")["input_ids"]
            out = hf(context_input_ids=c["input_ids"], context_attention_mask=c["attention_mask"],
                     doc_scores=doc_scores, labels=labels, n_docs=k)
            out.loss.sum().backward()

        times = {"ours": [], "hf": []}
        for rep in range(repeats + 1):                 # the first round warms up, not counted
            for name, fn in (("ours", ours_step), ("hf", hf_step)) if rep % 2 else (("hf", hf_step), ("ours", ours_step)):
                t = time.perf_counter()
                fn()
                if rep:
                    times[name].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in times.items()}
    res = {"batch": batch, "k": k, "d_model": d, "layers": layers, "repeats": repeats,
           "ours_seconds_median": med["ours"], "hf_seconds_median": med["hf"], "ratio_ours_over_hf": med["ours"] / med["hf"],
           "ours_seconds": times["ours"], "hf_seconds": times["hf"]}
    print(f"  rag-sequence fwd+bwd, B={batch} K={k} d={d} L={layers}: ours {med['ours'] * 1000:.0f} ms, "
          f"HF RagSequenceForGeneration {med['hf'] * 1000:.0f} ms, ratio {res['ratio_ours_over_hf']:.2f} "
          f"(target <= 1.0)", flush=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="training steps per throughput run")
    p.add_argument("--batch", type=int, default=16, help="per-worker batch (throughput) and batch (vs HF)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cpus", type=int, default=2, help="CPUs for the local Ray, split between the workers")
    p.add_argument("--entities", type=int, default=400, help="synthetic KB size (demo: 400)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip", choices=("throughput", "hf"), action="append", default=[])
    p.add_argument("--tokenizer", default=None, help="BERT tokenizer dir for the vs-HF models (default: MiniLM's)")
    p.add_argument("--small", action="store_true", help="tiny sizes: checks that everything runs")
    p.add_argument("--out", default="/tmp/train_bench.json")
    args = p.parse_args(argv)
    if args.small:
        args.steps, args.batch, args.entities, args.repeats, args.d_model = 3, 4, 25, 2, 64
    results = {"args": vars(args)}
    if "throughput" not in args.skip:
        print("throughput (jobs.train.train_loop_per_worker under TorchTrainer, demo config):", flush=True)
        results["throughput"] = bench_throughput(args.workers, args.steps, args.batch, args.entities, args.cpus)
    if "hf" not in args.skip:
        print("rag-sequence step vs Hugging Face RagSequenceForGeneration:", flush=True)
        results["vs_hf"] = bench_vs_hf(args.batch, args.k, args.repeats, args.d_model, args.layers,
                                       heads=4, ffn=4 * args.d_model, entities=args.entities, threads=args.threads,
                                       tokenizer=args.tokenizer)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
