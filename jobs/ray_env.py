"""How every job joins Ray: the cluster named by RAY_ADDRESS (`ray job submit`, a driver on the head node), or a
local Ray started here. Workers get the variables that keep them offline and quiet, and nothing else: Ray writes
runtime_env variables into its logs, so no secret may travel this way. Output that is not a terminal gets no ANSI
colour codes (`plain_logs`)."""
from __future__ import annotations

import logging
import os
import re
import sys

import ray


def worker_env(extra: dict | None = None) -> dict[str, str]:
    return {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false",
            **{k: str(v) for k, v in (extra or {}).items()}}


def ensure_ray(extra_env: dict | None = None) -> bool:
    """Join (or start) Ray unless this process already has; True when this call did."""
    if ray.is_initialized():
        return False
    plain_logs()
    ray.init(runtime_env={"env_vars": worker_env(extra_env)})
    return True


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _NoAnsi(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = ANSI.sub("", record.getMessage()), None
        return True


def plain_logs(stream=None) -> None:
    """No ANSI colour codes when the output is not a terminal (a log file, a pipe, CI). Ray colours the
    `(pid=...)` prefix of worker lines it prints on the driver unless RAY_COLOR_PREFIX=0 (read when it prints them),
    and its start-up line colours the dashboard URL (a filter on the `ray` logger's handlers strips that)."""
    if (stream or sys.stdout).isatty():
        return
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    for handler in logging.getLogger("ray").handlers:
        if not any(isinstance(f, _NoAnsi) for f in handler.filters):
            handler.addFilter(_NoAnsi())
