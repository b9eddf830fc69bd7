"""Sweeps (archc.space.sweep) with cheap deterministic trainers (tests/sweep_trainers.py): one line
per model, resume after a kill or a cut-short line, local workers, refusing foreign results files,
user trainers, and bad input (one line, exit 2, no results file)."""

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
FAKE = "tests.sweep_trainers:fake"


@pytest.fixture(autouse=True)
def in_repository(monkeypatch):
    monkeypatch.chdir(ROOT)  # --trainer tests.sweep_trainers:... imports from here


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    path = tmp_path_factory.mktemp("samples") / "samples.jsonl"
    assert main(["space", "sample", str(ROOT / "spaces/anynetx_c.yaml"), "-n", "8", "--seed",
                 "3", "-o", str(path)]) == 0
    return path


def sweep(samples, results, *extra, trainer=FAKE):
    argv = ["space", "sweep", str(samples), "--data", "digits", "--epochs", "3", "-o",
            str(results)]
    return main(argv + (["--trainer", trainer] if trainer else []) + list(extra))


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def comparable(records):
    return {r["id"]: {k: v for k, v in r.items() if k != "seconds"} for r in records}


def test_one_line_per_model_and_a_rerun_does_nothing(samples, tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    assert sweep(samples, results) == 0
    first = lines(results)
    assert len(first) == 8 and len({r["id"] for r in first}) == 8
    record = first[0]
    assert {"id", "space", "index", "spec", "complexity", "parameters", "setup", "errors",
            "best_error", "seconds"} <= set(record)
    assert record["setup"]["trainer"] == FAKE and record["setup"]["epochs"] == 3
    assert record["best_error"] == min(record["errors"])
    capsys.readouterr()
    assert sweep(samples, results) == 0
    assert "8 of 8 models already" in capsys.readouterr().err
    assert lines(results) == first


def test_two_workers_give_the_same_results(samples, tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert sweep(samples, one) == 0
    assert sweep(samples, two, "--workers", "2") == 0
    assert comparable(lines(one)) == comparable(lines(two))


def test_a_cut_short_last_line_is_retrained(samples, tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    assert sweep(samples, results) == 0
    complete = results.read_text()
    kept = complete.splitlines(keepends=True)[:5]
    results.write_text("".join(kept) + complete.splitlines()[5][:40])  # killed mid-write
    capsys.readouterr()
    assert sweep(samples, results) == 0
    assert "5 of 8 models already" in capsys.readouterr().err
    assert comparable(lines(results)) == comparable([json.loads(x) for x in
                                                     complete.splitlines()])


def test_killed_sweep_resumes_with_the_missing_models(samples, tmp_path):
    results = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "archc", "space", "sweep", str(samples), "--data", "digits",
               "--epochs", "3", "-o", str(results), "--trainer", "tests.sweep_trainers:slow"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and (
            not results.exists() or results.read_text().count("\n") < 3):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = results.read_text().count("\n")
    assert 3 <= done < 8
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{done} of 8 models already in {results}, training {8 - done}" in rerun.stderr
    assert sorted(r["id"] for r in lines(results)) == [f"anynetx_c_{i:04d}" for i in range(8)]


def test_a_space_file_is_sampled_in_the_sweep(tmp_path, samples):
    results = tmp_path / "r.jsonl"
    argv = ["space", "sweep", str(ROOT / "spaces/anynetx_c.yaml"), "-n", "8", "--seed", "3",
            "--data", "digits", "--epochs", "3", "-o", str(results), "--trainer", FAKE]
    assert main(argv) == 0
    expected = tmp_path / "e.jsonl"
    assert sweep(samples, expected, "--seed", "3") == 0  # the training seed too
    assert comparable(lines(results)) == comparable(lines(expected))


def test_a_results_file_of_another_sweep_is_refused(samples, tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    assert sweep(samples, results) == 0
    before = results.read_bytes()
    capsys.readouterr()
    assert main(["space", "sweep", str(samples), "--data", "digits", "--epochs", "4", "-o",
                 str(results), "--trainer", FAKE]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {results}:line 1: ")
    assert "this run asks for" in err[-1]
    other = tmp_path / "other.jsonl"
    records = lines(results)
    records[2]["spec"]["num_classes"] = 7
    other.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert sweep(samples, other) == 2
    assert "trained from another spec" in capsys.readouterr().err
    assert results.read_bytes() == before


@pytest.mark.parametrize("content, phrase", [
    ('{"id": "a"}\nnot json\n{"id": "b"}\n', "line 2: not a JSON line"),
    ('[1, 2]\n', "line 1: not a JSON object"),
])
def test_an_unreadable_results_file_is_refused(samples, tmp_path, capsys, content, phrase):
    results = tmp_path / "results.jsonl"
    results.write_text(content)
    assert sweep(samples, results) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {results}:{phrase}" or phrase in err[-1], err
    assert results.read_text() == content


@pytest.mark.parametrize("trainer, phrase", [
    ("tests.sweep_trainers:no_metrics", "returned no best_error"),
    ("tests.sweep_trainers:broken", "RuntimeError: the user's trainer has a bug"),
    ("tests.no_such_module:train", "cannot import tests.no_such_module"),
    ("tests.sweep_trainers:absent", "has no function absent"),
    ("nocolon", "expected module:function"),
])
def test_user_trainer_errors(samples, tmp_path, capsys, trainer, phrase):
    results = tmp_path / "results.jsonl"
    assert sweep(samples, results, trainer=trainer) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and phrase in err[-1], err
    assert not results.exists() or results.read_text() == ""


@pytest.mark.parametrize("make, argv, phrase", [
    (None, ["--data", "no_such_dir"], "not a data set"),
    (lambda p: p.write_text('{"id": "a"}\n'), ["--data", "digits"], "line 1: a sample needs"),
    (lambda p: p.write_text(""), ["--data", "digits"], "no samples"),
    (None, ["--data", "digits", "-n", "3"], "-n and --set apply to a space file"),
])
def test_bad_sweep_input(samples, tmp_path, capsys, make, argv, phrase):
    source = samples
    if make is not None:
        source = tmp_path / "bad.jsonl"
        make(source)
    results = tmp_path / "results.jsonl"
    assert main(["space", "sweep", str(source), "--epochs", "1", "-o", str(results), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and phrase in err[0], err
    assert not results.exists()


def test_a_space_without_n(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    assert main(["space", "sweep", str(ROOT / "spaces/regnetx.yaml"), "--data", "digits",
                 "--epochs", "1", "-o", str(results)]) == 2
    assert "needs -n N" in capsys.readouterr().err
    assert not results.exists()


@pytest.mark.parametrize("argv, phrase", [
    (["--gpus-per-model", "1"], "reserve Ray resources per model: add --ray"),
    (["--cpus-per-model", "2", "--workers", "2"], "reserve Ray resources per model: add --ray"),
    (["--ray", "--device", "cuda"], "--device cuda with --ray needs --gpus-per-model"),
])
def test_ray_resources_without_ray_are_refused(samples, tmp_path, capsys, argv, phrase):
    results = tmp_path / "results.jsonl"
    assert sweep(samples, results, *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and phrase in err[0], err
    assert not results.exists()


def test_a_request_no_ray_node_meets_is_refused():
    from archc.errors import ArchcError
    from archc.space.sweep import check_capacity

    nodes = [{"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]  # a dead node counts not
    check_capacity(nodes, {"num_cpus": 4, "num_gpus": 0.5}, "local")
    with pytest.raises(ArchcError, match="--cpus-per-model 8: no node of the Ray cluster"):
        check_capacity(nodes, {"num_cpus": 8, "num_gpus": 0}, "local")
    with pytest.raises(ArchcError, match=r"--gpus-per-model 2: .* \(the largest has 1\)"):
        check_capacity(nodes, {"num_cpus": 1, "num_gpus": 2}, "local")


def test_the_builtin_and_a_user_trainer_get_the_same_settings(samples, tmp_path, monkeypatch):
    import archc.train
    from tests.sweep_trainers import placement

    options = ["--device", "cpu", "--precision", "bf16", "--batch-size", "32", "--ema", "0.9"]
    assert sweep(samples, tmp_path / "user.jsonl", *options,
                 trainer="tests.sweep_trainers:placement") == 0
    monkeypatch.setattr(archc.train, "train_spec", placement, raising=False)
    assert sweep(samples, tmp_path / "builtin.jsonl", *options, trainer=None) == 0
    user, builtin = lines(tmp_path / "user.jsonl"), lines(tmp_path / "builtin.jsonl")
    assert [r["config"] for r in user] == [r["config"] for r in builtin]
    assert user[0]["config"] == user[0]["setup"]["options"]
    assert (user[0]["config"]["device"], user[0]["config"]["precision"]) == ("cpu", "bf16")


def test_a_224_pixel_space_on_digits_is_warned_about(samples, tmp_path, capsys, monkeypatch):
    """The shipped spaces' 224x224 models with 1000 outputs, swept on 8x8 digits with the
    built-in trainer (faked here): two warnings, and the sweep goes on; a space sized for digits
    (32 px, 10 outputs) gets none."""
    import archc.train
    from tests.sweep_trainers import fake
    from tests.train.test_train import TINY

    monkeypatch.setattr(archc.train, "train_spec", fake, raising=False)
    assert sweep(samples, tmp_path / "big.jsonl", trainer=None) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("warning: ")]
    assert len(warnings) == 2, warnings
    assert "the model has 1000 outputs but digits has 10 classes" in warnings[0]
    assert warnings[0].endswith("; for a space: --set base.num_classes=10")
    assert ("the models read 224x224 images but the images of digits are 8x8: each is "
            "upscaled 28x" in warnings[1] and "--set base.input.size=32" in warnings[1])
    assert len(lines(tmp_path / "big.jsonl")) == 8
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps({"id": "tiny", "spec": {**TINY, "input": {"channels": 1,
                                                                          "size": 32}}}) + "\n")
    assert sweep(small, tmp_path / "results.jsonl", "--ema", "0.9", trainer=None) == 0
    assert "warning:" not in capsys.readouterr().err
