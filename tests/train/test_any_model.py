"""`archc train` / `archc eval` on models archc did not build (archc/backends/trainable.py): a
torch.export program of a torchvision-style ResNet (tests/wild/prunable.py) pruned with
`archc prune --macs 0.5` and fine-tuned back, its BatchNorms training, written back as a program
with a dynamic batch; a trusted pickled module written back pickled; and one line, exit 2, for
every model or output these commands refuse."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from archc.backends.trainable import PICKLED, PROGRAM, load_trainable
from archc.cli.main import main
from archc.ir.init import random_input, randomize
from tests.train.test_train import TINY
from tests.wild.prunable import BasicBlock, ResNet

SHAPE = (2, 3, 16, 16)  # digits, resized to the program's 16x16


def _resnet() -> nn.Module:
    return randomize(ResNet(BasicBlock, (1, 1, 1)), 0,
                     calibration_input=random_input((4, *SHAPE[1:]), 1)).eval()


def _export(model: nn.Module, path, shape=SHAPE) -> None:
    torch.export.save(torch.export.export(model, (random_input(shape, 0),)), str(path))


def _run(capsys, *argv) -> dict:
    code = main([*argv, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def _bn_means(path) -> dict:
    module = load_trainable(path).module
    return {name: m.running_mean.clone() for name, m in module.named_modules()
            if isinstance(m, nn.BatchNorm2d)}


class _Features(nn.Module):
    """A backbone without a classifier: [N, C, H, W] out."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


class _TwoHeads(_Features):
    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        return y, y * 2


class _FixedBatch(_Features):
    def forward(self, x):
        return self.conv(x).mean((2, 3)).expand(2, 4)  # the batch of 2 it was exported at


class _Tiny(_Features):
    def __init__(self, classes=10):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


@pytest.mark.slow  # the acceptance flow: 3 short trainings (~15 s CPU), 4 program loads
def test_library_resnet_program_pruned_then_fine_tuned(tmp_path, capsys):
    source, trained = tmp_path / "resnet.pt2", tmp_path / "trained.pt2"
    pruned, tuned = tmp_path / "pruned.pt2", tmp_path / "tuned.pt2"
    _export(_resnet(), source)
    common = ["--data", "digits", "--batch-size", "64", "--lr", "0.05"]
    metrics = _run(capsys, "train", str(source), "-o", str(trained), "--epochs", "2", *common)
    assert metrics["kind"] == PROGRAM and metrics["checkpoint"] == str(trained)
    full = _run(capsys, "eval", str(trained), "--data", "digits")["accuracy"]
    assert full == pytest.approx(100 - metrics["final_error"])  # the same split, same model
    report = _run(capsys, "prune", str(trained), "--macs", "0.5", "-o", str(pruned))
    assert report["macs"][1] <= 0.5 * report["macs"][0]
    cut = _run(capsys, "eval", str(pruned), "--data", "digits")["accuracy"]
    tune = _run(capsys, "train", str(pruned), "-o", str(tuned), "--epochs", "1", *common)
    after = _run(capsys, "eval", str(tuned), "--data", "digits")["accuracy"]
    assert after == pytest.approx(100 - tune["final_error"])
    assert after > cut + 5  # fine-tuning recovers what pruning lost
    # the BatchNorms trained: their running statistics moved
    before_means, after_means = _bn_means(pruned), _bn_means(tuned)
    assert before_means.keys() == after_means.keys() and len(after_means) == 9
    assert "bn1" in after_means and "layer1.0.bn1" in after_means  # the source names
    assert all(not torch.equal(before_means[k], after_means[k]) for k in after_means)
    # the output is a program again, with the pruned widths and a dynamic batch
    program = torch.export.load(str(tuned)).module()
    for batch in (1, 5):
        assert program(random_input((batch, *SHAPE[1:]), 2)).shape == (batch, 10)
    assert _run(capsys, "info", str(tuned))["flops"] == report["macs"][1]
    print(f"digits 360 validation images: trained {full:.2f}%, pruned to "
          f"{report['macs'][1] / report['macs'][0]:.2f} of the MACs {cut:.2f}%, fine-tuned "
          f"1 epoch {after:.2f}%")


def _tiny() -> nn.Module:
    return randomize(_Tiny(), 0, calibration_input=random_input((4, *SHAPE[1:]), 1)).eval()


def test_pickled_module_is_fine_tuned_and_written_back_pickled(tmp_path, capsys):
    source, tuned = tmp_path / "tiny.pth", tmp_path / "tuned.pt"
    model = _tiny()
    torch.save(model, source)
    # its own teacher: a pickled teacher is read at the student's input (it records none)
    metrics = _run(capsys, "train", str(source), "--trust-pickle", "--input-shape", "1,3,16,16",
                   "--data", "digits", "--epochs", "1", "--batch-size", "128", "-o", str(tuned),
                   "--teacher", str(source))
    assert metrics["kind"] == PICKLED and metrics["compression"]["teacher"] == str(source)
    back = torch.load(tuned, weights_only=False)
    assert type(back) is type(model)  # the user's own class, not a trace
    assert not torch.equal(back.conv.weight, model.conv.weight)
    assert not torch.equal(back.bn.running_mean, model.bn.running_mean)  # BN trained
    accuracy = _run(capsys, "eval", str(tuned), "--trust-pickle", "--input-shape", "1,3,16,16",
                    "--data", "digits")["accuracy"]
    assert accuracy == pytest.approx(100 - metrics["final_error"])


def test_program_resumes_from_its_run_state(tmp_path, capsys):
    source = tmp_path / "tiny.pt2"
    _export(_tiny(), source)
    base = ["train", str(source), "--data", "digits", "--epochs", "1", "--batch-size", "256"]
    _run(capsys, *base, "-o", str(tmp_path / "a.pt2"), "--save-every", "1")
    state = tmp_path / "a.state.pt"
    assert torch.load(state, weights_only=True)["identity"]["model"]["kind"] == PROGRAM
    # a finished run's state resumes to the same model without training again
    metrics = _run(capsys, *base, "-o", str(tmp_path / "b.pt2"), "--resume", str(state))
    assert metrics["resumed_from"] == str(state) and len(metrics["epochs"]) == 1
    x = random_input((3, *SHAPE[1:]), 4)
    a, b = (torch.export.load(str(tmp_path / n)).module() for n in ("a.pt2", "b.pt2"))
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    # the state of another program is refused
    _export(_tiny(), tmp_path / "other.pt2", (4, *SHAPE[1:]))  # other bytes
    assert main(["train", str(tmp_path / "other.pt2"), *base[2:], "-o",
                 str(tmp_path / "c.pt2"), "--resume", str(state)]) == 2
    assert "model.sha256" in capsys.readouterr().err


@pytest.mark.parametrize("case, phrase", [
    ("pickle", "reads it only with --trust-pickle"),
    ("features", "shape [2, 4, 16, 16] for a batch of 2, not [N, K] class logits"),
    ("tuple", "returns a tuple, not one [N, K] tensor"),
    ("training", "exported in training mode"),
    ("fixed batch", "holds a fixed batch size; export it with a dynamic batch"),
    ("five", "gives 5 outputs but digits has 10 classes"),
    ("program -o .pt", "written back in its own format, as a torch.export program"),
    ("pickle -o .pt2", "written back in its own format, as a pickled nn.Module"),
    ("oblong", "1x3x16x12; archc trains and evaluates on square images"),
    ("input shape of a spec", "--input-shape: "),
    ("wrong channels", "does not run at the example input"),
    ("teacher spec", "--teacher"),
    ("teacher classes", "has 5 classes but the student has 10"),
    ("teacher input", "takes 3x8x8 input but the student 3x16x16"),
])
def test_refused_models_one_line_exit_2(tmp_path, capsys, case, phrase):
    files = {"pickle.pt": _Tiny(), "features.pt2": _Features(), "tuple.pt2": _TwoHeads(),
             "five.pt2": _Tiny(5), "tiny.pt2": _Tiny(), "fixed batch.pt2": _FixedBatch()}
    for name, model in files.items():
        if name.endswith(".pt2"):
            _export(model.eval(), tmp_path / name)
        else:
            torch.save(model, tmp_path / name)
    _export(_Tiny().train(), tmp_path / "training.pt2")
    _export(_Tiny().eval(), tmp_path / "small.pt2", (2, 3, 8, 8))
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps(TINY))
    out = tmp_path / "out.pt2"
    model = {"pickle": "pickle.pt", "features": "features.pt2", "tuple": "tuple.pt2",
             "training": "training.pt2", "five": "five.pt2", "fixed batch": "fixed batch.pt2",
             "program -o .pt": "tiny.pt2",
             "pickle -o .pt2": "pickle.pt", "oblong": "pickle.pt",
             "input shape of a spec": "s.json"}.get(case, "tiny.pt2")
    extra = {"program -o .pt": ["-o", str(tmp_path / "out.pt")],
             "pickle -o .pt2": ["--trust-pickle"],
             "oblong": ["--trust-pickle", "--input-shape", "1,3,16,12"],
             "input shape of a spec": ["--input-shape", "1,3,16,16"],
             "wrong channels": ["--input-shape", "2,1,16,16"],
             "teacher spec": ["--teacher", str(spec)],
             "teacher classes": ["--teacher", str(tmp_path / "five.pt2")],
             "teacher input": ["--teacher", str(tmp_path / "small.pt2")]}.get(case, [])
    argv = ["train", str(tmp_path / model), "--data", "digits", "--epochs", "1", *extra]
    if "-o" not in argv:
        argv += ["-o", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and phrase in err, err
    assert not out.exists() and not (tmp_path / "out.pt").exists()
    if case in ("pickle", "features", "tuple"):  # eval reads models the same way
        assert main(["eval", str(tmp_path / model), "--data", "digits"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and phrase in err, err


def test_lowrank_and_reduce_of_a_program(tmp_path, capsys):
    source, out = tmp_path / "tiny.pt2", tmp_path / "low.pt2"
    _export(_tiny(), source)
    report = _run(capsys, "lowrank", str(source), "--energy", "0.5", "-o", str(out))
    assert report["kind"] == PROGRAM and report["macs"][1] < report["macs"][0]
    x = random_input((3, *SHAPE[1:]), 2)
    assert torch.export.load(str(out)).module()(x).shape == (3, 10)
    for argv, phrase in [
        (["lowrank", str(source), "-o", str(tmp_path / "low.pt")],
         "its decomposed form is written as a torch.export program"),
        (["reduce", str(source), "-o", str(tmp_path / "r.pt")],
         "the torch.export program stores no archc spec"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and phrase in err, err
