"""Long runs (archc.train.state, Trainer's save_every/metrics_jsonl, `archc train --save-every
--resume --metrics-jsonl`): a run interrupted after epoch 1 and resumed ends with exactly the
uninterrupted run's weights on the CPU; refusals of what is not a run state or belongs to
another run, each one line and exit 2."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from archc.backends.checkpoint import load_checkpoint
from archc.cli.main import main
from archc.errors import CheckpointError, TrainingError
from archc.train.loop import Plugin, TrainConfig, Trainer, _duration
from archc.train.state import first_difference, load_run_state, random_states, restore_random_states
from tests.train.test_train import TINY, digits, tiny_model, untimed  # noqa: F401 - fixture

CONFIG = TrainConfig(epochs=2, batch_size=64, lr=0.1, ema_decay=0.9, warmup_epochs=0.5)


class Interrupt(Exception):
    pass


class StopAt(Plugin):
    """Interrupts the run when epoch `epoch` starts (the state of the one before is saved)."""

    def __init__(self, epoch):
        self.epoch = epoch

    def epoch_start(self, trainer, epoch):
        if epoch == self.epoch:
            raise Interrupt


def assert_same_weights(a, b):
    left, right = a.state_dict(), b.state_dict()
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def test_a_resumed_run_equals_the_uninterrupted_one(digits, tmp_path):  # noqa: F811
    whole = Trainer(CONFIG, progress=False)
    full = whole.fit(tiny_model(), digits)
    state = tmp_path / "run.state.pt"
    with pytest.raises(Interrupt):
        Trainer(CONFIG, [StopAt(2)], progress=False, save_every=1, state_path=state).fit(
            tiny_model(), digits)
    saved = load_run_state(state, {"config": CONFIG.describe()})
    assert saved["epoch"] == 1 and len(saved["history"]) == 1
    torch.manual_seed(123)  # the resumed run must not depend on the caller's random state
    again = Trainer(CONFIG, progress=False)
    resumed = again.fit(tiny_model(seed=5), digits, resume=saved)
    assert_same_weights(full.model, resumed.model)  # the EMA model, which is kept
    assert_same_weights(whole.model, again.model)  # the raw model
    assert untimed(full.history) == untimed(resumed.history)


def test_the_last_epoch_is_always_saved_and_jsonl_has_one_line_per_epoch(digits, tmp_path):  # noqa: F811
    config = TrainConfig(epochs=3, batch_size=256, lr=0.1)
    state, lines = tmp_path / "s.pt", tmp_path / "m.jsonl"
    result = Trainer(config, progress=False, save_every=2, state_path=state,
                     metrics_jsonl=lines).fit(tiny_model(), digits)
    assert load_run_state(state, {"config": config.describe()})["epoch"] == 3
    records = [json.loads(line) for line in lines.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records == json.loads(json.dumps(result.history))
    for record in records:
        assert {"epoch", "train_loss", "val_error", "images_per_second", "seconds"} <= set(record)
        assert record["images_per_second"] > 0


@pytest.mark.parametrize("every, path", [(-1, "s.pt"), (2, None)])
def test_saving_needs_a_positive_period_and_a_path(every, path):
    with pytest.raises(TrainingError, match="save_every must be >= 0, with a state path"):
        Trainer(CONFIG, save_every=every, state_path=path)


def test_random_states_round_trip():
    states = random_states()
    drawn = torch.rand(3), np.random.rand(3), random.random()
    restore_random_states(states)
    assert torch.equal(torch.rand(3), drawn[0]) and np.array_equal(np.random.rand(3), drawn[1])
    assert random.random() == drawn[2]


def test_first_difference_names_the_field():
    saved = {"spec": {"stem": {"width": 8}}, "config": {"lr": 0.1, "device": "cuda:0"}}
    assert first_difference(saved, {"spec": {"stem": {"width": 8}},
                                    "config": {"lr": 0.1, "device": "cpu"}}) is None
    assert first_difference(saved, {"spec": {"stem": {"width": 16}}, "config": {"lr": 0.1}}) == (
        "spec.stem.width", 8, 16)
    assert first_difference({"a": [1, 2]}, {"a": [1, 3]}) == ("a[1]", 2, 3)
    assert first_difference({"a": 1}, {"a": 1, "b": 2}) == ("b", "(absent)", 2)


def test_durations():
    assert [_duration(s) for s in (0.4, 42, 185, 3720)] == ["0s", "42s", "3m05s", "1h02m"]


def train(tmp_path, *extra):
    spec = tmp_path / "tiny.json"
    if not spec.exists():
        spec.write_text(json.dumps(TINY))
    return main(["train", str(spec), "--data", "digits", "--epochs", "2", "--batch-size", "128",
                 "--device", "cpu", *extra])


def test_cli_resume_gives_the_uninterrupted_weights(tmp_path, capsys, monkeypatch):
    import archc.cli.compress as cli_compress

    assert train(tmp_path, "-o", str(tmp_path / "full.pt"), "--save-every", "1", "--progress",
                 "--metrics-jsonl", str(tmp_path / "full.jsonl")) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["run_state"] == str(tmp_path / "full.state.pt")
    assert "images/s, ETA " in out.err  # the progress line
    assert len((tmp_path / "full.jsonl").read_text().splitlines()) == 2
    plugins = cli_compress.train_plugins
    monkeypatch.setattr(cli_compress, "train_plugins", lambda args, spec: (
        lambda p, o, d: ([*p, StopAt(2)], o, d))(*plugins(args, spec)))
    assert train(tmp_path, "-o", str(tmp_path / "cut.pt"), "--save-every", "1") != 0
    monkeypatch.setattr(cli_compress, "train_plugins", plugins)
    assert torch.load(tmp_path / "cut.state.pt", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "cut.pt").exists()
    capsys.readouterr()
    assert train(tmp_path, "-o", str(tmp_path / "resumed.pt"), "--resume",
                 str(tmp_path / "cut.state.pt"), "--metrics-jsonl",
                 str(tmp_path / "resumed.jsonl")) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["resumed_from"] == str(tmp_path / "cut.state.pt")
    assert len(metrics["epochs"]) == 2
    assert_same_weights(load_checkpoint(tmp_path / "full.pt")[1],
                        load_checkpoint(tmp_path / "resumed.pt")[1])
    full = [json.loads(x) for x in (tmp_path / "full.jsonl").read_text().splitlines()]
    resumed = [json.loads(x) for x in (tmp_path / "resumed.jsonl").read_text().splitlines()]
    assert untimed(full) == untimed(resumed)


@pytest.mark.parametrize("state, extra, phrase", [
    ("MISSING", [], "no such run state"),
    ("GARBAGE", [], "not a training run state"),
    ("MODEL", [], "not a training run state (write one with --save-every"),
    ("STATE", ["--lr", "0.05"], "config.lr is 0.1 there, 0.05 here"),
    ("STATE", ["--epochs", "3"], "config.epochs is 1 there, 3 here"),
    ("STATE", ["--precision", "bf16"], "config.precision is 'fp32' there, 'bf16' here"),
    ("STATE", ["--slimming", "1e-4"], "compression.slimming is '(absent)' there"),
    ("OTHER", [], "spec.name is 'tiny' there, 'other' here"),
])
def test_cli_refuses_a_wrong_run_state(tmp_path, capsys, state, extra, phrase):
    spec = tmp_path / "tiny.json"
    spec.write_text(json.dumps(TINY))
    (tmp_path / "other.json").write_text(json.dumps({**TINY, "name": "other"}))
    base = ["train", str(spec), "--data", "digits", "--epochs", "1", "--batch-size", "256"]
    assert main([*base, "-o", str(tmp_path / "model.pt"), "--save-every", "1"]) == 0
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage")
    names = {"MISSING": "missing.pt", "GARBAGE": "garbage.pt", "MODEL": "model.pt",
             "STATE": "model.state.pt", "OTHER": "model.state.pt"}
    argv = [*base, "-o", str(tmp_path / "out.pt"), "--resume", str(tmp_path / names[state]),
            *extra]
    if state == "OTHER":
        argv[1] = str(tmp_path / "other.json")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and phrase in err[0], err
    assert not (tmp_path / "out.pt").exists()
    with pytest.raises(CheckpointError):
        load_run_state(tmp_path / names[state], {"nothing": "matches"})


class _Payload:
    """An object whose unpickling would run code: a run state must never load it."""

    def __reduce__(self):
        return (pytest.fail, ("a run state executed pickled code",))


def test_a_run_state_never_executes_pickled_code(tmp_path):
    path = tmp_path / "evil.state.pt"
    torch.save({"format": "archc-run-state", "payload": _Payload()}, path)
    with pytest.raises(CheckpointError, match="not a training run state"):
        load_run_state(path, {"config": CONFIG.describe()})
