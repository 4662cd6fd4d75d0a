"""jobs.refresh.RefreshHook with two training ranks (two processes, gloo; no Ray): only rank 0 owns the refresher,
and when its build finishes every rank switches to the same new index version at the same step boundary."""
import json
import socket
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.index import MANIFEST_NAME

SWITCH_READY_AT = 5          # the fake build is reported done at the step boundary after step 4
STEPS = 8


class SlowBuilder:
    """Submitted at step 2 (schedule 2-3:1); done from step SWITCH_READY_AT on."""

    def __init__(self, root: Path):
        self.root, self.step = root, 0

    def submit(self, encoder_dir, step):
        return step

    def done(self, handle):
        return self.step >= SWITCH_READY_AT

    def result(self, handle):
        return {"version_dir": str(self.root / "v2"), "build_seconds": 1.0}


class Model:
    def __init__(self):
        self.index, self.passage_encoder, self.switches = "v1-index", {"w": 0}, []

    def set_index(self, index):
        self.switches.append((self.step, index))
        self.index = index


def _rank(rank: int, world: int, port: int, root: str, out: str) -> None:
    from jobs.refresh import RefreshHook
    from pipeline.refresh import IndexRefresher, parse_refresh_schedule

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    root = Path(root)
    builder = SlowBuilder(root)
    refresher = None
    if rank == 0:
        refresher = IndexRefresher(parse_refresh_schedule("2-3:1"), builder, root / "snapshots",
                                   save_fn=lambda enc, d: (d.mkdir(parents=True), (d / "w.json").write_text("{}")))
    hook = RefreshHook(refresher, root, rank, world, log=lambda msg: None,
                       open_index=lambda version_dir: f"opened {Path(version_dir).name} on rank {rank}")
    model = Model()
    targets = []
    for step in range(1, STEPS + 1):
        model.step = builder.step = step
        targets.append(hook(model, step))
    dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"switches": model.switches, "targets": targets,
                                                         "index": model.index, "hook_switches": hook.switches}))


def test_every_rank_switches_to_the_same_version_at_the_same_step(tmp_path):
    root = tmp_path / "index"
    for v in ("v1", "v2"):
        (root / v).mkdir(parents=True)
        (root / v / MANIFEST_NAME).write_text(json.dumps({"version": v}))
    (root / "current").write_text("v1\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(2, port, str(root), str(tmp_path)), nprocs=2, join=True)

    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    v2 = str(root / "v2")
    # rank 1 has no refresher: it learns of the new version only through rank 0's broadcast, at the same step
    assert r0["switches"] == [[SWITCH_READY_AT, "opened v2 on rank 0"]]
    assert r1["switches"] == [[SWITCH_READY_AT, "opened v2 on rank 1"]]
    assert r0["targets"] == r1["targets"] == [None] * (SWITCH_READY_AT - 1) + [v2] + [None] * (STEPS - SWITCH_READY_AT)
    assert r0["hook_switches"] == r1["hook_switches"] == 1
    assert (root / "current").read_text().strip() == "v2"          # rank 0 moved the `current` pointer
