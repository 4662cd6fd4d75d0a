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
    env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    address = os.environ.get("RAY_ADDRESS", "")
    if address and not address.startswith("ray://"):
        # the cluster this job runs on (a GCS address, as `ray job submit` sets it; never a Ray Client address):
        # Ray Train's helper actors look Ray up through the state API, which otherwise refuses to choose when a
        # host runs more than one Ray ("Found multiple active Ray instances")
        env["RAY_ADDRESS"] = address
    return {**env, **{k: str(v) for k, v in (extra or {}).items()}}


def inside_job_package(path: str | os.PathLike) -> bool:
    """Whether `path` lies in the copy of `--working-dir` Ray unpacked for this job: Ray deletes it with the
    cluster, and a later `ray job submit` of changed code gets another one (outputs there are lost)."""
    cwd = os.getcwd()
    return "working_dir_files" in cwd.split(os.sep) and os.path.abspath(path).startswith(cwd + os.sep)


def ensure_ray(extra_env: dict | None = None, dashboard: bool = True) -> bool:
    """Join (or start) Ray unless this process already has; True when this call did. `dashboard=False`: a local
    Ray started here runs without the dashboard (one-shot commands that print their own progress: on 2 cores its
    processes took ~2% of the CPU and ~1 s of the start)."""
    if ray.is_initialized():
        return False
    plain_logs()
    ray.init(runtime_env={"env_vars": worker_env(extra_env)}, **({} if dashboard else {"include_dashboard": False}))
    return True


def worker_log(msg: str) -> None:
    """A progress line from a Ray Train worker. Not print(): in a Ray Train V2 worker print() is patched into a
    root-logger call that also tees to the redirected stdout, so every line reached the driver twice
    (RAY_TRAIN_ENABLE_PRINT_PATCH)."""
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def node_name() -> str:
    """This process's Ray node as errors name it: its IP and node id (two nodes on one host share the IP)."""
    ctx = ray.get_runtime_context() if ray.is_initialized() else None
    node_id = ctx.get_node_id() if ctx is not None else None
    return f"node {ray.util.get_node_ip_address()}" + (f" (id {node_id[:12]})" if node_id else "")


def error_message(exc: BaseException) -> str:
    """What a job prints for `exc`: a Ray task's exception is re-raised in the driver as RayTaskError, whose text is
    the remote traceback; its cause's own message (which names the file and the node) is the one to show."""
    cause = getattr(exc, "cause", None)
    return str(cause) if isinstance(exc, ray.exceptions.RayError) and isinstance(cause, BaseException) else str(exc)


def _missing(paths: dict[str, str]) -> tuple[str, list[tuple[str, str]]]:
    """Ray task body: this node's name and the (what, path) pairs it cannot see."""
    return node_name(), [(what, p) for what, p in paths.items() if not os.path.exists(p)]


def check_paths_on_nodes(paths: dict[str, str | os.PathLike | None], timeout_s: float = 300,
                         include_this_node: bool = False) -> int:
    """Every alive node of the cluster must see each path the job's tasks and workers will read or write (a
    one-off zero-CPU task pinned to each node, so none waits for a free CPU): else FileNotFoundError naming each
    node and path it lacks, before any training starts. The driver's own node is skipped (the driver has already
    read them) unless `include_this_node`. Returns the number of nodes checked."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    wanted = {what: str(p) for what, p in paths.items() if p is not None}
    here = ray.get_runtime_context().get_node_id()
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and (include_this_node or n["NodeID"] != here)]
    if not wanted or not nodes:
        return 0
    task = ray.remote(num_cpus=0, max_retries=0)(_missing)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(wanted)
            for n in nodes]
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        late = [n[:12] for n, r in zip(nodes, refs) if r in pending]
        raise TimeoutError(f"node(s) {', '.join(late)} did not answer the path check within {timeout_s:g}s")
    problems = [f"{name} cannot see {what} {p}" for name, missing in ray.get(refs) for what, p in missing]
    if problems:
        raise FileNotFoundError("; ".join(problems) + ": every node needs these paths (a shared filesystem mounted "
                                "at the same place on each node)")
    return len(nodes)


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
