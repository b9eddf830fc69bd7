"""Compression training plugins (archc/compress/train_plugins.py) and `archc train --slimming /
--teacher`: the penalty and the distillation loss by hand, slimming shrinking BN scales, a pruned
checkpoint fine-tuned and saved with its edits, a teacher of other classes refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from archc.backends.checkpoint import load_checkpoint
from archc.cli.main import main
from archc.compress.train_plugins import Distillation, Slimming, distillation_loss
from archc.errors import TrainingError
from archc.train.loop import Step

TINY = {"name": "tiny", "input": {"channels": 1, "size": 8}, "num_classes": 10,
        "stem": {"type": "simple", "width": 8, "stride": 1}, "head": {"type": "classifier"},
        "body": {"type": "anynet", "stages": [
            {"block": "res_basic", "depth": 1, "width": 16, "stride": 2}]}}


def _step(model, logits=None):
    x = torch.randn(4, 3)
    return Step(model, x, torch.zeros(4, dtype=torch.long),
                model(x) if logits is None else logits, 1, 0)


def test_slimming_penalty_is_lambda_times_l1_of_bn_scales():
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]))
        model[3].weight.copy_(torch.tensor([-1.0, 1.0]))
    term = Slimming(0.01).loss(_step(model.eval()))
    assert term.item() == pytest.approx(0.01 * (6.5 + 2.0))
    term.backward()
    torch.testing.assert_close(model[1].weight.grad, 0.01 * torch.tensor([1.0, -1, 1, 0, 1]))
    assert Slimming(0.0).loss(_step(model)) is None
    with pytest.raises(TrainingError):
        Slimming(-1.0)


def test_distillation_loss_by_hand():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    t = 3.0
    p = F.softmax(teacher / t, 1)
    expected = t * t * (p * (p.log() - F.log_softmax(student / t, 1))).sum(1).mean()
    torch.testing.assert_close(distillation_loss(student, teacher, t), expected)
    assert distillation_loss(teacher, teacher, t).abs().item() < 1e-7
    teacher_model = nn.Linear(3, 3)
    plugin = Distillation(teacher_model, 2.0, 0.25)
    assert not any(p.requires_grad for p in teacher_model.parameters())
    step = _step(nn.Linear(3, 3))
    torch.testing.assert_close(plugin.loss(step), 0.25 * distillation_loss(
        step.logits, teacher_model(step.inputs), 2.0))
    with pytest.raises(TrainingError):
        Distillation(teacher_model, 0.0, 0.5)


def _bn_scale(path) -> float:
    _, gm = load_checkpoint(path)
    scales = [m.weight.abs().mean().item() for m in gm.modules() if isinstance(m, nn.BatchNorm2d)]
    return sum(scales) / len(scales)


@pytest.mark.slow
def test_cli_slimming_teacher_and_pruned_fine_tuning(tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(TINY))
    common = ["--data", "digits", "--epochs", "1", "--batch-size", "128", "-q"]
    plain, slim = tmp_path / "plain.pt", tmp_path / "slim.pt"
    assert main(["train", str(spec), "-o", str(plain), *common]) == 0
    assert main(["train", str(spec), "-o", str(slim), "--slimming", "1e-2", *common]) == 0
    capsys.readouterr()
    assert _bn_scale(slim) < _bn_scale(plain)  # the penalty pulled the scales down
    student = tmp_path / "student.pt"
    assert main(["train", str(spec), "-o", str(student), "--teacher", str(plain),
                 "--kd-weight", "0.5", "--json", *common]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["compression"]["teacher"] == str(plain)
    assert metrics["config"]["task_weight"] == 0.5
    # a pruned checkpoint fine-tunes and is saved with its edits
    pruned, tuned = tmp_path / "pruned.pt", tmp_path / "tuned.pt"
    assert main(["prune", str(plain), "--ratio", "0.5", "-o", str(pruned), "-q"]) == 0
    assert main(["train", str(pruned), "-o", str(tuned), *common]) == 0
    capsys.readouterr()
    _, gm = load_checkpoint(tuned)
    assert gm.get_submodule("stem.conv").out_channels == 4
    # a teacher with other classes: one line, exit 2, before any training
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**TINY, "num_classes": 12}))
    teacher12 = tmp_path / "t12.pt"
    assert main(["build", str(other), "-o", str(teacher12), "-q"]) == 0
    capsys.readouterr()
    assert main(["train", str(spec), "-o", str(tmp_path / "x.pt"), "--teacher",
                 str(teacher12), *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has 12 classes but the student has 10" in err
    assert not (tmp_path / "x.pt").exists()
