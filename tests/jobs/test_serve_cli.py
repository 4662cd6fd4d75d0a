"""`latentrag serve` reads configs/serve.yaml and refuses bad input before starting Ray (no Ray here)."""
from jobs.serve import DEFAULT_CONFIG, load_serve_config, main


def test_reads_the_serve_config():
    cfg = load_serve_config(DEFAULT_CONFIG)
    assert cfg["name"] == "latentrag" and cfg["route_prefix"] == "/"
    assert cfg["args"]["max_batch_size"] >= 1
    assert set(cfg["deployments"]) == {"Ingress", "Retriever", "Generator"}
    assert "autoscaling_config" in cfg["deployments"]["Generator"] and "name" not in cfg["deployments"]["Generator"]
    assert cfg["http_options"]["port"] == 8000


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path), "--set", "max_batch_size"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path), "--set", "max_batch_size=0"]) == 2
    assert "max_batch_size" in capsys.readouterr().err
