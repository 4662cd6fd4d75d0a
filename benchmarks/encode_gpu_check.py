"""GPU check of passage encoding (issues #4, #23): passages/s of the encode `latentrag encode` runs, on one GPU, for
all-MiniLM-L6-v2 and a BGE-base-size encoder with random weights built from a config (BERT-base shape: 12 layers,
hidden 768, CLS pooling; random weights encode as fast as trained ones), in float32 and bfloat16, optionally with
torch.compile; the share of the card's bf16 peak; and where the time goes.

Two paths, and the JSON says which ran:
- ray (the default where Ray is installed): `jobs.encode.encode_passages` itself on a local Ray with one GPU:
  read + tokenize tasks on the CPUs -> one encoder actor on the GPU -> embedding shards. passages_per_s is end to
  end (actor start-up and model load included); passages_per_model_s is the steady state inside the actor.
- library (where Ray is missing, or --path library): the same stages without Ray: the tokenize stage
  (`jobs.encode._tokenize_block`) in a thread pool of --threads feeding `jobs.encode.EncoderActor` in this process.

Both sides of each comparison tokenize with the same windows and token budget. Per run: passages/s, the model's
seconds (inside the actor: padding, host->GPU copies, forward passes, the copy back), the tokenize stage's CPU
seconds, padded tokens per real token, the model FLOPs of the real tokens (2 x non-embedding weights per token + 4 x
L^2 x hidden per layer for attention) over the seconds and over the card's dense bf16 peak (--peak-tflops, or known
cards by name), and the min cosine to the reference: float32 against TextEncoder.encode one passage at a time
(>= 0.99999), bfloat16 against float32 (>= 0.999). Exit status 1 when a cosine check fails.

    python benchmarks/encode_gpu_check.py [--passages 100000] [--models minilm bge-base] [--precisions fp32 bf16]
                                          [--compile] [--encode-tokens 65536] [--out FILE]
    python benchmarks/encode_gpu_check.py --tiny --out /tmp/x.json    # CPU dry run of the library path (seconds)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.gpu_host import stub_missing_faiss  # noqa: E402

stub_missing_faiss()

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from benchmarks.encode_bench import generate_passages  # noqa: E402

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
MIN_COSINE = {"float32": 0.99999, "bfloat16": 0.999, "float16": 0.999}
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0}
MODELS = {  # random-weight encoders built from a config: name -> BertConfig fields, pooling
    "bge-base": ({"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "intermediate_size": 3072, "max_position_embeddings": 512}, "cls"),
    "tiny-bert": ({"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                   "max_position_embeddings": 512}, "mean"),
}


def build_encoder(name: str, root: Path) -> str:
    """The encoder directory: the embedded MiniLM, or a random-weight BERT of MODELS[name] with MiniLM's tokenizer
    (the same uncased vocabulary), saved with its pooling."""
    from pipeline.models.retriever import TextEncoder, resolve_encoder_path, save_encoder

    if name == "minilm":
        return resolve_encoder_path("minilm")
    from transformers import AutoTokenizer, BertConfig, BertModel

    fields, pooling = MODELS[name]
    tok = AutoTokenizer.from_pretrained(resolve_encoder_path("minilm"))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, **fields))
    raw = root / f"{name}-raw"
    model.save_pretrained(raw)
    tok.save_pretrained(raw)
    out = root / name
    save_encoder(TextEncoder(str(raw), pooling=pooling), out)
    return str(out)


def model_flops(config, lengths: np.ndarray) -> float:
    """Forward FLOPs over passages of `lengths` real tokens: 2 per non-embedding weight per token, plus attention's
    two L x L x hidden products per layer (QK^T and AV, 2 FLOPs per multiply-add each)."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    weights = layers * (4 * h * h + 2 * h * inter)
    return float(2 * weights * lengths.sum() + 4 * layers * h * (lengths.astype(np.float64) ** 2).sum())


def library_encode(encoder: str, files: list[str], device: str, compute_dtype: str, compile: bool, threads: int,
                   window: int, encode_tokens: int, encode_batch_size: int) -> dict:
    """The Ray job's stages without Ray: read each shard, tokenize windows in `threads` threads (the fast tokenizer
    releases the GIL) while this thread runs EncoderActor on the blocks in order."""
    from jobs.encode import _TOK_COL, EncoderActor, _read_pieces, _read_row_groups, _tokenize_block
    from pipeline.token_batches import encoder_max_length

    t0 = time.perf_counter()
    actor = EncoderActor(encoder, threads=1, device=device, compute_dtype=compute_dtype, compile=compile)
    ready = time.perf_counter() - t0
    pieces = _read_pieces({f: pq.read_metadata(f) for f in files}, block_mb=4.0)
    reads = list(_read_row_groups(pa.Table.from_pylist(pieces), ["id", "title", "text"]))
    kwargs = {"tokenizer_path": encoder, "max_length": encoder_max_length(encoder), "window": window,
              "max_tokens": encode_tokens, "max_rows": encode_batch_size}
    warm = next(_tokenize_block(reads[0].slice(0, min(window, 512)), **kwargs))
    actor(warm)                                           # first batch: compile, the low-precision check, allocations
    if device == "cuda":
        torch.cuda.synchronize()
    actor.busy_s = 0.0
    t0 = time.perf_counter()
    outs, tokenize_s, padded, real = [], 0.0, 0, 0
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for blocks in pool.map(lambda t: list(_tokenize_block(t, **kwargs)), reads):
            for b in blocks:
                tokenize_s += float(np.sum(b.column(_TOK_COL).to_numpy()))
                lengths = np.diff(b.column("input_ids").combine_chunks().offsets.to_numpy())
                numbers = b.column("__token_batch").to_numpy()
                real += int(lengths.sum())
                padded += int(sum(lengths[numbers == n].max() * (numbers == n).sum() for n in np.unique(numbers)))
                outs.append(actor(b))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    ids = [i for o in outs for i in o.column("id").to_pylist()]
    emb = np.concatenate([np.asarray(o.column("embedding").combine_chunks().flatten()).reshape(o.num_rows, -1)
                          for o in outs])
    return {"ids": ids, "emb": emb, "seconds": seconds, "model_seconds": actor.busy_s,
            "tokenize_cpu_seconds": tokenize_s, "actor_ready_seconds": ready, "padded_tokens": padded,
            "real_tokens": real, "probe_cosine": actor.probe_cosine}


def ray_encode(encoder: str, passages: Path, out: Path, compute_dtype: str, compile: bool, window: int,
               encode_tokens: int, encode_batch_size: int) -> dict:
    from jobs.encode import encode_passages
    from pipeline.embeddings import load_embeddings

    stats = encode_passages(passages, out, encoder=encoder, batch_size=window, num_actors=1, threads_per_actor=1,
                            cpus_per_actor=1, gpus_per_actor=1, encode_tokens=encode_tokens,
                            encode_batch_size=encode_batch_size, compute_dtype=compute_dtype, compile=compile,
                            block_mb=4.0)
    ids, emb = load_embeddings(out)
    return {"ids": ids, "emb": emb, "seconds": stats["seconds"], "model_seconds": stats["actor_busy_seconds"],
            "tokenize_cpu_seconds": stats["tokenize_seconds"],
            "actor_ready_seconds": stats["actor_ready_after_seconds"],
            "probe_cosine": stats["low_precision_probe_cosine"]}


def peak_tflops(name: str, given: float | None) -> float | None:
    if given:
        return given
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["minilm", "bge-base"], choices=["minilm", *MODELS])
    p.add_argument("--passages", type=int, default=100_000)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=sorted(PRECISIONS))
    p.add_argument("--compile", action="store_true", help="also each precision with torch.compile")
    p.add_argument("--path", choices=("auto", "ray", "library"), default="auto",
                   help="auto: the Ray Data job where Ray is installed, else the library path")
    p.add_argument("--batch-size", type=int, default=4096, help="tokenize window: rows sorted by length together")
    p.add_argument("--encode-tokens", type=int, default=65536, help="padded tokens per forward pass")
    p.add_argument("--encode-batch-size", type=int, default=1024, help="rows per forward pass at most")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="library path: tokenizer threads (the Ray path runs one tokenize task per free CPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card (default: by name)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true",
                   help="CPU dry run: tiny-bert, 300 passages, fp32, library path, small batches")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.tiny:
        args.device, args.models, args.passages, args.shards = "cpu", ["tiny-bert"], 300, 3
        if args.precisions == p.get_default("precisions"):
            args.precisions = ["fp32"]
        args.path, args.batch_size, args.encode_tokens, args.encode_batch_size = "library", 64, 2048, 64
        args.threads = 1
    from jobs.encode import check_compute_settings

    try:
        for prec in args.precisions:
            check_compute_settings(PRECISIONS[prec], args.compile, args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    path = args.path
    if path == "auto":
        try:
            import ray  # noqa: F401
            path = "ray"
        except ImportError:
            path = "library"
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    peak = peak_tflops(name, args.peak_tflops)
    results = {"device": name, "torch": torch.__version__, "path": path,
               "path_note": ("the Ray Data job (encode_passages on a local Ray, 1 GPU actor)" if path == "ray" else
                             "the job's stages without Ray (tokenize threads -> EncoderActor in-process)"),
               "passages": args.passages, "batch_size": args.batch_size, "encode_tokens": args.encode_tokens,
               "encode_batch_size": args.encode_batch_size, "threads": args.threads, "cpu_count": os.cpu_count(),
               "bf16_peak_tflops": peak, "runs": {}, "checks": {}}
    print(f"device {name}, torch {torch.__version__}, {args.passages} passages, path {path}", flush=True)
    torch.set_num_threads(1)
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = generate_passages(tmp / "p", args.passages, args.shards)
        files = sorted(str(f) for f in (tmp / "p").glob("passages-*.parquet"))
        if path == "ray":
            import ray

            ray.init(num_cpus=os.cpu_count(), num_gpus=1 if args.device == "cuda" else 0, include_dashboard=False,
                     log_to_driver=False, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1",
                                                                    "TOKENIZERS_PARALLELISM": "false"}})
        for model_name in args.models:
            from transformers import AutoConfig

            from pipeline.index import passage_text
            from pipeline.models.retriever import TextEncoder, load_encoder

            encoder = build_encoder(model_name, tmp)
            config = AutoConfig.from_pretrained(encoder)
            lengths = np.array([len(x) for x in _token_lengths(encoder, texts)])
            flops = model_flops(config, lengths)
            reference, runs = None, {}
            for prec in args.precisions:
                for comp in ([False, True] if args.compile else [False]):
                    key = prec + ("+compile" if comp else "")
                    dtype = PRECISIONS[prec]
                    if path == "ray":
                        r = ray_encode(encoder, tmp / "p", tmp / f"emb-{model_name}-{key}", dtype, comp,
                                       args.batch_size, args.encode_tokens, args.encode_batch_size)
                    else:
                        r = library_encode(encoder, files, args.device, dtype, comp, args.threads, args.batch_size,
                                           args.encode_tokens, args.encode_batch_size)
                    order = np.argsort(np.asarray(r["ids"], dtype=object), kind="stable")
                    ids, emb = [r["ids"][i] for i in order], r["emb"][order].astype(np.float32)
                    if reference is None:                # the first run against the library's one-at-a-time encode
                        enc = load_encoder(encoder) if (Path(encoder) / "latentrag_encoder.json").is_file() \
                            else TextEncoder(encoder)
                        enc.to(args.device)
                        sample = np.linspace(0, len(ids) - 1, min(256, len(ids))).astype(int)
                        by_id = {f"p{i:07d}": t for i, t in enumerate(texts)}
                        ref = enc.encode([passage_text("", by_id[ids[i]]) for i in sample], batch_size=1).numpy()
                        cos = float(np.sum(ref * emb[sample], axis=1).min())
                        against = "TextEncoder.encode one passage at a time (256 sampled passages)"
                        reference = (ids, emb)
                        del enc
                    else:
                        assert ids == reference[0]
                        cos = float(np.sum(reference[1] * emb, axis=1).min())
                        against = f"the first run ({args.precisions[0]}), every passage"
                    n = len(ids)
                    run = {"passages_per_s": round(n / r["seconds"], 1),
                           "passages_per_model_s": round(n / r["model_seconds"], 1) if r["model_seconds"] else None,
                           "seconds": round(r["seconds"], 3), "model_seconds": round(r["model_seconds"], 3),
                           "model_share_of_wall": round(r["model_seconds"] / r["seconds"], 3),
                           "tokenize_cpu_seconds": round(r["tokenize_cpu_seconds"], 3),
                           "actor_ready_seconds": round(r["actor_ready_seconds"], 3),
                           "model_tflops_per_s": round(flops / r["seconds"] / 1e12, 6),
                           "share_of_bf16_peak": round(flops / r["seconds"] / 1e12 / peak, 6) if peak else None,
                           "share_of_bf16_peak_in_model": (round(flops / r["model_seconds"] / 1e12 / peak, 4)
                                                           if peak and r["model_seconds"] else None),
                           "mean_real_tokens": round(float(lengths.mean()), 1),
                           "min_cosine": round(cos, 6), "cosine_against": against,
                           "low_precision_probe_cosine": r["probe_cosine"]}
                    if "padded_tokens" in r:
                        run["padded_tokens_per_real"] = round(r["padded_tokens"] / r["real_tokens"], 4)
                    ok = cos >= MIN_COSINE[dtype]
                    results["checks"][f"{model_name} {key}: min cosine >= {MIN_COSINE[dtype]}"] = ok
                    failed |= not ok
                    runs[key] = run
                    print(f"{model_name} {key}: {run['passages_per_s']} passages/s ({run['passages_per_model_s']} "
                          f"in the model), {run['share_of_bf16_peak']} of bf16 peak, model "
                          f"{run['model_share_of_wall']:.0%} of wall, tokenize {run['tokenize_cpu_seconds']} CPU s, "
                          f"min cosine {run['min_cosine']}", flush=True)
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
            results["runs"][model_name] = {"config": {k: getattr(config, k) for k in (
                "hidden_size", "num_hidden_layers", "intermediate_size")}, **runs}
    if path == "ray":
        import ray

        ray.shutdown()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


def _token_lengths(encoder: str, texts: list[str]) -> list[list[int]]:
    from pipeline.token_batches import encoder_max_length, load_tokenizer

    return load_tokenizer(encoder)(texts, truncation=True, max_length=encoder_max_length(encoder),
                                   return_attention_mask=False, return_token_type_ids=False)["input_ids"]


if __name__ == "__main__":
    sys.exit(main())
