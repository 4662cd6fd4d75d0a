"""GPU check of passage encoding (issue #4): the encoder actor that `latentrag encode` runs in each Ray Data actor
(`jobs.encode.EncoderActor`, fed 2048-row Arrow batches as map_batches feeds it) against a tuned single-process
sentence-transformers loop on the same GPU, in fp32 and fp16, on generated passages of 20-120 words.

Runs on a bare CUDA machine with torch + transformers + sentence-transformers + pyarrow (no Ray, FAISS or MLflow
there), so it measures the actor's work, not Ray Data's scheduling around it (benchmarks/encode_bench.py measures
the whole job on CPU). Both sides: model loaded before the clock, one warm-up batch, the same encoder directory and
max_seq_length 128, the tokenizer threads the actor sets for the process (--threads on a GPU); timed until the
last vector is on the host. Reports passages/s, the ratio, the tokenizer's share of the actor's time, and the
minimum cosine between the two sides' vectors.

    python benchmarks/encode_gpu_check.py --encoder DIR [--passages 100000] [--threads 8] [--out FILE]

DIR: a sentence-transformers directory of all-MiniLM-L6-v2 (the embedded one, or an fp16 copy of it).
Exit status 1 when the two sides disagree (min cosine < 0.99 in fp32).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.gpu_host import stub_missing_faiss  # noqa: E402

stub_missing_faiss()

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from benchmarks.encode_bench import generate_passages  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def single_process(model, texts: list[str], batch_size: int, device: str) -> tuple[float, np.ndarray]:
    model.encode(texts[:batch_size], batch_size=batch_size)       # warm-up
    _sync(device)
    t0 = time.perf_counter()
    emb = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    _sync(device)
    return time.perf_counter() - t0, emb


def actor_run(actor, batches: list[pa.Table], device: str) -> tuple[float, np.ndarray]:
    actor(batches[0].slice(0, 64))                                  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    outs = [actor(b) for b in batches]
    _sync(device)
    s = time.perf_counter() - t0
    emb = np.concatenate([np.asarray(o.column("embedding").combine_chunks().flatten()).reshape(o.num_rows, -1)
                          for o in outs])
    return s, emb.astype(np.float32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", required=True, help="sentence-transformers directory of all-MiniLM-L6-v2")
    p.add_argument("--passages", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=2048, help="rows per actor call (Ray Data batch)")
    p.add_argument("--encode-batch-size", type=int, default=256, help="rows per forward pass, both sides")
    p.add_argument("--precisions", nargs="+", default=["fp32", "fp16"], choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=8,
                   help="the actor's threads (on a GPU: the tokenizer's, for both sides; default 8)")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to dry-run this script")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    from sentence_transformers import SentenceTransformer

    from jobs.encode import EncoderActor

    torch.set_num_threads(1)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    results = {"device": name, "torch": torch.__version__, "passages": args.passages,
               "batch_size": args.batch_size, "encode_batch_size": args.encode_batch_size,
               "threads": args.threads,
               "cpu_count": os.cpu_count(), "runs": {}}
    print(f"device {name}, torch {torch.__version__}, {args.passages} passages", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        texts = generate_passages(Path(tmp) / "p", args.passages, 1)
    ids = [f"p{i:07d}" for i in range(len(texts))]
    batches = [pa.table({"id": ids[lo:lo + args.batch_size], "title": [""] * len(texts[lo:lo + args.batch_size]),
                         "text": texts[lo:lo + args.batch_size]}) for lo in range(0, len(texts), args.batch_size)]
    failed = False
    for prec in args.precisions:
        dtype = DTYPES[prec]
        # the actor first: on a GPU it sets the tokenizer's threads (TOKENIZERS_PARALLELISM, RAYON_NUM_THREADS)
        # for the process, so sentence-transformers tokenizes with the same threads
        actor = EncoderActor(args.encoder, threads=args.threads, encode_batch_size=args.encode_batch_size,
                             device=args.device)
        actor.encoder.to(dtype)
        results["tokenizer_env"] = {k: os.environ.get(k, "(unset)")
                                    for k in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
        st = SentenceTransformer(args.encoder, device=args.device)
        st.max_seq_length = 128
        st.to(dtype)
        st_s, st_emb = single_process(st, texts, args.encode_batch_size, args.device)
        del st
        a_s, a_emb = actor_run(actor, batches, args.device)
        t0 = time.perf_counter()
        for b in batches:
            actor.tokenize(b.column("text").to_pylist())
        tok_s = time.perf_counter() - t0
        del actor
        cos = float(np.min(np.sum(st_emb.astype(np.float32) * a_emb, axis=1)))
        r = {"single_process_seconds": round(st_s, 3), "single_process_passages_per_s": round(len(texts) / st_s, 1),
             "actor_seconds": round(a_s, 3), "actor_passages_per_s": round(len(texts) / a_s, 1),
             "ratio": round(st_s / a_s, 3), "actor_tokenize_seconds": round(tok_s, 3),
             "tokenize_share_of_actor": round(tok_s / a_s, 3), "min_cosine": round(cos, 5)}
        results["runs"][prec] = r
        print(f"{prec}: sentence-transformers {r['single_process_passages_per_s']} passages/s, encoder actor "
              f"{r['actor_passages_per_s']} passages/s, ratio {r['ratio']}; tokenizer {r['tokenize_share_of_actor']:.0%}"
              f" of the actor's time; min cosine {r['min_cosine']}", flush=True)
        if prec == "fp32" and cos < 0.99:
            print(f"FAILED: fp32 vectors disagree (min cosine {cos:.4f})")
            failed = True
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
