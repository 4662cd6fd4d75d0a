"""What travels between the deployments (typed items, one per request) and the batching helpers they share.

Every request is one item from the ingress to the end: a `RetrieveItem` or an `AnswerItem` in, a `Retrieved` or an
`Answer` out, or an `ItemError` for that item alone. A batch never fails as a whole: `run_each` runs a batched call
and, when it raises, runs the items of that call one at a time, so the item that cannot be processed gets its own
`ItemError` and the others their results. `Coalescer` merges batches that queued up while the model was busy.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

# Serve's own logger: in a replica its records go to the replica's log file under the session's logs/serve/
# directory (and to stderr unless Serve turned that off), so a traceback logged here is what the server log shows.
logger = logging.getLogger("ray.serve")


@dataclass
class ItemError:
    """One item could not be processed. `message` is short and safe to show a client; the traceback is in the
    server log under `request_id`."""
    message: str
    request_id: str = ""
    overloaded: bool = False       # refused for load (503), not failed


@dataclass
class RetrieveItem:
    ref: dict                      # ModelRef.to_dict() of the version this request uses
    question: str
    k: int
    request_id: str = ""


@dataclass
class Retrieved:
    passages: list[dict]           # {id, title, text, row, score, probability, generator_text}


@dataclass
class AnswerItem:
    ref: dict
    question: str
    mode: str
    k: int
    num_beams: int
    max_new_tokens: int | None
    request_id: str = ""
    retrieved: Retrieved | ItemError | None = None      # None: the Generator asks the Retriever
    history: tuple = ()          # earlier chat turns ({role, content}, oldest first): OpenAI route, chat generators


@dataclass
class Answer:
    answer: str
    score: float
    posterior: list
    retrieved: Retrieved | None = None
    batch_size: int = 1
    history_used: bool = False   # the item's earlier chat turns went into the generator's prompt


def run_each(fn: Callable[[list], list], items: Sequence, what: str) -> list:
    """`fn(items)` (one result per item); if it raises, each item alone, so that one item's failure is that item's
    `ItemError` and never its neighbours'. Tracebacks go to the server log with the item's request id."""
    items = list(items)
    try:
        return list(fn(items))
    except Exception:  # noqa: BLE001 - isolated below
        if len(items) > 1:
            logger.warning("%s: a batch of %d failed; running its items one at a time", what, len(items),
                           exc_info=True)
        else:
            rid = getattr(items[0], "request_id", "")
            logger.exception("request %s: %s failed", rid, what)
            return [ItemError(f"{what} failed", rid)]
    out = []
    for item in items:
        rid = getattr(item, "request_id", "")
        try:
            out.extend(fn([item]))
        except Exception:  # noqa: BLE001 - this item's own failure
            logger.exception("request %s: %s failed", rid, what)
            out.append(ItemError(f"{what} failed", rid))
    return out


class Coalescer:
    """Runs `fn(items) -> results` (same length) over everything submitted while its previous call ran, up to
    `max_items` per call. Serve's @serve.batch forms a batch from what arrives within batch_wait_timeout_s, whether
    or not the model is free, so under load the model would run many small batches one after another; behind a
    coalescer, the batches that queued up while the model was busy run as one. `fn` should report failures per item
    (`run_each`); if it raises anyway, every caller of that call gets the exception."""

    def __init__(self, fn, max_items: int):
        self.fn = fn
        self.max_items = max(1, max_items)
        self._pending: list[tuple[list, asyncio.Future]] = []
        self._running = False

    async def submit(self, items: list) -> list:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((items, fut))
        if not self._running:
            self._running = True
            asyncio.ensure_future(self._drain())
        return await fut

    async def _drain(self) -> None:
        try:
            while self._pending:
                take, n = [], 0
                while self._pending and (not take or n + len(self._pending[0][0]) <= self.max_items):
                    take.append(self._pending.pop(0))
                    n += len(take[-1][0])
                try:
                    out = await self.fn([x for items, _ in take for x in items])
                except Exception as exc:  # noqa: BLE001 - handed to every caller of this call
                    for _, fut in take:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                pos = 0
                for items, fut in take:
                    if not fut.done():
                        fut.set_result(out[pos:pos + len(items)])
                    pos += len(items)
        finally:
            self._running = False


def batch_stats(replica) -> dict:
    return {"batches": replica.batches, "requests": replica.batched_requests,
            "mean_batch_size": round(replica.batched_requests / replica.batches, 2) if replica.batches else None}
