"""Progress a person can read: a tqdm bar on a terminal; in a log file or a pipe, one plain line at most every
`every_s` seconds (and at the end) with the count, the rate and the time left, and no carriage returns."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm


def format_seconds(s: float) -> str:
    s = int(round(max(s, 0.0)))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """`progress(done, total)` after each piece of work (the signature `pipeline.evaluation.evaluate` calls)."""

    def __init__(self, label: str, unit: str, every_s: float = 10.0, stream=None):
        self.label, self.unit, self.every_s = label, unit, every_s
        self.stream = stream or sys.stdout
        self.bar = None
        self.t0 = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if self.stream.isatty():
            if self.bar is None:
                self.bar = tqdm(total=total, desc=self.label, unit=self.unit, file=self.stream, leave=False)
            self.bar.update(done - self.bar.n)
            if done >= total:
                self.bar.close()
            return
        now = time.monotonic()
        if done < total and now - self.last < self.every_s:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        left = (total - done) / rate if rate > 0 else 0.0
        self.stream.write(f"{self.label} {done}/{total} {self.unit}  {rate:.1f} {self.unit}/s  "
                          f"{format_seconds(left)} left\n")
        self.stream.flush()
