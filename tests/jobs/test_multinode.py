"""`ray job submit` on a real two-node Ray cluster started here (a head and a worker node, 1 CPU and a custom
resource each, token authentication on, their own ports and temp dirs: the suite's shared `ray_local` never sees
it). One job trains the tiny synthetic KB with 2 Ray Train workers, which can only fit one per node; a second job
resumes the finished run to a larger --max-steps. Then the cluster is stopped and no process of it may be left.

Not covered here (cost): an index refresh (it needs spare CPUs beside both train workers, so a bigger cluster).
"""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from pipeline.synthetic import generate_knowledge_base, write_knowledge_base

pytestmark = pytest.mark.multinode

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
STEPS, MORE_STEPS = 4, 6


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_ports(p: list[int]) -> list[str]:
    """Every port a node's processes bind: two nodes on one host must not share any of them (a second node's
    dashboard agent that cannot bind leaves job submissions with "No available agent")."""
    return [f"--node-manager-port={p[0]}", f"--object-manager-port={p[1]}",
            f"--dashboard-agent-listen-port={p[2]}", f"--dashboard-agent-grpc-port={p[3]}",
            f"--metrics-export-port={p[4]}", f"--runtime-env-agent-port={p[5]}"]


class Cluster:
    """A head and one worker node started with `ray start`, each in a session of its own so that stopping the
    cluster means ending exactly the processes of those sessions (never `ray stop`: it ends every Ray of the
    machine, other users' too)."""

    def __init__(self, tmp: Path):
        self.tmp, self.sessions = tmp, []
        token = tmp / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        venv_bin = str(Path(sys.executable).parent)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env = {**env, "PATH": venv_bin + os.pathsep + env.get("PATH", ""), "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
                    "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        ports = _free_ports(15)
        self.gcs, self.dashboard = ports[0], ports[1]
        self._start("--head", f"--port={self.gcs}", f"--dashboard-port={self.dashboard}",
                    "--dashboard-host=127.0.0.1", f"--ray-client-server-port={ports[2]}", "--resources",
                    '{"head_node": 1}', f"--temp-dir={tmp / 'h'}", *_node_ports(ports[3:9]))
        self._start(f"--address=127.0.0.1:{self.gcs}", "--resources", '{"worker_node": 1}',
                    f"--temp-dir={tmp / 'w'}", *_node_ports(ports[9:15]))

    def _start(self, *args: str) -> None:
        # start_new_session: `ray start` leads a new session, and every daemon it starts (GCS, raylet, agents,
        # workers, the job's driver) stays in it
        proc = subprocess.Popen([RAY, "start", "--num-cpus=1", "--disable-usage-stats", *args], env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.sessions.append(proc.pid)          # the session id of everything it starts
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"ray start {' '.join(args)} failed:\n{output[-3000:]}"

    def submit(self, *train_args: str) -> subprocess.CompletedProcess:
        cmd = [RAY, "job", "submit", "--address", f"http://127.0.0.1:{self.dashboard}", "--working-dir", ".", "--",
               "python", "-m", "jobs.train", *train_args]
        return subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=600)

    def processes(self) -> list[psutil.Process]:
        """Every live process of the cluster: in one of its sessions, or naming its temp dir."""
        found = []
        for p in psutil.process_iter(["cmdline", "status"]):
            try:
                if p.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                if os.getsid(p.pid) in self.sessions or str(self.tmp) in " ".join(p.info["cmdline"] or []):
                    found.append(p)
            except (psutil.Error, ProcessLookupError, PermissionError):
                pass
        return found

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            procs = self.processes()
            for p in procs:
                try:
                    p.send_signal(sig)
                except psutil.Error:
                    pass
            psutil.wait_procs(procs, timeout=wait)


def _trace_starts(out: Path, rank: int) -> list[dict]:
    path = out / "trace" / f"rank{rank}.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("event") == "start"]


def _outputs_line(log: str) -> Path:
    return Path(next(line.split("->", 1)[1].strip() for line in log.splitlines() if line.startswith("[run] outputs")))


def test_job_submit_on_two_nodes_trains_checkpoints_and_resumes():
    # a short path: Ray's socket paths under the temp dir must stay below the 107-byte limit of Unix sockets
    tmp = Path(tempfile.mkdtemp(prefix="lrmn", dir="/tmp"))
    cluster, left = None, []
    try:
        kb = generate_knowledge_base(seed=0, num_entities=12)
        data = write_knowledge_base(kb, tmp / "data")
        # the command: a relative output dir, which the job resolves in its copy of --working-dir on the
        # head; the Ray Data read tasks on the other node used to look for the passages in theirs
        args = ["--corpus", data["corpus"], "--train-qa", data["train"], "--eval-qa", data["test"],
                "--output-dir", "runs/multinode", "--set", "train.num_workers=2", "--set", "train.cpus_per_worker=1",
                "--set", "train.checkpoint_every=2", "--set", "train.batch_size=2", "--set", "train.k=3",
                "--set", "eval.k=3", "--set", "eval.max_questions=4", "--set", "train.torch_threads=1",
                "--set", "train.log_every=1", "--set", "train.trace=true", "--set", "generator.max_source_length=64"]
        cluster = Cluster(tmp)

        first = cluster.submit(*args, "--max-steps", str(STEPS))
        log = first.stdout + first.stderr
        assert first.returncode == 0, log[-6000:]
        assert "succeeded" in log
        out = _outputs_line(log)
        package = out.parents[1]
        assert package.parent.name == "working_dir_files" and str(tmp / "h") in str(out)
        assert "inside this job's copy of --working-dir" in log               # the warning about such a dir
        # the two workers ran on the two nodes (1 CPU each, 1 CPU per worker: nothing else fits)
        nodes = {_trace_starts(out, r)[0]["node_id"] for r in (0, 1)}
        assert len(nodes) == 2, nodes
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["steps"] == STEPS
        assert (out / "checkpoint" / "rag.json").is_file()
        assert json.loads((out / "run.json").read_text())["status"] == "finished"
        # the job's copy of --working-dir is code and configs: no run outputs, benchmark results or virtualenv
        assert (package / "jobs" / "train.py").is_file()
        assert not any((package / d).exists() for d in (".venv", "benchmarks/results", ".git"))
        assert {p.name for p in (package / "runs").iterdir()} == {"multinode"}     # only this job's output

        # resumed by a second job, named by its absolute path: a resubmitted job gets its own copy of the working
        # dir (another package when any file changed), so the relative name would not find it
        second = cluster.submit(*args, "--output-dir", str(out), "--max-steps", str(MORE_STEPS), "--resume",
                                "--index", str(out / "index"))
        log = second.stdout + second.stderr
        assert second.returncode == 0, log[-6000:]
        assert _outputs_line(log) == out
        resumed = json.loads((out / "metrics.json").read_text())
        assert resumed["steps"] == MORE_STEPS
        assert resumed["mlflow_run_id"] == metrics["mlflow_run_id"]           # the same MLflow run continues
        for r in (0, 1):                                                        # from the step-4 checkpoint
            assert _trace_starts(out, r)[-1]["step"] == STEPS
        assert len({_trace_starts(out, r)[-1]["node_id"] for r in (0, 1)}) == 2
    finally:
        if cluster is not None:
            cluster.stop()
            left = [(p.pid, p.name()) for p in cluster.processes()]
        shutil.rmtree(tmp, ignore_errors=True)
    assert not left, f"cluster processes left running: {left}"
