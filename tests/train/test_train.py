"""Data sources and the shared training loop: the fixed digits split, .npz and class folders,
seeded reproducibility, the plugin API (loss terms, wrappers, epoch hooks, freezing), EMA,
`archc train` / `archc eval` (checkpoint and ONNX), and bad data: one line, exit 2, nothing
written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from archc.cli.main import main
from archc.errors import DataError, TrainingError
from archc.frontend.loading import spec_from_mapping
from archc.frontend.lower import build
from archc.train.data import load_data
from archc.train.loop import Plugin, TrainConfig, Trainer, evaluate

TINY = {"name": "tiny", "input": {"channels": 3, "size": 16}, "num_classes": 10,
        "stem": {"type": "simple", "width": 8},
        "body": {"type": "anynet", "stages": [{"block": "res_basic", "depth": 1, "width": 8},
                                              {"block": "res_basic", "depth": 1, "width": 16}]}}
FAST = TrainConfig(epochs=1, batch_size=128, lr=0.1)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", 3, 16)


def untimed(history):
    """Epoch metrics without the wall-clock ones."""
    return [{k: v for k, v in e.items() if k not in ("seconds", "images_per_second")}
            for e in history]


def tiny_model(seed=0):
    return build(spec_from_mapping(TINY), seed=seed)


def test_digits_split_is_fixed(digits):
    again = load_data("digits", 1, 8)
    assert (len(digits.train_y), len(digits.val_y), digits.classes) == (1437, 360, 10)
    assert np.array_equal(digits.val_y, again.val_y)
    assert digits.train_x.shape[1:] == (3, 16, 16) and again.train_x.shape[1:] == (1, 8, 8)
    from sklearn.datasets import load_digits

    raw = load_digits()
    order = np.random.Generator(np.random.PCG64(np.random.SeedSequence(0))).permutation(1797)
    assert np.array_equal(again.val_y, raw.target[order[1437:]])
    assert np.allclose(again.val_x[:, 0], raw.images[order[1437:]] / 16.0)


def test_npz_and_folders(tmp_path):
    x = np.random.default_rng(0).uniform(0, 1, (30, 1, 8, 8)).astype(np.float32)
    y = np.arange(30) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_data(str(tmp_path / "d.npz"), 3, 12)
    assert (len(data.train_y), len(data.val_y), data.classes) == (24, 6, 3)
    assert data.train_x.shape[1:] == (3, 12, 12)
    np.savez(tmp_path / "v.npz", x=x, y=y, x_val=x[:5], y_val=y[:5])
    assert len(load_data(str(tmp_path / "v.npz"), 1, 8).val_y) == 5
    from PIL import Image

    for split in ("train", "val"):
        for name, value in (("cat", 40), ("dog", 200)):
            folder = tmp_path / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (10, 14), (value, value + i, 0)).save(folder / f"{i}.png")
    images = load_data(str(tmp_path / "images"), 3, 8)
    assert (len(images.train_y), len(images.val_y), images.classes) == (6, 6, 2)
    assert images.train_x.shape[1:] == (3, 8, 8)
    # red 40 through the evaluation transform, normalised by ImageNet's red mean and std
    assert images.train_x[0, 0, 0, 0] == pytest.approx((40 / 255 - 0.485) / 0.229, abs=0.01)


@pytest.mark.parametrize("make, phrase", [
    (lambda p: None, "not a data set"),
    (lambda p: np.savez(p / "d.npz", x=np.zeros((4, 1, 8, 8))), "no array 'y'"),
    (lambda p: np.savez(p / "d.npz", x=np.zeros((4, 8, 8)), y=np.zeros(4, int)), "(N, C, H, W)"),
    (lambda p: np.savez(p / "d.npz", x=np.zeros((4, 2, 8, 8)), y=np.zeros(4, int)),
     "2 channels"),
    (lambda p: np.savez(p / "d.npz", x=np.full((4, 1, 8, 8), np.nan), y=np.zeros(4, int)),
     "NaN"),
    (lambda p: (p / "d.npz").write_bytes(b"not a zip"), "cannot read"),
])
def test_bad_data_is_a_data_error(tmp_path, make, phrase):
    make(tmp_path)
    source = str(tmp_path / "d.npz") if (tmp_path / "d.npz").exists() else str(tmp_path / "x")
    with pytest.raises(DataError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        load_data(source, 3, 8)


def test_training_is_seeded_and_learns(digits):
    config = TrainConfig(epochs=2, batch_size=64, lr=0.1)
    first = Trainer(config, progress=False).fit(tiny_model(), digits)
    second = Trainer(config, progress=False).fit(tiny_model(), digits)
    assert untimed(first.history) == untimed(second.history)
    assert first.errors[-1] < 50  # chance is 90%: it learns on held-out images
    assert evaluate(first.model, digits.val_x, digits.val_y)["error"] == first.errors[-1]
    other = Trainer(TrainConfig(epochs=2, batch_size=64, lr=0.1, seed=1),
                    progress=False).fit(tiny_model(1), digits)
    assert other.history[0]["train_loss"] != first.history[0]["train_loss"]


class Recorder(Plugin):
    """A plugin using every extension point: an L1 term on BN scales, a wrapper, epoch hooks."""

    def __init__(self):
        self.calls, self.wrapped = [], None

    def wrap(self, model):
        self.wrapped = model
        return model

    def loss(self, step):
        self.calls.append(("loss", step.epoch, step.step, tuple(step.logits.shape)))
        scales = [m.weight for m in step.model.modules() if isinstance(m, nn.BatchNorm2d)]
        return 1e-3 * sum(s.abs().sum() for s in scales)

    def epoch_start(self, trainer, epoch):
        self.calls.append(("start", epoch))

    def epoch_end(self, trainer, epoch, metrics):
        self.calls.append(("end", epoch, metrics["val_error"]))


def test_plugins_see_every_step(digits):
    recorder = Recorder()
    model = tiny_model()
    plain = Trainer(FAST, progress=False).fit(tiny_model(), digits)
    result = Trainer(FAST, plugins=[recorder], progress=False).fit(model, digits)
    assert recorder.wrapped is model
    steps = [c for c in recorder.calls if c[0] == "loss"]
    assert len(steps) == 12 and steps[0] == ("loss", 1, 0, (128, 10))
    assert recorder.calls[0] == ("start", 1) and recorder.calls[-1][0:2] == ("end", 1)
    assert result.history[0]["train_loss"] != plain.history[0]["train_loss"]


def test_freezing_keeps_parameters_and_bn_statistics(digits):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(epochs=1, batch_size=128, freeze=("stem.*", "head.fc.*"))
    Trainer(config, progress=False).fit(model, digits)
    after = model.state_dict()
    for key in ("stem.conv.weight", "stem.bn.weight", "stem.bn.running_mean", "head.fc.bias"):
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["s1.b1.f.a.conv.weight"], after["s1.b1.f.a.conv.weight"])
    with pytest.raises(TrainingError, match="every parameter is frozen"):
        Trainer(TrainConfig(freeze=("*",)), progress=False).fit(tiny_model(), digits)


def test_ema_is_reported_and_kept(digits):
    result = Trainer(TrainConfig(epochs=1, batch_size=128, ema_decay=0.9), progress=False).fit(
        tiny_model(), digits)
    assert "ema_val_error" in result.history[0]
    assert result.errors == [result.history[0]["ema_val_error"]]
    assert evaluate(result.model, digits.val_x, digits.val_y)["error"] == result.errors[0]


def test_divergence_is_a_training_error(digits):
    with pytest.raises(TrainingError, match="diverged"):
        Trainer(TrainConfig(epochs=1, lr=1e9, batch_size=128), progress=False).fit(
            tiny_model(), digits)


def test_train_then_eval_checkpoint_and_onnx(tmp_path, capsys):
    spec = tmp_path / "tiny.json"
    spec.write_text(json.dumps(TINY))
    ckpt = tmp_path / "tiny.pt"
    assert main(["train", str(spec), "--data", "digits", "--epochs", "1", "--batch-size", "128",
                 "-o", str(ckpt), "--metrics", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr()
    metrics = json.loads(out.out)
    assert metrics == json.loads((tmp_path / "m.json").read_text())
    assert metrics["val_size"] == 360 and len(metrics["errors"]) == 1
    assert "validation error" in out.err
    assert main(["eval", str(ckpt), "--data", "digits", "--predictions",
                 str(tmp_path / "ckpt.json")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["error"] == pytest.approx(metrics["final_error"])
    # the counts and the 95% Wilson interval behind the accuracy, and every example's top-1
    assert evaluated["samples"] == 360
    assert evaluated["accuracy"] == pytest.approx(100 * evaluated["correct"] / 360)
    low, high = evaluated["accuracy_interval_95"]
    assert 0 <= low < evaluated["accuracy"] < high <= 100
    by_ckpt = json.loads((tmp_path / "ckpt.json").read_text())
    assert len(by_ckpt["labels"]) == len(by_ckpt["predictions"]) == 360
    assert sum(a == b for a, b in zip(by_ckpt["labels"], by_ckpt["predictions"],
                                      strict=True)) == evaluated["correct"]
    onnx = tmp_path / "tiny.onnx"
    assert main(["fuse", str(ckpt), "-o", str(onnx)]) == 0
    capsys.readouterr()
    assert main(["eval", str(onnx), "--data", "digits", "--predictions",
                 str(tmp_path / "onnx.json")]) == 0
    assert json.loads(capsys.readouterr().out)["error"] == pytest.approx(metrics["final_error"])
    by_onnx = json.loads((tmp_path / "onnx.json").read_text())
    assert by_onnx["labels"] == by_ckpt["labels"]  # the same examples in the same order
    # the fused ONNX model against the checkpoint, image by image: the same function
    assert main(["eval", str(onnx), "--data", "digits", "--against",
                 str(tmp_path / "ckpt.json")]) == 0
    against = json.loads(capsys.readouterr().out)["against"]
    assert (against["n"], against["correct_a"]) == (360, evaluated["correct"])
    assert against["only_a"] == against["only_b"] == 0 and against["p_value"] == 1.0
    assert against["verdict"] == "no detectable difference at n = 360 (p = 1)"
    # a predictions file of other examples (here: the labels reordered) is refused
    by_ckpt["labels"] = by_ckpt["labels"][::-1]
    (tmp_path / "other.json").write_text(json.dumps(by_ckpt))
    assert main(["eval", str(onnx), "--data", "digits", "--against",
                 str(tmp_path / "other.json")]) == 2
    assert "labels are not this data's 360 validation labels" in capsys.readouterr().err
    assert main(["train", str(ckpt), "--data", "digits", "--epochs", "1", "--batch-size", "128",
                 "-o", str(tmp_path / "again.pt")]) == 0  # fine-tuning a checkpoint
    assert (tmp_path / "again.pt").exists()


@pytest.mark.parametrize("argv, phrase", [
    (["train", "SPEC", "--data", "nowhere.npz", "-o", "OUT"], "nowhere.npz: no such file"),
    (["train", "SPEC", "--data", "BADNPZ", "-o", "OUT"], "no array 'y'"),
    (["train", "WIDE", "--data", "digits", "-o", "OUT"], "has 10 classes"),
    (["eval", "NOTONNX", "--data", "digits"], "cannot load the ONNX model"),
    (["eval", "SPEC", "--data", "digits"], "give a trained checkpoint"),
    (["eval", "SPEC", "--data", "digits", "--against", "nowhere.json"], "cannot read it"),
    (["eval", "SPEC", "--data", "digits", "--against", "SPEC"], "not a predictions file"),
    (["eval", "SPEC", "--data", "digits", "--against", "UNEVEN"], "lists of one length"),
])
def test_bad_training_input_one_line_exit_2(tmp_path, capsys, argv, phrase):
    (tmp_path / "s.json").write_text(json.dumps(TINY))
    (tmp_path / "w.json").write_text(json.dumps({**TINY, "num_classes": 5}))
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 3, 16, 16)))
    (tmp_path / "m.onnx").write_bytes(b"garbage")
    (tmp_path / "uneven.json").write_text(json.dumps({"labels": [1, 2], "predictions": [1]}))
    names = {"SPEC": "s.json", "WIDE": "w.json", "OUT": "out.pt", "BADNPZ": "bad.npz",
             "NOTONNX": "m.onnx", "nowhere.npz": "nowhere.npz", "nowhere.json": "nowhere.json",
             "UNEVEN": "uneven.json"}
    argv = [str(tmp_path / names[a]) if a in names else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and phrase in err[-1], err
    assert not (tmp_path / "out.pt").exists()
