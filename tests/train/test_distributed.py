"""Several processes training one model (archc.train.distributed, `torchrun -m archc train`):
the sharding of every global batch (property test), torchrun's environment, the refusals, and
the acceptance test: two gloo processes on the CPU give one process's loss curve."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from archc.errors import DeviceError, TrainingError
from archc.train.data import batch_indices, val_share
from archc.train.distributed import Ranks, check_batches, device_for, from_environment
from tests.train.test_train import TINY, untimed


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), batch=st.integers(1, 70), ranks=st.integers(1, 8),
       seed=st.integers(0, 2**32 - 1))
def test_the_processes_pieces_make_up_one_process_batches(n, batch, ranks, seed):
    order = np.random.default_rng(seed).permutation(n)
    whole = batch_indices(order, batch)
    pieces = [batch_indices(order, batch, rank, ranks) for rank in range(ranks)]
    assert all(len(p) == len(whole) for p in pieces)  # every process takes every step
    for step, expected in enumerate(whole):
        parts = [p[step] for p in pieces]
        assert np.array_equal(np.concatenate(parts), expected)  # disjoint, complete, in order
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    shares = [val_share(n, rank, ranks) for rank in range(ranks)]
    assert np.array_equal(np.concatenate(shares), np.arange(n))


def test_torchrun_environment():
    assert from_environment({}) is None
    assert from_environment({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}) is None
    ranks = from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert ranks == Ranks(3, 4, 1) and not ranks.main
    with pytest.raises(TrainingError, match="torchrun's environment is incomplete"):
        from_environment({"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(TrainingError, match="must lie in 0..WORLD_SIZE-1"):
        from_environment({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_batches_that_cannot_be_split_are_refused():
    check_batches(1437, 64, 2)  # 22 batches of 64 and one of 29
    with pytest.raises(TrainingError, match="a batch of 1 examples cannot be split over 2"):
        check_batches(1437, 1436, 2)
    with pytest.raises(TrainingError, match="a batch of 2 examples cannot be split over 4"):
        check_batches(100, 2, 4)


def test_devices_under_torchrun(monkeypatch):
    ranks = Ranks(1, 2, 1)
    assert device_for(ranks, "cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with pytest.raises(DeviceError, match="no process-group backend for MPS"):
        device_for(ranks, "mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(DeviceError, match="each process trains on cuda:LOCAL_RANK"):
        device_for(Ranks(0, 2, 0), "cuda:0")
    with pytest.raises(DeviceError, match="LOCAL_RANK 1: this machine has 1 CUDA devices"):
        device_for(ranks, "cuda")


def epochs(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_gloo_processes_give_one_process_loss_curve(tmp_path, capsys, monkeypatch):
    """The acceptance test, with a resume: a one-process run of 3 epochs is stopped after epoch
    1 and resumed by `torchrun --nproc-per-node 2` (gloo, CPU), whose epochs 2 and 3 must give
    the uninterrupted one-process run's losses and errors. BN is frozen (eval mode, `--freeze
    '*.bn.*'`) so that the model treats every example on its own: then sharding the global
    batch, weighting the uneven last batch and averaging the gradients give one process's run
    up to float32 summation order, while a wrong shard, a missing reduction or a summed gradient
    would not. One launch (three processes importing torch): about 10 s on 2 idle cores."""
    import archc.cli.compress as cli_compress
    from archc.cli.main import main
    from tests.train.test_resume import StopAt

    spec = tmp_path / "tiny.json"
    spec.write_text(json.dumps(TINY))
    options = ["--data", "digits", "--epochs", "3", "--batch-size", "64", "--lr", "0.5",
               "--weight-decay", "0", "--device", "cpu", "--freeze", "*.bn.*"]
    assert main(["train", str(spec), *options, "-o", str(tmp_path / "one.pt"),
                 "--metrics-jsonl", str(tmp_path / "one.jsonl")]) == 0
    plugins = cli_compress.train_plugins
    monkeypatch.setattr(cli_compress, "train_plugins", lambda args, spec: (
        lambda p, o, d: ([*p, StopAt(2)], o, d))(*plugins(args, spec)))
    assert main(["train", str(spec), *options, "-o", str(tmp_path / "cut.pt"),
                 "--save-every", "1"]) != 0
    capsys.readouterr()
    one = epochs(tmp_path / "one.jsonl")
    assert one[2]["train_loss"] < one[0]["train_loss"] - 0.5  # the model learns

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "archc", "train", str(spec), *options,
               "-o", str(tmp_path / "two.pt"), "--metrics-jsonl", str(tmp_path / "two.jsonl"),
               "--save-every", "1", "--resume", str(tmp_path / "cut.state.pt")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads(run.stdout)  # rank 0 alone prints: one JSON document
    assert "2 processes share every batch of 64" in run.stderr
    assert run.stderr.count("epoch 3: train loss") == 1
    for two in (epochs(tmp_path / "two.jsonl"), metrics["epochs"]):
        assert untimed(two[:1]) == untimed(one[:1])  # epoch 1 is the stopped run's
        assert [e["images"] for e in two] == [1437] * 3  # each example once per epoch
        for single, shared in zip(one[1:], two[1:]):
            for key in ("train_loss", "val_loss"):
                assert shared[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key
            assert shared["val_error"] == single["val_error"]
    assert torch.load(tmp_path / "two.state.pt", weights_only=True)["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # written once, by rank 0
        "cut.state.pt", "one.jsonl", "one.pt", "tiny.json", "two.jsonl", "two.pt",
        "two.state.pt"]


@pytest.mark.parametrize("kind", ["arrays", "folder"])
def test_each_data_kind_hands_out_the_pieces(tmp_path, kind):
    """Digits in memory and a streamed folder (2 loader workers): the processes' pieces of every
    training batch, and their validation shares, are one process's batches, with augmentation."""
    from archc.train.data import open_data
    from tests.train.test_streaming import make_folder

    if kind == "arrays":
        data = open_data("digits", 1, 8)
    else:
        data = open_data(str(make_folder(tmp_path / "images", per_class=9)), 3, 8, "basic", 2)
    # one loader at a time (each with its own worker processes), then compared
    whole_run, *piece_runs = (list(data.train_batches(7, 3, 2, *share))
                              for share in ((), (0, 2), (1, 2)))
    for whole, *pieces in zip(whole_run, *piece_runs, strict=True):
        for index in (0, 1):  # inputs, targets
            assert torch.equal(torch.cat([p[index] for p in pieces]), whole[index])
    val = [torch.cat([b[1] for b in data.val_batches(5, rank, 3)]) for rank in range(3)]
    assert torch.equal(torch.cat(val), torch.cat([b[1] for b in data.val_batches(5)]))
