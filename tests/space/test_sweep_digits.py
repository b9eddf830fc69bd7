"""The sweep acceptance test: 16 RegNetX samples trained on digits (input 32, 2 epochs) give
the same results in one process (killed halfway, then resumed), in two worker processes and as
tasks on a local Ray with 2 CPUs started here. Slow (about a minute on 2 cores); the only module
that starts Ray. Also on a local Ray: each task gets the resources `--cpus-per-model` asks for
(about 20 s on a loaded machine)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from archc.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
SMALL_REGNETX = ["--set", "base.input.size=32", "--set", "base.num_classes=10",
                 "--set", "parameters[body.depth].high=14",
                 "--set", "window.flops=[300000,1000000]", "--set", "window.params=null",
                 "--set", "window.acts=null"]  # RegNetX with d <= 14: tiny models at 32x32


def comparable(path: Path) -> dict:
    records = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        record.pop("seconds")
        for epoch in record["epochs"]:
            epoch.pop("seconds")
            epoch.pop("images_per_second")
        records[record["id"]] = record
    return records


@pytest.mark.slow
def test_workers_ray_and_resume_agree(tmp_path):
    samples = tmp_path / "samples.jsonl"
    assert main(["space", "sample", str(ROOT / "spaces/regnetx.yaml"), "-n", "16", "--seed", "1",
                 "-o", str(samples), *SMALL_REGNETX]) == 0
    train = ["--data", "digits", "--epochs", "2", "--batch-size", "256"]

    killed = tmp_path / "killed.jsonl"
    command = [sys.executable, "-m", "archc", "space", "sweep", str(samples), *train,
               "-o", str(killed)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and (not killed.exists()
                                      or killed.read_text().count("\n") < 6):
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = killed.read_text().count("\n")
    assert 6 <= done < 16
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{done} of 16 models already in {killed}, training {16 - done}" in rerun.stderr
    reference = comparable(killed)
    assert len(reference) == 16 and len(killed.read_text().splitlines()) == 16

    two = tmp_path / "two.jsonl"
    assert main(["space", "sweep", str(samples), *train, "-o", str(two), "--workers", "2"]) == 0
    assert comparable(two) == reference

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = tmp_path / "ray.jsonl"
        assert main(["space", "sweep", str(samples), *train, "-o", str(on_ray), "--ray"]) == 0
    finally:
        ray.shutdown()
    assert comparable(on_ray) == reference
    assert len({r["best_error"] for r in reference.values()}) > 1  # models really differ


@pytest.mark.slow
def test_ray_tasks_get_the_resources_asked_for(tmp_path, capsys, monkeypatch):
    """On a local Ray of 2 CPUs: `--cpus-per-model 2` reserves both for each model (Ray's own
    record of the task), `--device auto` reaches a task without a GPU as `cpu`, and a GPU
    request this Ray cannot meet is refused before any task waits for ever."""
    import ray

    monkeypatch.chdir(ROOT)  # the trainer module is imported from the repository
    samples = tmp_path / "samples.jsonl"
    assert main(["space", "sample", str(ROOT / "spaces/regnetx.yaml"), "-n", "2", "--seed", "1",
                 "-o", str(samples), *SMALL_REGNETX]) == 0
    sweep = ["space", "sweep", str(samples), "--data", "digits", "--epochs", "1", "--ray",
             "--trainer", "tests.sweep_trainers:placement", "--device", "auto"]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results = tmp_path / "ray.jsonl"
        assert main([*sweep, "-o", str(results), "--cpus-per-model", "2"]) == 0
        capsys.readouterr()
        assert main([*sweep, "-o", str(tmp_path / "gpu.jsonl"), "--gpus-per-model", "1"]) == 2
    finally:
        ray.shutdown()
    err = capsys.readouterr().err.strip().splitlines()
    assert "--gpus-per-model 1: no node of the Ray cluster (local) has 1 GPUs" in err[-1]
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["resources"] for r in records] == [{"CPU": 2.0}] * 2
    assert {r["config"]["device"] for r in records} == {"cpu"}
    assert {r["setup"]["options"]["device"] for r in records} == {"auto"}  # recorded as typed
