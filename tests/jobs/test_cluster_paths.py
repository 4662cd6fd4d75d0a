"""Paths on a cluster: inputs given as URIs (read through pyarrow.fs; tested with file:// since no store is
reachable), outputs that must be shared paths, errors that name the file and the node, and the per-node check
that runs before training (tests/jobs/test_multinode.py runs it on two real nodes)."""
import json

import pyarrow as pa
import pytest

from jobs.encode import _read_row_groups
from jobs.ray_env import check_paths_on_nodes, error_message
from jobs.train import main as train_main
from pipeline.storage import fetch_input, is_uri, shared_path
from pipeline.synthetic import generate_knowledge_base, write_knowledge_base


def test_fetch_input_copies_files_and_directories_through_pyarrow_fs(tmp_path):
    src = tmp_path / "store" / "qa"
    (src / "sub").mkdir(parents=True)
    (src / "train.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    (src / "sub" / "more.jsonl").write_text("{}\n")
    copy = fetch_input(src.as_uri(), tmp_path / "cache")
    assert copy != src and copy.name == "qa"
    assert (copy / "train.jsonl").read_text() == (src / "train.jsonl").read_text()
    assert (copy / "sub" / "more.jsonl").read_text() == "{}\n"
    one = fetch_input((src / "train.jsonl").as_uri(), tmp_path / "cache")
    assert one.name == "train.jsonl" and one.read_text() == (src / "train.jsonl").read_text()
    assert fetch_input(str(src), tmp_path / "cache") == src          # a plain path is used where it is
    with pytest.raises(FileNotFoundError, match="file:///.*nothere.jsonl: not found"):
        fetch_input((tmp_path / "nothere.jsonl").as_uri(), tmp_path / "cache")


def test_shared_path_takes_paths_and_file_uris_and_refuses_object_stores():
    assert not is_uri("runs/x") and not is_uri("/data/x") and is_uri("s3://bucket/x") and is_uri("file:///x")
    assert str(shared_path("file:///shared/run")) == "/shared/run"
    assert str(shared_path("runs/x")) == "runs/x"
    with pytest.raises(ValueError, match="s3://bucket/run: .*path every node sees"):
        shared_path("s3://bucket/run")


def _kb(tmp_path):
    return write_knowledge_base(generate_knowledge_base(seed=0, num_entities=12), tmp_path / "kb")


def test_train_reads_corpus_and_qa_from_uris(tmp_path, capsys):
    """The corpus and QA files are read through pyarrow.fs: the passage count checked against train.k comes
    from the file:// corpus (the check refuses before anything is written or Ray starts)."""
    files = _kb(tmp_path)
    count = len(generate_knowledge_base(seed=0, num_entities=12).passages)
    out = tmp_path / "run"
    uri = (tmp_path / "kb" / "corpus.jsonl").as_uri()
    rc = train_main(["--corpus", uri, "--train-qa", (tmp_path / "kb" / "train.jsonl").as_uri(),
                     "--eval-qa", files["test"], "--output-dir", str(out), "--set", "train.k=1000"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"train.k=1000: more passages per question than the corpus {uri} holds ({count})" in err
    assert not out.exists()


def test_train_refuses_an_object_store_output_dir_and_a_missing_uri(tmp_path, capsys):
    files = _kb(tmp_path)
    rc = train_main(["--corpus", files["corpus"], "--train-qa", files["train"], "--eval-qa", files["test"],
                     "--output-dir", "gs://bucket/run"])
    assert rc == 2 and "gs://bucket/run: " in capsys.readouterr().err
    missing = (tmp_path / "kb" / "missing.jsonl").as_uri()
    rc = train_main(["--corpus", files["corpus"], "--train-qa", missing, "--eval-qa", files["test"],
                     "--output-dir", str(tmp_path / "run")])
    assert rc == 2 and f"{missing}: not found" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_read_task_that_cannot_open_its_shard_names_the_file_and_the_node(tmp_path):
    path = str(tmp_path / "passages-00000.parquet")
    items = pa.table({"file": [path], "row_group": [0], "rows_per_read": [10]})
    with pytest.raises(FileNotFoundError, match=f"{path}: not readable on node .*shared filesystem"):
        list(_read_row_groups(items, ["id", "text"]))


@pytest.mark.ray
def test_path_check_names_node_and_path_and_a_task_error_prints_its_own_message(ray_local, tmp_path):
    ray = ray_local
    here = tmp_path / "seen"
    here.mkdir()
    assert check_paths_on_nodes({"the output dir": here}, include_this_node=True) == 1
    assert check_paths_on_nodes({"the output dir": here}) == 0          # one node, the driver's: nothing to ask
    gone = tmp_path / "gone"
    with pytest.raises(FileNotFoundError, match=rf"node .* \(id [0-9a-f]{{12}}\) cannot see the index {gone}"):
        check_paths_on_nodes({"the output dir": here, "the index": gone}, include_this_node=True)

    @ray.remote(num_cpus=0)
    def fails():
        raise FileNotFoundError(json.dumps({"file": "x.parquet"}))

    with pytest.raises(FileNotFoundError) as info:
        ray.get(fails.remote())
    assert error_message(info.value) == '{"file": "x.parquet"}'              # not the remote traceback


@pytest.mark.ray
def test_train_workers_that_no_node_can_place_are_refused_with_the_numbers(ray_local):
    from jobs.train import check_train_resources
    from pipeline.config import ConfigError, load_config

    cpus = int(ray_local.cluster_resources()["CPU"])        # the shared local Ray: one node
    check_train_resources(load_config(None, [f"train.num_workers={cpus}", "train.cpus_per_worker=1"]))
    too_many = load_config(None, [f"train.num_workers={cpus + 1}", "train.cpus_per_worker=1"])
    with pytest.raises(ConfigError, match=rf"train.num_workers={cpus + 1} workers of CPU 1 each .* its 1 node\(s\) "
                                          rf"have \[CPU {cpus}\] and hold {cpus};"):
        check_train_resources(too_many)
    with pytest.raises(ConfigError, match=r"workers of CPU 1, GPU 1 each .*have \[CPU \d+, GPU 0\] and hold 0"):
        check_train_resources(load_config(None, ["train.use_gpu=true"]))
    # an autoscaling cluster starts nodes on demand: waiting is what the user asked for
    check_train_resources(load_config(None, [f"train.num_workers={cpus + 1}", "train.wait_for_resources=true"]))
