"""`latentrag ingest`: validate a corpus and write passage Parquet shards.

    latentrag ingest --corpus data/corpus.jsonl --out runs/passages
    python -m jobs.ingest --corpus data/ --format csv --text-field passage --out runs/passages --on-bad-rows skip

Reads a file or a directory of files (JSONL, JSON, Parquet, CSV, TSV), checks every row, splits long texts into
overlapping word windows and writes `passages-*.parquet` shards plus `passages.json` into --out, atomically.
A bad row stops the run with its file and line (exit status 2, nothing written at --out), or, with
--on-bad-rows skip, goes to `<out>.quarantine.jsonl` and is counted in the summary. No Ray needed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.data import (FORMATS, DataError, check_passage_output, chunk_passages, read_corpus, write_passages,
                           write_quarantine)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentrag ingest",
        description="Validate a corpus (file or directory of JSONL/JSON/Parquet/CSV/TSV files with id, text and "
                    "optional title) and write passage Parquet shards with a passages.json manifest.")
    parser.add_argument("--corpus", required=True, help="corpus file, or a directory whose files are read in "
                                                        "sorted order")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="input format; inferred from each file's extension when omitted")
    parser.add_argument("--out", required=True, help="output directory for the passage shards (replaced "
                                                     "atomically if it already holds passages)")
    parser.add_argument("--on-bad-rows", choices=("fail", "skip"), default="fail",
                        help="fail: stop at the first bad row with its file and line (default); skip: write bad rows "
                             "to <out>.quarantine.jsonl and go on")
    parser.add_argument("--chunk-words", type=int, default=100,
                        help="split texts longer than this many words into windows (0 disables; default 100)")
    parser.add_argument("--chunk-overlap", type=int, default=20,
                        help="words shared by consecutive windows of a split text (default 20)")
    parser.add_argument("--shard-size", type=int, default=50_000,
                        help="passages per Parquet shard (default 50000)")
    parser.add_argument("--id-field", default="id", help="name of the id column in the corpus (default id)")
    parser.add_argument("--text-field", default="text", help="name of the text column in the corpus (default text)")
    parser.add_argument("--title-field", default="title", help="name of the optional title column (default title)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.chunk_words < 0:
        parser.error("--chunk-words must be >= 0")
    if args.chunk_words and not 0 <= args.chunk_overlap < args.chunk_words:
        parser.error("--chunk-overlap must be >= 0 and smaller than --chunk-words")
    if args.shard_size < 1:
        parser.error("--shard-size must be >= 1")

    out = Path(args.out)
    quarantine = out.with_name(out.name + ".quarantine.jsonl")
    try:
        check_passage_output(out)          # refuse before reading: a refused --out leaves no quarantine file
        rows = read_corpus(args.corpus, fmt=args.format, on_bad_rows=args.on_bad_rows, quarantine_path=quarantine,
                           id_field=args.id_field, text_field=args.text_field, title_field=args.title_field,
                           defer_quarantine=True)
        passages = chunk_passages(rows, args.chunk_words, args.chunk_overlap) if args.chunk_words else rows
        manifest = write_passages(passages, out, shard_size=args.shard_size)
        if rows.bad:
            write_quarantine(rows, quarantine)
    except (DataError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    print(f"read {rows.num_read} rows from {len(rows.files)} file(s): {len(rows)} good, {rows.num_skipped} skipped"
          + (f" (quarantined in {rows.quarantine_path})" if rows.num_skipped else ""))
    print(f"wrote {manifest['count']} passages from {len(rows)} rows in {len(manifest['shards'])} "
          f"shard(s) to {out} (fingerprint {manifest['fingerprint']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
