"""Corpus and QA input/output.

Corpus rows are ``{id, title, text}``; QA rows are ``{id, question, answers, gold_passage_ids}``.
Readers validate every row: a bad row either stops the read with a `DataError` naming the file and the
1-based line (row) number, or, with ``on_bad_rows="skip"``, goes to a quarantine JSONL file and is counted.
Bad rows never vanish silently.

Passages on disk are Parquet shards ``passages-00000.parquet``... plus a ``passages.json`` manifest, written
into a temporary directory and renamed into place, so a reader never sees a half-written passage set.
No Ray here: jobs wrap these functions in Ray Data where they need to.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

FORMATS = ("jsonl", "json", "parquet", "csv", "tsv")
_EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet", ".csv": "csv",
               ".tsv": "tsv"}
MANIFEST_NAME = "passages.json"
SHARD_PATTERN = "passages-{:05d}.parquet"


class DataError(ValueError):
    """Bad input data. The message names the file and, where there is one, the 1-based line or row."""


class CorpusRows(list):
    """The rows `read_corpus` returns: a plain list with the read's bookkeeping attached.

    ``num_read``: rows seen (good and bad); ``num_skipped``: bad rows quarantined in skip mode;
    ``quarantine_path``: where they went (None when there were none or no path was given); ``files``: files read;
    ``bad``: the quarantined records ``{file, line, reason, raw}`` themselves.
    """

    num_read: int = 0
    num_skipped: int = 0
    quarantine_path: str | None = None
    files: list[str]
    bad: list[dict]


# ----------------------------------------------------------------------------------------------------------------
# raw records: (file, location label, number, raw, parsed dict or error reason)


def _infer_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        fmt = fmt.lower().lstrip(".")
        if fmt not in FORMATS:
            raise DataError(f"{path}: unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
        return fmt
    found = _EXTENSIONS.get(path.suffix.lower())
    if found is None:
        raise DataError(f"{path}: unknown format for extension {path.suffix or '(none)'!r} "
                        f"(expected one of {', '.join(sorted(_EXTENSIONS))}, or pass fmt)")
    return found


def _list_files(path: str | os.PathLike, fmt: str | None) -> list[tuple[Path, str]]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
        if fmt is None:
            files = [p for p in files if p.suffix.lower() in _EXTENSIONS]
        if not files:
            raise DataError(f"{path}: directory holds no input files ({', '.join(sorted(_EXTENSIONS))})")
        return [(p, _infer_format(p, fmt)) for p in files]
    return [(path, _infer_format(path, fmt))]


def _iter_json_lines(path: Path) -> Iterator[tuple[str, int, Any, Any]]:
    """Yield (label, number, raw, obj_or_exception) for each non-blank line."""
    with open(path, "rb") as fh:
        for number, raw_bytes in enumerate(fh, start=1):
            try:
                raw = raw_bytes.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield "line", number, raw_bytes.decode("utf-8", "replace").rstrip("\r\n"), \
                    DataError(f"not valid UTF-8 ({e.reason})")
                continue
            raw = raw.rstrip("\r\n")
            if not raw.strip():
                continue
            try:
                yield "line", number, raw, json.loads(raw)
            except json.JSONDecodeError as e:
                yield "line", number, raw, DataError(f"malformed JSON ({e.msg} at column {e.colno})")


def _iter_json(path: Path) -> Iterator[tuple[str, int, Any, Any]]:
    """A .json file is either one JSON array of objects or JSON lines."""
    with open(path, "rb") as fh:
        head = fh.read(4096).decode("utf-8-sig", "replace").lstrip()
    if not head.startswith("["):
        yield from _iter_json_lines(path)
        return
    raw = path.read_bytes()
    try:
        items = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        offset = e.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)
        line = raw[:offset].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not valid UTF-8 (byte {raw[offset]:#04x}; save the file as UTF-8)") \
            from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: malformed JSON ({e.msg})") from None
    for number, item in enumerate(items, start=1):
        yield "item", number, item, item


class _Lines:
    """The lines of a text file for `csv.reader`, decoded one at a time so that a byte that is not UTF-8 is reported
    with its line (``bad[line]``) instead of stopping the whole read at a byte offset. Lines end at \\n, \\r\\n or a
    lone \\r (as a file opened with newline="" splits them); ``first`` is the first line since the caller last
    cleared it (the raw text of a bad record). Lines up to ``skip`` are read but not handed on."""

    def __init__(self, path: Path, skip: int = 0):
        self.path, self.skip, self.number = path, skip, 0
        self.bad: dict[int, str] = {}
        self.first: str | None = None

    def __iter__(self) -> Iterator[str]:
        with open(self.path, "rb") as fh:
            for raw in fh:
                for part in _split_lone_cr(raw):
                    self.number += 1
                    try:
                        line = part.decode("utf-8-sig" if self.number == 1 else "utf-8")
                    except UnicodeDecodeError as e:
                        self.bad[self.number] = (f"not valid UTF-8 (byte {part[e.start]:#04x} at column "
                                                 f"{e.start + 1}; save the file as UTF-8)")
                        line = part.decode("utf-8", "replace")
                    if self.number <= self.skip:
                        continue
                    if self.first is None:
                        self.first = line.rstrip("\r\n")
                    yield line


def _split_lone_cr(raw: bytes) -> list[bytes]:
    if b"\r" not in raw:
        return [raw]
    return [part for part in _LONE_CR.split(raw) if part]


_LONE_CR = re.compile(rb"(?<=\r)(?!\n)")


def _iter_delimited(path: Path, delimiter: str) -> Iterator[tuple[str, int, Any, Any]]:
    """CSV/TSV records as (label, line, raw, dict or DataError). Read strictly: a quote that is never closed (which a
    lenient reader turns into one field holding the rest of the file), text after a closing quote, a line that is
    not UTF-8 or a wrong number of fields is a bad record at its line; after an unclosed quote, reading goes on
    at the next line."""
    kind = path.suffix[1:] or "csv"
    lines = _Lines(path)
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise DataError(f"{path} line {lines.number}: malformed {kind} header ({e})") from None
    if lines.bad:
        line, reason = next(iter(lines.bad.items()))
        raise DataError(f"{path} line {line}: {reason}")
    header = [h.strip() for h in header]
    base, done = 0, reader.line_num      # line numbers: base + reader.line_num; `done` = last line of a record read
    while True:
        lines.first = None
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            begin, end = done + 1, base + reader.line_num
            if "unexpected end of data" in str(e):       # EOF inside quotes: the quote opened at `begin` never closes
                reason = f"unterminated quoted field (a quote opened on line {begin} is never closed)"
            else:
                reason = f"malformed {kind} ({e})" + (f"; is the quote opened on line {begin} closed?"
                                                      if end > begin else "")
            yield "line", begin, lines.first, DataError(reason)
            if end > begin:         # the bad record swallowed the lines after it: go on with the next line
                lines = _Lines(path, skip=begin)
                reader = csv.reader(lines, delimiter=delimiter, strict=True)
                base = done = begin
            else:
                done = end
            continue
        begin, done = done + 1, base + reader.line_num
        bad = [(n, r) for n, r in lines.bad.items() if begin <= n <= done]
        if not any(v.strip() for v in values) and not bad:
            continue
        record = dict(zip(header, values))
        if bad:
            yield "line", bad[0][0], lines.first, DataError(bad[0][1])
            continue
        if len(values) != len(header):
            yield "line", done, record, DataError(f"expected {len(header)} fields (header), found {len(values)}")
            continue
        yield "line", done, record, record


def _iter_parquet(path: Path) -> Iterator[tuple[str, int, Any, Any]]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    number = 0
    for batch in pf.iter_batches(batch_size=8192):
        for record in batch.to_pylist():
            number += 1
            yield "row", number, record, record


def _iter_records(path: Path, fmt: str) -> Iterator[tuple[str, int, Any, Any]]:
    if fmt == "jsonl":
        return _iter_json_lines(path)
    if fmt == "json":
        return _iter_json(path)
    if fmt == "csv":
        return _iter_delimited(path, ",")
    if fmt == "tsv":
        return _iter_delimited(path, "\t")
    return _iter_parquet(path)


def _scalar_str(value: Any, field: str, *, required: bool) -> str:
    """Coerce an id/title-like value to str; raise DataError(reason) when it cannot be."""
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        if required:
            raise DataError(f'missing "{field}"')
        return ""
    if isinstance(value, bool):
        raise DataError(f'"{field}" must be a string or an integer, got a boolean')
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (str, int, float)):
        text = str(value).strip() if isinstance(value, str) else str(value)
        if required and not text:
            raise DataError(f'empty "{field}"')
        return text
    raise DataError(f'"{field}" must be a string, got {type(value).__name__}')


def _corpus_row(obj: Any, id_field: str, text_field: str, title_field: str) -> dict:
    if isinstance(obj, Exception):
        raise obj
    if not isinstance(obj, dict):
        raise DataError(f"expected an object with {id_field!r} and {text_field!r}, got {type(obj).__name__}")
    if id_field not in obj:
        raise DataError(f'missing "{id_field}"')
    row_id = _scalar_str(obj[id_field], id_field, required=True)
    if text_field not in obj or obj[text_field] is None:
        raise DataError(f'missing "{text_field}"')
    text = obj[text_field]
    if not isinstance(text, str):
        raise DataError(f'"{text_field}" must be a string, got {type(text).__name__}')
    if not text.strip():
        raise DataError(f'empty "{text_field}"')
    title = _scalar_str(obj.get(title_field), title_field, required=False)
    row = {"id": row_id, "title": title, "text": text.strip()}
    doc_id = _scalar_str(obj.get("doc_id"), "doc_id", required=False)
    if doc_id:  # a source that already groups passages into documents keeps that grouping
        row["doc_id"] = doc_id
    return row


def read_corpus(path: str | os.PathLike, fmt: str | None = None, on_bad_rows: str = "fail",
                quarantine_path: str | os.PathLike | None = None, *, id_field: str = "id",
                text_field: str = "text", title_field: str = "title", defer_quarantine: bool = False) -> CorpusRows:
    """Read and validate corpus rows ``{id: str, title: str, text: str}`` from a file or a directory of files.

    A non-empty ``doc_id`` in the source is kept (as str) so chunking and metrics can group passages by document.

    ``fmt``: jsonl | json | parquet | csv | tsv, inferred from each file's extension when None. A directory is
    read file by file in sorted name order. Ids may be integers (converted to str) and must be unique across
    all files. ``on_bad_rows="fail"`` raises `DataError` at the first bad row (``corpus.jsonl line 7: missing
    "text"``); ``"skip"`` writes each bad row to ``quarantine_path`` as ``{file, line, reason, raw}`` and counts it
    (``result.num_skipped``). An empty file, an unknown format or a read with no good rows is always an error.
    ``id_field``/``text_field``/``title_field`` name the source columns (e.g. ``text_field="passage"``).
    ``defer_quarantine=True``: a read that succeeds writes nothing; the caller writes ``result.bad`` to
    ``quarantine_path`` once its own output is in place (`write_quarantine`), so that a command that refuses
    afterwards leaves no file behind. A read with no good rows still writes the quarantine, which explains it.
    """
    if on_bad_rows not in ("fail", "skip"):
        raise ValueError(f"on_bad_rows must be 'fail' or 'skip', got {on_bad_rows!r}")
    rows = CorpusRows()
    rows.files = []
    rows.bad = bad = []
    first_seen: dict[str, str] = {}
    for file, file_fmt in _list_files(path, fmt):
        rows.files.append(str(file))
        seen_in_file = 0
        for label, number, raw, obj in _iter_records(file, file_fmt):
            seen_in_file += 1
            rows.num_read += 1
            where = f"{file} {label} {number}"
            try:
                row = _corpus_row(obj, id_field, text_field, title_field)
                if row["id"] in first_seen:
                    raise DataError(f'duplicate id "{row["id"]}" (first seen at {first_seen[row["id"]]})')
            except DataError as e:
                if on_bad_rows == "fail":
                    raise DataError(f"{where}: {e}") from None
                bad.append({"file": str(file), "line": number, "reason": str(e), "raw": raw})
                continue
            first_seen[row["id"]] = where
            rows.append(row)
        if seen_in_file == 0:
            raise DataError(f"{file}: empty file (no rows)")
    rows.num_skipped = len(bad)
    if bad:
        if quarantine_path is not None:
            if not defer_quarantine or not rows:
                write_quarantine(rows, quarantine_path)
        else:
            warnings.warn(f"read_corpus skipped {len(bad)} bad rows and no quarantine_path was given; first: "
                          f"{bad[0]['file']} line {bad[0]['line']}: {bad[0]['reason']}", stacklevel=2)
    if not rows:
        where = f"; see {quarantine_path}" if bad and quarantine_path is not None else ""
        raise DataError(f"{path}: no valid rows (all {rows.num_read} rows were bad{where})")
    return rows


def write_quarantine(rows: CorpusRows, quarantine_path: str | os.PathLike) -> None:
    """Write the bad records of a read (``rows.bad``) to ``quarantine_path`` as JSON lines (atomically)."""
    write_jsonl(rows.bad, quarantine_path)
    rows.quarantine_path = str(quarantine_path)


# ----------------------------------------------------------------------------------------------------------------
# chunking


def chunk_passages(rows: Iterable[dict], max_words: int = 100, overlap: int = 20) -> list[dict]:
    """Split texts longer than ``max_words`` words into windows of ``max_words`` that overlap by ``overlap`` words.

    A split row becomes ``{id: "<id>#<n>", title, text, doc_id: <id>}`` for n = 0, 1, ...; a row that fits keeps its
    id and text. Every output row carries ``doc_id``. The last window ends at the end of the text, so no window is
    entirely inside the previous one.
    """
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    if not 0 <= overlap < max_words:
        raise ValueError(f"overlap must be in [0, max_words), got overlap={overlap}, max_words={max_words}")
    step = max_words - overlap
    out: list[dict] = []
    for row in rows:
        doc_id = str(row.get("doc_id") or row["id"])
        title = row.get("title") or ""
        words = row["text"].split()
        if len(words) <= max_words:
            out.append({"id": str(row["id"]), "title": title, "text": row["text"], "doc_id": doc_id})
            continue
        for n, start in enumerate(range(0, len(words) - overlap, step)):
            out.append({"id": f"{row['id']}#{n}", "title": title, "text": " ".join(words[start:start + max_words]),
                        "doc_id": doc_id})
            if start + max_words >= len(words):
                break
    seen: set[str] = set()
    for row in out:
        if row["id"] in seen:
            raise DataError(f'chunk id "{row["id"]}" collides with another passage id; rename the source row')
        seen.add(row["id"])
    return out


_WINDOW_ID = re.compile(r"(.+)#(\d+)")


class GoldPassages:
    """A question's ``gold_passage_ids`` -> the passages they name: the one place gold ids meet the corpus.

    Gold ids name rows of the user's corpus. `chunk_passages` splits a long row ``id`` into windows ``id#0, id#1,
    ...``, and every window of that row is gold (recall@k, the independent strategy's positives). An id that is
    itself a passage id (a row that was not split, or one window named directly) names that passage only.
    ``passage_ids``: the ids of the passages (or the index rows) to resolve against, in any order.
    """

    def __init__(self, passage_ids: Iterable[str]):
        self._known: set[str] = set()
        self._windows: dict[str, list[str]] = {}
        for pid in map(str, passage_ids):
            self._known.add(pid)
            m = _WINDOW_ID.fullmatch(pid)
            if m:
                self._windows.setdefault(m.group(1), []).append(pid)

    def passages(self, gold_ids: Iterable[str] | None) -> list[str]:
        """The passage ids that `gold_ids` name, in the order given (a split row: its windows in order); ids
        that name nothing are left out (`check` refuses them first)."""
        out: list[str] = []
        for g in map(str, gold_ids or ()):
            out += [g] if g in self._known else self._windows.get(g, [])
        return list(dict.fromkeys(out))

    def unknown(self, gold_ids: Iterable[str] | None) -> list[str]:
        """The ids in `gold_ids` that name no passage and no split row."""
        return [g for g in map(str, gold_ids or ()) if g not in self._known and g not in self._windows]

    def check(self, rows: Iterable[dict], source: str) -> None:
        """Raise `DataError` when any gold id of `rows` names no row of the corpus: recall would count that
        question as a miss, silently (a typo, an id column of another corpus, a corpus cut down after the
        questions were written). The message names `source`, how many rows, the first row and its id."""
        bad = [(i, r, self.unknown(r.get("gold_passage_ids"))) for i, r in enumerate(rows)]
        bad = [b for b in bad if b[2]]
        if bad:
            i, row, ids = bad[0]
            total = sum(len(b[2]) for b in bad)
            raise DataError(
                f"{source}: {total} gold_passage_ids in {len(bad)} question(s) name no row of the corpus "
                f"(first: question {row.get('id') or i + 1!r}, id {ids[0]!r}); gold ids name corpus rows (a row "
                "split into windows id#0, id#1, ... counts whole). Fix the ids or drop them from those questions")


# ----------------------------------------------------------------------------------------------------------------
# passage shards


def passages_fingerprint(ids: Iterable[str], texts: Iterable[str]) -> str:
    """sha256 over (id, text) pairs in order, 16 hex characters."""
    h = hashlib.sha256()
    for pid, text in zip(ids, texts):
        h.update(str(pid).encode())
        h.update(b"\x00")
        h.update(str(text).encode())
        h.update(b"\x01")
    return h.hexdigest()[:16]


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the complete directory ``tmp`` to ``out_dir``; an old ``out_dir`` is removed only afterwards."""
    old = None
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a directory")
        if any(out_dir.iterdir()):
            old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out_dir, old)
        else:
            out_dir.rmdir()
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_passage_output(out_dir: str | os.PathLike) -> None:
    """Raise FileExistsError unless `write_passages` may write ``out_dir``: absent, an empty directory, or a passage
    directory (it holds ``passages.json``) that the new passages replace. Commands call it before reading input."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory; refusing to replace it")
    if any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).exists():
        raise FileExistsError(f"{out_dir} is a non-empty directory that is not a passage directory; "
                              "refusing to replace it")


def write_passages(rows: list[dict], out_dir: str | os.PathLike, shard_size: int = 50_000) -> dict:
    """Write passages as Parquet shards plus a ``passages.json`` manifest; returns the manifest.

    Columns: id, title, text, and doc_id when any row has one. The shards are written into a temporary
    directory beside ``out_dir`` and renamed into place; an existing ``out_dir`` is replaced only once the new
    one is complete, and only if it is empty or itself a passage directory (it holds ``passages.json``).
    """
    out_dir = Path(out_dir)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not rows:
        raise DataError(f"{out_dir}: no passages to write")
    check_passage_output(out_dir)
    ids = [str(r["id"]) for r in rows]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise DataError(f'duplicate passage id "{dup}"')
    with_doc = any("doc_id" in r for r in rows)
    fields = [pa.field("id", pa.string()), pa.field("title", pa.string()), pa.field("text", pa.string())]
    if with_doc:
        fields.append(pa.field("doc_id", pa.string()))
    schema = pa.schema(fields)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        shards = []
        for n, start in enumerate(range(0, len(rows), shard_size)):
            chunk = rows[start:start + shard_size]
            columns = {"id": ids[start:start + shard_size], "title": [r.get("title") or "" for r in chunk],
                       "text": [r["text"] for r in chunk]}
            if with_doc:
                columns["doc_id"] = [str(r.get("doc_id") or r["id"]) for r in chunk]
            name = SHARD_PATTERN.format(n)
            pq.write_table(pa.table(columns, schema=schema), tmp / name)
            shards.append({"file": name, "count": len(chunk)})
        manifest = {"count": len(rows), "shards": shards, "columns": schema.names,
                    "fingerprint": passages_fingerprint(ids, (r["text"] for r in rows))}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(passage_dir: str | os.PathLike) -> dict:
    path = Path(passage_dir) / MANIFEST_NAME
    if not path.exists():
        raise DataError(f"{passage_dir}: not a passage directory (no {MANIFEST_NAME}); run `latentrag ingest` first")
    return json.loads(path.read_text())


def read_passages(passage_dir: str | os.PathLike) -> pa.Table:
    """All passages of a directory written by `write_passages`, in order, as one Arrow table."""
    manifest = read_manifest(passage_dir)
    tables = [pq.read_table(Path(passage_dir) / s["file"]) for s in manifest["shards"]]
    table = pa.concat_tables(tables)
    if table.num_rows != manifest["count"]:
        raise DataError(f"{passage_dir}: manifest says {manifest['count']} passages, shards hold {table.num_rows}")
    return table


def iter_passage_batches(passage_dir: str | os.PathLike, batch_size: int = 1024,
                         columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Stream passages shard by shard in batches of exactly ``batch_size`` rows (the last may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    manifest = read_manifest(passage_dir)
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    for shard in manifest["shards"]:
        pf = pq.ParquetFile(Path(passage_dir) / shard["file"])
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            pending.append(batch)
            pending_rows += batch.num_rows
            while pending_rows >= batch_size:
                table = pa.Table.from_batches(pending)
                yield table.slice(0, batch_size).combine_chunks().to_batches()[0]
                rest = table.slice(batch_size)
                pending = rest.combine_chunks().to_batches() if rest.num_rows else []
                pending_rows = rest.num_rows
    if pending_rows:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


# ----------------------------------------------------------------------------------------------------------------
# QA


def _str_list(value: Any, field: str) -> list[str]:
    """A list of non-empty strings from a list, a JSON-list string (CSV cells) or a single scalar."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if value is None:
        return []
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise DataError(f'"{field}" must be a list of strings, got {type(value).__name__}')
    out = []
    for item in value:
        if item is None or isinstance(item, (bool, dict, list)):
            raise DataError(f'"{field}" must hold strings, got {item!r}')
        text = str(int(item)) if isinstance(item, float) and item.is_integer() else str(item).strip()
        if text:
            out.append(text)
    return out


def _qa_row(obj: Any, number: int) -> dict:
    if isinstance(obj, Exception):
        raise obj
    if not isinstance(obj, dict):
        raise DataError(f"expected an object with \"question\" and \"answers\", got {type(obj).__name__}")
    question = obj.get("question")
    if question is None or question == "":
        raise DataError('missing "question"')
    if not isinstance(question, str):
        raise DataError(f'"question" must be a string, got {type(question).__name__}')
    if not question.strip():
        raise DataError('empty "question"')
    if obj.get("answers") not in (None, "", []):
        answers = _str_list(obj["answers"], "answers")
    elif obj.get("answer") not in (None, ""):
        answers = _str_list(obj["answer"], "answer")
    else:
        raise DataError('missing "answers" (or "answer")')
    if not answers:
        raise DataError('empty "answers"')
    qid = _scalar_str(obj.get("id"), "id", required=False) or f"q{number}"
    gold = _str_list(obj.get("gold_passage_ids"), "gold_passage_ids")
    return {"id": qid, "question": question.strip(), "answers": answers, "gold_passage_ids": gold}


def read_qa(path: str | os.PathLike, fmt: str | None = None) -> list[dict]:
    """Read QA rows ``{id, question, answers: list[str], gold_passage_ids: list[str]}`` from one file.

    ``answers`` may be a list or a single ``answer`` string; ``gold_passage_ids`` is optional (empty list when
    absent). Rows without an id get ``q<line>``. Any bad row raises `DataError` naming the file and the line.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: read_qa reads one file, got a directory")
    [(file, file_fmt)] = _list_files(path, fmt)
    rows: list[dict] = []
    first_seen: dict[str, int] = {}
    for label, number, _raw, obj in _iter_records(file, file_fmt):
        try:
            row = _qa_row(obj, number)
            if row["id"] in first_seen:
                raise DataError(f'duplicate id "{row["id"]}" (first seen at {label} {first_seen[row["id"]]})')
        except DataError as e:
            raise DataError(f"{file} {label} {number}: {e}") from None
        first_seen[row["id"]] = number
        rows.append(row)
    if not rows:
        raise DataError(f"{file}: empty file (no QA rows)")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# JSONL


def write_json(obj, path: str | os.PathLike) -> None:
    """Write one JSON document atomically (temporary file beside ``path``, fsync, then `os.replace`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> int:
    """Write rows as JSON lines atomically (temporary file beside ``path``, then `os.replace`); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False, default=str))
                fh.write("\n")
                count += 1
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Plain JSON-lines reader (no validation) for files this package wrote itself."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
