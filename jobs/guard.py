"""What a killed training driver leaves behind gets cleaned up: a small watcher process outlives the driver.

A driver killed with SIGKILL runs no handler, so its MLflow run would stay RUNNING forever and the local Ray it
started (GCS, raylet, dashboard and runtime-env agents, one listening on 0.0.0.0) would linger for minutes. The
driver starts `DriverGuard`, a child process in its own session (Ctrl-C in the terminal does not reach it) whose
stdin is a pipe from the driver. The kernel closes that pipe whenever the driver dies, however it dies. When the
pipe closes without the driver having said "done", the guard marks the MLflow run KILLED, records the
interruption in OUTPUT_DIR/run.json and stops the Ray processes the driver started (never a cluster it only
connected to), then prints how to continue (`--resume`).

    python -m jobs.guard --parent PID --tracking-uri URI --run-id ID --run-state OUTPUT_DIR/run.json
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from pipeline.data import write_json


class DriverGuard:
    """The driver's side: start the watcher, tell it which Ray processes are the driver's, say "done" at the end."""

    def __init__(self, tracking_uri: str, run_id: str, run_state: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.guard", "--parent", str(os.getpid()), "--tracking-uri", tracking_uri,
             "--run-id", run_id, "--run-state", str(run_state)],
            stdin=subprocess.PIPE, text=True, start_new_session=True)

    def watch_local_ray(self) -> int:
        """Hand the guard every process this driver has started so far (the local Ray it started and what that
        started since); call again when more have started. Returns the number handed over."""
        pairs = []
        for p in psutil.Process().children(recursive=True):
            try:
                if p.pid != self.proc.pid:
                    pairs.append(f"{p.pid}:{p.create_time()!r}")
            except psutil.Error:           # gone meanwhile
                continue
        self._send("pids " + " ".join(pairs))
        return len(pairs)

    def close(self) -> None:
        """The driver ends on its own terms (finished, failed or interrupted and handled): nothing to clean up."""
        self._send("done")
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.proc.kill()

    def _send(self, line: str) -> None:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass


def _stop_processes(recorded: list[tuple[int, float]], grace_s: float = 5.0) -> int:
    """SIGTERM the recorded processes (checked by start time: a pid can be reused) and their descendants, then
    SIGKILL whatever is still there after `grace_s`. Returns how many were stopped."""
    procs: dict[int, psutil.Process] = {}
    for pid, created in recorded:
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) > 0.01:
                continue
            procs[p.pid] = p
            for c in p.children(recursive=True):
                procs[c.pid] = c
        except psutil.Error:
            continue
    for p in procs.values():
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return len(procs)


def _mark_killed(tracking_uri: str, run_id: str) -> bool:
    from mlflow.tracking import MlflowClient     # heavy, and needed only once the driver is gone

    client = MlflowClient(tracking_uri)
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_terminated(run_id, "KILLED")
    return True


def _record_interruption(run_state: Path, parent: int) -> None:
    if not run_state.exists():
        return
    state = json.loads(run_state.read_text())
    state.update(status="killed", interrupted_at=time.strftime("%Y-%m-%dT%H:%M:%S"), driver_pid=parent)
    write_json(state, run_state)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.guard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parent", type=int, required=True, help="the driver's pid (for the message)")
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--run-state", type=Path, required=True, help="OUTPUT_DIR/run.json")
    args = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the driver handles Ctrl-C; the guard waits for its end
    recorded: list[tuple[int, float]] = []
    for line in sys.stdin:                             # blocks until the driver writes or dies
        word, _, rest = line.strip().partition(" ")
        if word == "done":
            return 0
        if word == "pids":
            recorded += [(int(a), float(b)) for a, b in (x.split(":") for x in rest.split())]
    # EOF without "done": the driver died without running its handlers
    killed = _mark_killed(args.tracking_uri, args.run_id)
    _record_interruption(args.run_state, args.parent)
    stopped = _stop_processes(recorded)
    output_dir = args.run_state.parent
    sys.stderr.write(f"latentrag: the training driver (pid {args.parent}) died; "
                     f"{'marked MLflow run ' + args.run_id + ' KILLED, ' if killed else ''}"
                     f"stopped {stopped} Ray processes it had started. Continue from the newest checkpoint "
                     f"with the same command and --resume (output dir {output_dir}).\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
