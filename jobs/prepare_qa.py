"""Prepare a real QA set whose questions name their source document (not a passage) for `latentrag train`.

    python -m jobs.prepare_qa --corpus ../shared/data/cmu_qa_wiki/passages.jsonl \
        --qa ../shared/data/cmu_qa_wiki/qa.jsonl --out runs/cmu/data --chunk-words 100 --chunk-overlap 20

1. ingests the corpus into OUTPUT/passages (long passages re-chunked into overlapping word windows; every chunk
   keeps its source `doc_id`), the same shards `latentrag train --corpus OUTPUT/passages` reads;
2. splits the QA rows by their `split` field: `train` -> train.jsonl; the held-out rows are split again *by
   document* into dev.jsonl (periodic evaluation, best checkpoint) and test.jsonl (final evaluation), so no
   article is in two files;
3. gives each question `gold_passage_ids` = every chunk of its document, so recall@k is document-level recall
   (a retrieved passage from the right article counts). The training estimators never read these labels.
No Ray needed. Nothing is written into the repository unless --out points there. `prepare_rag_mini` brings
../shared/data/rag_mini_wikipedia into the same form (the quality benchmark's `--datasets rag-mini`).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from pipeline.data import DataError, chunk_passages, read_corpus, write_jsonl, write_passages


def prepare(corpus: str, qa: str, out: str | Path, chunk_words: int = 100, chunk_overlap: int = 20,
            split_field: str = "split", doc_field: str = "doc_id", train_split: str = "train") -> dict:
    out = Path(out)
    passages = chunk_passages(read_corpus(corpus), max_words=chunk_words, overlap=chunk_overlap)
    by_doc: dict[str, list[str]] = defaultdict(list)
    for p in passages:
        by_doc[str(p["doc_id"])].append(str(p["id"]))
    write_passages(passages, out / "passages")
    files = {"train": [], "dev": [], "test": []}
    missing = 0
    with open(qa) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            doc = str(row.get(doc_field) or "")
            if not doc:
                raise DataError(f"{qa} line {line_no}: no {doc_field!r}")
            gold = by_doc.get(doc)
            if not gold:
                missing += 1
                continue
            answers = [a for a in (row.get("answers") or [row.get("answer")]) if a]
            if not answers:
                continue
            item = {"id": str(row.get("id") or f"q{line_no}"), "question": row["question"], "answers": answers,
                    "gold_passage_ids": gold}
            if row.get(split_field) == train_split:
                files["train"].append(item)
            else:                      # held out: dev or test by a hash of the document (never both)
                bucket = int(hashlib.sha1(doc.encode()).hexdigest(), 16) % 2
                files["dev" if bucket == 0 else "test"].append(item)
    counts = {name: write_jsonl(rows, out / f"{name}.jsonl") for name, rows in files.items()}
    summary = {"passages": len(passages), "documents": len(by_doc), **counts, "questions_without_document": missing,
               "chunk_words": chunk_words, "chunk_overlap": chunk_overlap}
    (out / "prepare.json").write_text(json.dumps(summary, indent=2))
    return summary


def fix_mojibake(text: str) -> str:
    """UTF-8 text that was decoded as Latin-1 once ("RÃ­o" for "Río"), as rag-mini-wikipedia's CSV holds it, back
    to what it was; any other text unchanged."""
    try:
        return text.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return text


def _words(text: str) -> str:
    return " ".join(re.sub(r"\W+", " ", text).lower().split())


def rag_mini_articles(passages: list[str], cmu_passages: str | Path) -> list[str | None]:
    """The article of each rag-mini-wikipedia passage. The CSV names none, but it lists each article's paragraphs
    in order, and they are paragraphs of the CMU articles (../cmu_qa_wiki): a passage whose first 60 characters
    (words only) occur in exactly one CMU article belongs to it; one that matches none or several belongs to the
    article of the passage before it (None before the first match)."""
    articles: dict[str, list[str]] = defaultdict(list)
    with open(cmu_passages, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                articles[_article_key(row["title"])].append(_words(row["text"]))
    text_of = {title: " ".join(parts) for title, parts in articles.items()}
    out, current = [], None
    for passage in passages:
        key = _words(passage)[:60]
        found = [t for t, text in text_of.items() if key and key in text]
        if len(found) == 1:
            current = found[0]
        out.append(current)
    return out


def _article_key(title: str) -> str:
    return title.replace("_", " ").strip().lower()


def prepare_rag_mini(rag_dir: str | Path, cmu_dir: str | Path, out: str | Path, chunk_words: int = 100,
                     chunk_overlap: int = 20, heldout_share: float = 0.3) -> dict:
    """../shared/data/rag_mini_wikipedia (passages.csv: id, passage; qa_s08.jsonl: question, answer,
    article_title) prepared like cmu_qa_wiki by `prepare`: passages with the article as doc_id (`rag_mini_articles`,
    which reads ../cmu_qa_wiki/passages.jsonl), document-level gold ids, and a held-out split by article: an
    article is held out when the sha1 of its title falls in the first `heldout_share` of buckets (then dev or test
    by document, as for cmu). Writes OUT/source/{corpus,qa}.jsonl and what `prepare` writes."""
    rag_dir, out = Path(rag_dir), Path(out)
    with open(rag_dir / "passages.csv", encoding="utf-8", newline="") as f:
        rows = [{"id": str(r["id"]), "text": fix_mojibake(r["passage"]).strip()} for r in csv.DictReader(f)]
    rows = [r for r in rows if r["text"]]
    for row, article in zip(rows, rag_mini_articles([r["text"] for r in rows], Path(cmu_dir) / "passages.jsonl")):
        row["doc_id"] = article or f"passage-{row['id']}"
    qa = []
    with open(rag_dir / "qa_s08.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                article = _article_key(r["article_title"])
                bucket = int(hashlib.sha1(article.encode()).hexdigest(), 16) % 1000
                qa.append({"id": f"ragmini{r['id']}", "question": r["question"], "answers": [r["answer"]],
                           "doc_id": article, "split": "heldout" if bucket < heldout_share * 1000 else "train"})
    write_jsonl(rows, out / "source" / "corpus.jsonl")
    write_jsonl(qa, out / "source" / "qa.jsonl")
    summary = prepare(str(out / "source" / "corpus.jsonl"), str(out / "source" / "qa.jsonl"), out, chunk_words,
                      chunk_overlap)
    summary["heldout_articles"] = sorted({q["doc_id"] for q in qa if q["split"] == "heldout"})
    (out / "prepare.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.prepare_qa", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="passages with id, text, title and doc_id")
    p.add_argument("--qa", required=True, help="QA JSONL with question, answers[], doc_id and split")
    p.add_argument("--out", required=True, help="output directory (passages/, train/dev/test.jsonl)")
    p.add_argument("--chunk-words", type=int, default=100)
    p.add_argument("--chunk-overlap", type=int, default=20)
    args = p.parse_args(argv)
    try:
        summary = prepare(args.corpus, args.qa, args.out, args.chunk_words, args.chunk_overlap)
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
