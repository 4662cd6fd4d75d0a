"""`ray job submit` and `serve deploy` on a real two-node Ray cluster started here (a head and a worker node, 3
logical CPUs and a custom resource each, token authentication on, their own ports and temp dirs: the suite's shared
`ray_local` never sees it). One cluster start serves every phase:

1. a job trains the tiny synthetic KB with 2 Ray Train workers of 2 CPUs each (one fits per node) and trains the
   passage encoder: at step 1 a background refresh (a Ray task and its encoder actor, 0.3 CPU each, beside the
   workers) re-encodes the corpus into index v2, which both workers switch to between two steps. Once a checkpoint
   on v2 exists and the workers are 2 steps past it, the test SIGKILLs the train worker on the worker node: the run
   restarts from a checkpoint on v2 (not from scratch), trains every later step once and ends at --max-steps;
2. a second job resumes the finished run to a larger --max-steps;
3. `serve deploy` of configs/serve.yaml's application with the first job's checkpoint, the Generator at 2 replicas
   and at most one per node: Serve's REST API and /v1/info put them on different nodes, and each answers the
   evaluation questions as the first job's predictions.jsonl does;
4. /v1/admin/reload to the resumed checkpoint: both Generator replicas load it and answer as the resumed run's
   predictions.jsonl does; `serve shutdown`. Then the cluster is stopped and no process of it may be left.

The phases' seconds are printed (`pytest -s`).
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
import time
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from pipeline.index import current_version, read_manifest
from pipeline.synthetic import generate_knowledge_base, write_knowledge_base

pytestmark = pytest.mark.multinode

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
# job 1: the refresh submitted at step 1 was switched to at step 9-10 on the shared 2-core machine; the kill needs a
# checkpoint on the new index and 2 steps after it: 24 steps leave room for a build twice as slow
STEPS, CKPT_EVERY, MORE_STEPS = 24, 6, 26
NODE_CPUS, WORKER_CPUS, REFRESH_CPUS = 3, 2, 0.3     # 2 + 0.3 x 3 refresh tasks/actors fit beside each other
ADMIN_TOKEN = "multinode-admin-token"


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
        self.token = secrets.token_hex(32)
        token.write_text(self.token)
        token.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        # PYTHONPATH: the project as every node of a real cluster has it installed (cluster.yaml's setup commands),
        # for what runs outside a job's --working-dir: the Serve application of `serve deploy`
        self.env = {**env, "PATH": str(BIN) + os.pathsep + env.get("PATH", ""),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
                    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        ports = _free_ports(15)
        self.gcs, self.dashboard = ports[0], ports[1]
        self.address = f"http://127.0.0.1:{self.dashboard}"
        self._start("--head", f"--port={self.gcs}", f"--dashboard-port={self.dashboard}",
                    "--dashboard-host=127.0.0.1", f"--ray-client-server-port={ports[2]}", "--resources",
                    '{"head_node": 1}', f"--temp-dir={tmp / 'h'}", *_node_ports(ports[3:9]))
        self._start(f"--address=127.0.0.1:{self.gcs}", "--resources", '{"worker_node": 1}',
                    f"--temp-dir={tmp / 'w'}", *_node_ports(ports[9:15]))

    def _start(self, *args: str) -> None:
        # start_new_session: `ray start` leads a new session, and every daemon it starts (GCS, raylet, agents,
        # workers, the job's driver) stays in it
        proc = subprocess.Popen([RAY, "start", f"--num-cpus={NODE_CPUS}", "--disable-usage-stats", *args],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        self.sessions.append(proc.pid)          # the session id of everything it starts
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"ray start {' '.join(args)} failed:\n{output[-3000:]}"

    def submit(self, *train_args: str, log: Path) -> subprocess.Popen:
        """`ray job submit ... python -m jobs.train ARGS`, its output (the job's log, followed) into `log`."""
        cmd = [RAY, "job", "submit", "--address", self.address, "--working-dir", ".", "--",
               "python", "-m", "jobs.train", *train_args]
        with open(log, "w") as f:
            return subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT, text=True)

    def serve_cli(self, *args: str) -> str:
        proc = subprocess.run([str(BIN / "serve"), *args, "--address", self.address], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"serve {' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}"
        return proc.stdout

    def serve_details(self) -> dict:
        """Serve's own view of its applications and replicas (the dashboard's REST API, with the Ray token)."""
        r = requests.get(f"{self.address}/api/serve/applications/", timeout=30,
                         headers={"Authorization": f"Bearer {self.token}"})
        r.raise_for_status()
        return r.json()

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


def _records(out: Path, rank: int) -> list[dict]:
    path = out / "trace" / f"rank{rank}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _trace_starts(out: Path, rank: int) -> list[dict]:
    return [r for r in _records(out, rank) if r.get("event") == "start"]


def _outputs_line(log: str) -> Path:
    return Path(next(line.split("->", 1)[1].strip() for line in log.splitlines() if line.startswith("[run] outputs")))


def _finish(job: subprocess.Popen, log: Path) -> str:
    job.wait(timeout=900)
    text = log.read_text()
    assert job.returncode == 0, text[-6000:]
    assert "succeeded" in text
    return text


def _checkpoints_on(out: Path, index_version: str) -> list[int]:
    """Steps of the Ray Train checkpoints (under ray_results/) whose model reads `index_version`."""
    steps = []
    for rag in out.glob("ray_results/*/checkpoint_*/rag.json"):
        try:
            meta = json.loads(rag.read_text())
        except (OSError, ValueError):           # still being written
            continue
        if meta.get("index_version") == index_version:
            steps.append(meta["step"])
    return steps


def _kill_on_worker_node(cluster: Cluster, job: subprocess.Popen, tmp: Path) -> tuple[int, int, int]:
    """Once a checkpoint on the refreshed index v2 exists and the train worker on the worker node has trained 2
    steps past it (time for Ray Train to register it), SIGKILL that worker. Returns its rank, its pid and the step
    of the first checkpoint on v2. The job's output dir is found from its log."""
    deadline = time.time() + 600
    out = victim = None
    while job.poll() is None and time.time() < deadline:
        time.sleep(0.2)
        if out is None:
            try:
                out = _outputs_line((tmp / "job1.log").read_text())
            except StopIteration:
                continue
        if victim is None:
            for rank in (0, 1):
                starts = _trace_starts(out, rank)
                # workers are children of their node's raylet: in the worker node's session
                if starts and os.getsid(starts[0]["pid"]) == cluster.sessions[1]:
                    victim = (rank, starts[0]["pid"])
            assert victim or not all(_trace_starts(out, r) for r in (0, 1)), "no train worker on the worker node"
            continue
        on_v2 = _checkpoints_on(out, "v2")
        trained = [r["step"] for r in _records(out, victim[0]) if "event" not in r]
        if on_v2 and trained and max(trained) >= min(on_v2) + 1:
            os.kill(victim[1], signal.SIGKILL)
            return (*victim, min(on_v2))
    raise AssertionError(f"no checkpoint on index v2 to kill after (job ended: {job.poll()}):\n"
                         + (tmp / "job1.log").read_text()[-6000:])


def _post(url: str, body: dict, **kw) -> dict:
    r = requests.post(url, json=body, timeout=120, **kw)
    assert r.status_code == 200, r.text
    return r.json()


def _generators_answer(url: str, predictions: list[dict], model_version: str, requests_before: dict) -> dict:
    """Ask the run's evaluation questions round after round until /v1/info has shown both Generator replicas, each
    with more requests than it had in `requests_before` (replica id -> count) and holding `model_version`. Every
    answer must be the one the run's evaluation wrote, from `model_version`. Returns the Generator replicas'
    stats by replica id. (A call reaches a random replica: up to 30 rounds.)"""
    seen: dict[str, dict] = {}
    for _ in range(30):
        for p in predictions:
            a = _post(f"{url}/v1/answer", {"question": p["question"]})
            assert (a["answer"], a["model_version"]) == (p["prediction"], model_version), (a, p)
        for _ in range(6):
            stats = requests.get(f"{url}/v1/info", timeout=30).json()["batching"]["generator_replica"]
            seen[stats["replica"]] = stats
        if len(seen) == 2 and all(s["requests"] > requests_before.get(r, 0) and
                                  any(v.startswith(model_version + "@") for v in s["versions"])
                                  for r, s in seen.items()):
            return seen
    raise AssertionError(f"not both Generator replicas answered with {model_version}: {json.dumps(seen, indent=1)}")


def _serve_config(tmp: Path, checkpoint: Path, port: int) -> Path:
    """configs/serve.yaml's application on this cluster: the checkpoint, the admin token file and a free port; the
    Generator at 2 replicas, at most one per node (the Retriever keeps one: the other node's Generator calls it
    across nodes)."""
    cfg = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
    (tmp / "admin_token").write_text(ADMIN_TOKEN)
    app["args"].update(checkpoint=str(checkpoint), admin_token_file=str(tmp / "admin_token"), generator_threads=1)
    for d in app["deployments"]:
        if d["name"] in ("Retriever", "Generator"):
            d.pop("autoscaling_config")
            d["num_replicas"] = 2 if d["name"] == "Generator" else 1
        if d["name"] == "Generator":
            d["max_replicas_per_node"] = 1
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _wait_running(cluster: Cluster, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        app = cluster.serve_details().get("applications", {}).get("latentrag")
        if app and app["status"] == "RUNNING":
            return app
        assert not app or app["status"] != "DEPLOY_FAILED", app
        time.sleep(1)
    raise AssertionError(f"the application did not start: {cluster.serve_details()}")


def test_two_nodes_train_refresh_survive_a_killed_worker_resume_serve_and_reload():
    # a short path: Ray's socket paths under the temp dir must stay below the 107-byte limit of Unix sockets
    tmp = Path(tempfile.mkdtemp(prefix="lrmn", dir="/tmp"))
    cluster, left, phases = None, [], {}
    t = time.time()

    def phase(name: str) -> None:
        nonlocal t
        phases[name] = round(time.time() - t, 1)
        t = time.time()

    try:
        kb = generate_knowledge_base(seed=0, num_entities=12)
        data = write_knowledge_base(kb, tmp / "data")
        # the command: a relative output dir, which the job resolves in its copy of --working-dir on the
        # head; the Ray Data read tasks on the other node used to look for the passages in theirs
        args = ["--corpus", data["corpus"], "--train-qa", data["train"], "--eval-qa", data["test"],
                "--output-dir", "runs/multinode", "--set", "train.num_workers=2",
                "--set", f"train.cpus_per_worker={WORKER_CPUS}", "--set", f"train.checkpoint_every={CKPT_EVERY}",
                "--set", "train.batch_size=2", "--set", "train.k=3", "--set", "eval.k=3",
                "--set", "eval.max_questions=4", "--set", "train.torch_threads=1", "--set", "train.log_every=1",
                "--set", "train.trace=true", "--set", "generator.max_source_length=64",
                "--set", "retriever.train_passage_encoder=true", "--set", "index.refresh_schedule=1-2:1",
                "--set", f"index.refresh_cpus={REFRESH_CPUS}", "--set", "index.threads_per_actor=1"]
        cluster = Cluster(tmp)
        phase("cluster start")

        # 1. train, refresh the index, lose the worker node's train worker, finish
        job = cluster.submit(*args, "--max-steps", str(STEPS), log=tmp / "job1.log")
        victim_rank, victim_pid, first_on_v2 = _kill_on_worker_node(cluster, job, tmp)
        log = _finish(job, tmp / "job1.log")
        phase("job 1: train + refresh + kill")
        out = _outputs_line(log)
        package = out.parents[1]
        assert package.parent.name == "working_dir_files" and str(tmp / "h") in str(out)
        assert "inside this job's copy of --working-dir" in log               # the warning about such a dir
        # the refresh: built beside the train workers, switched to by both, the `current` version of the index
        assert "[refresh] step 1: passage encoder snapshot" in log and "switched to index v2" in log, log[-6000:]
        assert current_version(out / "index") == "v2"
        assert read_manifest(out / "index" / "v2")["encoder"] == "passage-encoder@step1"
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["steps"] == STEPS and metrics["index_version"] == "v2"
        assert json.loads((out / "run.json").read_text())["status"] == "finished"
        # the kill: every rank started twice, on both nodes each time; the second start is a checkpoint on v2
        # (not a restart from scratch), after which every step up to STEPS was trained once
        restarts = [_trace_starts(out, r) for r in (0, 1)]
        assert all(len(s) == 2 for s in restarts), restarts
        assert restarts[victim_rank][0]["pid"] == victim_pid
        for attempt in (0, 1):
            assert len({s[attempt]["node_id"] for s in restarts}) == 2, restarts
        resumed_at = restarts[0][1]["step"]
        assert resumed_at >= first_on_v2 and resumed_at % CKPT_EVERY == 0 and restarts[1][1]["step"] == resumed_at
        for r in (0, 1):
            recs = _records(out, r)
            second = recs.index(restarts[r][1])
            before = [x["step"] for x in recs[:second] if "event" not in x]
            after = [x["step"] for x in recs[second:] if "event" not in x]
            assert before == list(range(len(before))) and resumed_at <= len(before)
            assert after == list(range(resumed_at, STEPS))
        # the job's copy of --working-dir is code and configs: no run outputs, benchmark results or virtualenv
        assert (package / "jobs" / "train.py").is_file()
        assert not any((package / d).exists() for d in (".venv", "benchmarks/results", ".git"))
        assert {p.name for p in (package / "runs").iterdir()} == {"multinode"}     # only this job's output
        # kept for serving: the resumed run replaces both (hard links, as the run's own checkpoint/ is)
        first_ckpt = Path(shutil.copytree(out / "checkpoint", tmp / "checkpoint_job1", copy_function=os.link))
        first_predictions = (out / "predictions.jsonl").read_text()

        # 2. resumed by a second job, named by its absolute path: a resubmitted job gets its own copy of the working
        # dir (another package when any file changed), so the relative name would not find it
        job = cluster.submit(*args, "--output-dir", str(out), "--max-steps", str(MORE_STEPS), "--resume",
                             "--index", str(out / "index"), log=tmp / "job2.log")
        log = _finish(job, tmp / "job2.log")
        phase("job 2: resume")
        assert _outputs_line(log) == out
        resumed = json.loads((out / "metrics.json").read_text())
        assert resumed["steps"] == MORE_STEPS and resumed["index_version"] == "v2"
        assert resumed["mlflow_run_id"] == metrics["mlflow_run_id"]           # the same MLflow run continues
        for r in (0, 1):                                                        # from the step-STEPS checkpoint
            assert _trace_starts(out, r)[-1]["step"] == STEPS
        assert len({_trace_starts(out, r)[-1]["node_id"] for r in (0, 1)}) == 2

        # 3. serve job 1's checkpoint with `serve deploy`: a Generator replica on each node, each answering as
        # `latentrag train`'s evaluation did
        port = _free_ports(1)[0]
        url = f"http://127.0.0.1:{port}"
        cluster.serve_cli("deploy", str(_serve_config(tmp, first_ckpt, port)))
        replicas = _wait_running(cluster)["deployments"]["Generator"]["replicas"]
        where = {r["replica_id"]: r["node_id"] for r in replicas}
        assert len(where) == 2 and len(set(where.values())) == 2, replicas
        first = requests.get(f"{url}/healthz", timeout=30).json()["model_version"]
        assert first.startswith(f"step{STEPS}-")
        predictions = [json.loads(line) for line in first_predictions.splitlines()]
        seen = _generators_answer(url, predictions, first, {})
        assert {r: s["node_id"] for r, s in seen.items()} == where             # /v1/info agrees with Serve
        phase("serve deploy + both replicas answer")

        # 4. hot reload to the resumed checkpoint: both Generator replicas load it and answer as its evaluation did
        reload = _post(f"{url}/v1/admin/reload", {"checkpoint": str(out / "checkpoint")},
                       headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        new = reload["current"]["model_version"]
        assert reload["previous"]["model_version"] == first and new.startswith(f"step{MORE_STEPS}-")
        predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        after = _generators_answer(url, predictions, new, {r: s["requests"] for r, s in seen.items()})
        assert after.keys() == seen.keys()                                     # the same two replicas
        cluster.serve_cli("shutdown", "--yes")
        assert "latentrag" not in cluster.serve_details().get("applications", {})
        phase("reload + serve shutdown")
    finally:
        if cluster is not None:
            cluster.stop()
            left = [(p.pid, p.name()) for p in cluster.processes()]
        shutil.rmtree(tmp, ignore_errors=True)
        print("phases (s):", phases)
    assert not left, f"cluster processes left running: {left}"
