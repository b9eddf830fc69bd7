"""ReduceNet's flow (archc/compress/reducenet.py, `archc reduce`, `archc train --lora/--freeze`):
the reduced phase carries the train phase's weights, the low-rank branch merges into its conv
exactly (relative error <= 1e-5), train -> reduce -> distil with a frozen classifier -> merge."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import archc
from archc.backends.checkpoint import load_checkpoint
from archc.backends.export import SPEC_FILE, program_spec, same_weights
from archc.backends.trainable import load_trainable
from archc.cli.main import main
from archc.compress.lowrank_algebra import frobenius_relative_error, merge_low_rank_branch
from archc.compress.reducenet import (
    BranchedConv,
    LowRankBranch,
    ReduceError,
    merge_branches,
    reduce,
)
from archc.errors import ExportError

TINY = {"name": "tiny_reducenet", "input": {"channels": 1, "size": 8}, "num_classes": 10,
        "stem": {"type": "simple", "width": 8, "stride": 1}, "head": {"type": "classifier"},
        "body": {"type": "anynet", "stages": [
            {"block": "reducenet", "depth": 1, "width": 8, "stride": 1, "expansion": 2,
             "phase": "train"},
            {"block": "reducenet", "depth": 1, "width": 16, "stride": 2, "expansion": 2,
             "phase": "train"}]}}


def test_low_rank_branch_merges_exactly():
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=True)
    down = torch.randn(2, 6, 3, 3, generator=g)
    up = torch.randn(5, 2, 1, 1, generator=g)
    x = torch.randn(2, 6, 9, 9, generator=g)
    branched = conv(x) + F.conv2d(F.conv2d(x, down, stride=2, padding=1), up)
    merged = F.conv2d(x, merge_low_rank_branch(conv.weight, down, up), conv.bias, stride=2,
                      padding=1)
    assert frobenius_relative_error(branched, merged) <= 1e-5
    with pytest.raises(ValueError):
        merge_low_rank_branch(conv.weight, torch.randn(2, 6, 1, 1), up)


def test_branched_model_starts_at_its_function_and_merges_back():
    gm = archc.build(TINY, init="random")
    x = torch.randn(2, 1, 8, 8)
    expected = gm(x)
    LowRankBranch(2).wrap(gm)
    branched = [m for m in gm.modules() if isinstance(m, BranchedConv)]
    assert len(branched) > 5 and not branched[0].conv.weight.requires_grad
    torch.testing.assert_close(gm(x), expected)  # up starts at 0
    with torch.no_grad():
        for module in branched:
            module.up.weight.normal_()
    count, error = merge_branches(gm, x)
    assert count == len(branched) and error <= 1e-5
    assert not any(isinstance(m, BranchedConv) for m in gm.modules())


def test_reduce_carries_every_weight_but_branch1():
    gm = archc.build(TINY, init="random")
    spec, reduced = reduce(archc.build(TINY).meta["archc_spec"], gm)
    assert spec["body"]["stages"][0]["phase"] == "reduced"
    assert not any(".branch1." in k for k in reduced.state_dict())
    for key, value in reduced.state_dict().items():
        assert torch.equal(value, gm.state_dict()[key]), key
    with pytest.raises(ReduceError):
        reduce(spec, reduced)


@pytest.mark.slow
def test_cli_train_reduce_distil_merge(tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(TINY))
    common = ["--data", "digits", "--epochs", "1", "--batch-size", "128"]
    train, reduced, tuned = tmp_path / "train.pt", tmp_path / "reduced.pt", tmp_path / "ft.pt"
    assert main(["train", str(spec), "-o", str(train), *common]) == 0
    assert main(["reduce", str(train), "-o", str(reduced)]) == 0
    program = tmp_path / "train.pt2"  # the train phase's deploy form, as a teacher
    assert main(["fuse", str(train), "-o", str(program), "-q"]) == 0
    capsys.readouterr()
    assert main(["train", str(reduced), "-o", str(tuned), "--teacher", str(program), "--freeze",
                 "head.*", "--lora", "2", *common]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["compression"]["teacher"] == str(program)
    assert metrics["compression"]["merged_branches"] > 0
    assert metrics["compression"]["merge_relative_error"] <= 1e-5
    _, before = load_checkpoint(reduced)
    _, after = load_checkpoint(tuned)
    assert torch.equal(before.get_submodule("head.fc").weight,
                       after.get_submodule("head.fc").weight)  # frozen
    assert not torch.equal(before.get_submodule("stem.conv").weight,
                           after.get_submodule("stem.conv").weight)  # merged branch
    assert main(["reduce", str(reduced), "-o", str(tmp_path / "x.pt")]) == 2
    capsys.readouterr()
    assert main(["reduce", str(program), "-o", str(tmp_path / "x.pt")]) == 2
    assert "stores no archc spec (archc_spec.json" in capsys.readouterr().err


@pytest.mark.slow
def test_program_stores_its_spec_only_when_the_weights_are_the_spec_models(tmp_path):
    """`archc build -o X.pt2` stores the spec (`archc_spec.json`) with `--passes none` or
    `--channels-last`, not after the default passes fold the BNs, nor in fp16 (`same_weights`); a
    stored file that is not a spec is refused."""
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(TINY))

    def build(out, *extra):
        assert main(["build", str(spec), "-o", str(tmp_path / out), "-q", *extra]) == 0

    build("plain.pt2", "--passes", "none", "--channels-last")
    assert program_spec(tmp_path / "plain.pt2") == archc.build(TINY).meta["archc_spec"]
    build("folded.pt2")
    assert program_spec(tmp_path / "folded.pt2") is None
    model = archc.build(TINY)
    assert same_weights(model, archc.build(TINY)) and not same_weights(model.half(), model)
    program = torch.export.load(str(tmp_path / "folded.pt2"))
    for text, message in [("{", "is not JSON"), ("[1]", "holds a list, not a spec")]:
        torch.export.save(program, tmp_path / "bad.pt2", extra_files={SPEC_FILE: text})
        with pytest.raises(ExportError, match=message):
            program_spec(tmp_path / "bad.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"junk")
    with pytest.raises(ExportError, match="not a torch.export program"):
        program_spec(tmp_path / "junk.pt2")


@pytest.mark.slow
def test_cli_reduce_program_stores_and_carries_spec(tmp_path, capsys):
    """A .pt2 of the spec model (no pass changed its weights) stores its spec: `archc reduce`
    gives the weights it gives the equivalent checkpoint, as a .pt2 that trains."""
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(TINY))
    program, checkpoint = tmp_path / "x.pt2", tmp_path / "x.pt"
    assert main(["build", str(spec), "-o", str(program), "--passes", "none", "-q"]) == 0
    assert main(["build", str(spec), "-o", str(checkpoint), "-q"]) == 0
    reduced_program, reduced_checkpoint = tmp_path / "r.pt2", tmp_path / "r.pt"
    assert main(["reduce", str(program), "-o", str(reduced_program), "-q"]) == 0
    assert main(["reduce", str(checkpoint), "-o", str(reduced_checkpoint), "-q"]) == 0
    reduced_dict, expected = load_checkpoint(reduced_checkpoint)
    loaded = load_trainable(reduced_program)
    assert loaded.program_spec == reduced_dict
    state, wanted = loaded.module.state_dict(), expected.state_dict()
    assert state.keys() == wanted.keys()
    for key, value in wanted.items():
        assert torch.equal(state[key], value), key
    tuned = tmp_path / "ft.pt2"
    assert main(["train", str(reduced_program), "-o", str(tuned), "--teacher", str(program),
                 "--data", "digits", "--epochs", "1", "--batch-size", "256", "-q"]) == 0
    assert program_spec(tuned) == reduced_dict  # written back with its spec
    capsys.readouterr()
    assert main(["reduce", str(tuned), "-o", str(tmp_path / "y.pt2")]) == 2  # already reduced
    assert main(["reduce", str(program), "-o", str(tmp_path / "y.pt")]) == 2  # format kept
    assert main(["reduce", str(checkpoint), "-o", str(tmp_path / "y.pt2")]) == 2
    assert "written in its format (-o NAME.pt)" in capsys.readouterr().err
