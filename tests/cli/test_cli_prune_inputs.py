"""`archc prune` of a model of several inputs (an image and its class labels, `ClassConditional`
of tests/wild/prunable_ops.py) through both routes: a pickled module with one `--input-shape`
per input, and a `.pt2` whose recorded inputs are the examples. Half of every free group is dead,
so pruning at 0.5 removes exactly those channels: the pruned program, reloaded, takes both inputs
at any batch and matches the source model in float32 on several labels. Malformed
`--input-shape` values and counts are one-line errors naming the option (exit 2)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from archc.cli.arguments import InputOption, input_option
from archc.cli.main import main
from archc.ir.init import random_input, randomize
from tests.helpers import kill_half
from tests.wild.prunable_ops import ClassConditional

SHAPE = (2, 3, 16, 16)


def _half_dead() -> nn.Module:
    """ClassConditional with random weights, embeddings and BN statistics, the first half of
    every free group's channels dead (their embedding columns too)."""
    model = randomize(ClassConditional(), 0, calibration_input=(
        random_input((4, *SHAPE[1:]), 1), torch.tensor([0, 3, 5, 9])))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for embedding in (model.label, model.gain, model.bias):
            embedding.weight.copy_(0.2 * torch.randn(embedding.weight.shape, generator=generator))
    kill_half(torch.fx.symbolic_trace(model.eval()), (random_input(SHAPE, 0),
                                                      torch.tensor([2, 7])))
    return model.eval()


def _prune(capsys, *argv: str) -> dict:
    assert main(["prune", *argv, "--ratio", "0.5", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("route", ["pickle", "pt2"])
def test_prune_reads_a_model_of_an_image_and_its_labels(tmp_path, capsys, route):
    model = _half_dead()
    if route == "pickle":
        source = tmp_path / "model.pt"
        torch.save(model, source)
        options = ["--trust-pickle", "--input-shape", "1,3,16,16", "--input-shape", "1:int64"]
    else:
        source = tmp_path / "model.pt2"
        torch.export.save(torch.export.export(model, (random_input(SHAPE, 0),
                                                      torch.tensor([2, 7]))), source)
        options = []
    output = tmp_path / "pruned.pt2"
    report = _prune(capsys, str(source), "-o", str(output), *options)
    assert report["macs"][1] < 0.6 * report["macs"][0]
    program = torch.export.load(str(output))
    assert [x.dtype for x in program.example_inputs[0]] == [torch.float32, torch.int64]
    pruned = program.module()
    for name in ("label", "gain", "bias"):
        assert pruned.state_dict()[f"{name}.weight"].shape == (10, 16)
    for size, seed in ((1, 3), (4, 4), (10, 5)):
        x, labels = random_input((size, *SHAPE[1:]), seed), torch.randperm(10)[:size]
        with torch.no_grad():
            torch.testing.assert_close(pruned(x, labels), model(x, labels),
                                       rtol=1e-5, atol=1e-5)
    again = _prune(capsys, str(output), "-o", str(tmp_path / "again.pt2"))  # its own inputs
    assert again["macs"][0] == report["macs"][1] and again["macs"][1] < report["macs"][1]


class _IndexedTwice(nn.Module):
    """The labels reach the embedding through an add: no nn.Embedding reads them directly."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.embed = nn.Embedding(10, 8)

    def forward(self, x, labels):
        return self.b(self.a(x) + self.embed(labels + 1)[:, :, None, None])


@pytest.mark.parametrize("options, message", [
    ([], r"takes 2 inputs \(x, labels\) and no --input-shape: give one --input-shape per input"),
    (["--input-shape", "1,3,8,8"], r"takes 2 inputs \(x, labels\) and 1 --input-shape"),
    (["--input-shape", "2,3,8,8", "--input-shape", "1:int64"], r"--input-shape batches differ"),
    (["--input-shape", "1,3,8,8", "--input-shape", "1:int64"],
     r"input labels is int64 and feeds no nn.Embedding: .*--input-shape 1:int64:BOUND"),
    (["--input-shape", "64,3,8,8", "--input-shape", "64:int64:10"],
     r"does not run at the example inputs 64x3x8x8, 64 \(.*index out of range"),
])
def test_prune_refuses_input_shapes_that_do_not_fit_the_model(tmp_path, capsys, options,
                                                              message):
    """Count, batches, an integer input of unknown bound, a bound past the table's rows (the
    labels + 1 index row 10 of 10)."""
    source = tmp_path / "model.pt"
    torch.save(_IndexedTwice().eval(), source)
    code = main(["prune", str(source), "--trust-pickle", "--ratio", "0.5", "-o",
                 str(tmp_path / "p.pt2"), *options])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error, error
    assert re.search(message, error), error


def test_an_integer_bound_within_the_rows_prunes(tmp_path, capsys):
    source = tmp_path / "model.pt"
    torch.save(_IndexedTwice().eval(), source)
    report = _prune(capsys, str(source), "--trust-pickle", "-o", str(tmp_path / "p.pt2"),
                    "--input-shape", "1,3,8,8", "--input-shape", "1:int64:9")
    assert report["kind"] == "pickled nn.Module"


@pytest.mark.parametrize("value, message", [
    ("1,3,x,8", "is not a shape like 1,3,224,224"),
    ("1:int8", "unknown dtype 'int8'; one of float32"),
    ("1,3,8,8:float32:10", "a bound is for an integer input"),
    ("1:int64:0", "the bound 0 is not positive"),
    ("1:int64:ten", "the bound 'ten' is not an integer"),
    ("1:int64:10:2", "has 3 colons"),
    ("5", "has 1 sizes: give 2 to 5 sizes"),
    ("1,2,3,4,5,6:int64", "has 6 sizes: give 1 to 5 sizes"),
    ("0,3,8,8", "is not a shape of positive sizes"),
])
def test_a_malformed_input_shape_is_a_usage_error(tmp_path, capsys, value, message):
    with pytest.raises(SystemExit) as raised:
        main(["prune", str(tmp_path / "m.pt"), "--ratio", "0.5", "-o", str(tmp_path / "p.pt2"),
              "--input-shape", "1,3,8,8", "--input-shape", value])
    error = capsys.readouterr().err.strip()
    assert raised.value.code == 2 and "\n" not in error and "argument --input-shape" in error, error
    assert message in error


def test_input_option_reads_sizes_dtype_and_bound():
    assert input_option("1x3x32x32") == InputOption((1, 3, 32, 32))
    assert input_option("4,3,8,8:float64") == InputOption((4, 3, 8, 8), "float64")
    assert input_option("1:int64:10") == InputOption((1,), "int64", 10)
    assert input_option("2,5:int32") == InputOption((2, 5), "int32", None)


def test_fuse_still_refuses_a_model_of_several_inputs(tmp_path, capsys):
    source = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(_IndexedTwice().eval(), (
        random_input((2, 3, 8, 8), 0), torch.tensor([1, 7]))), source)
    assert main(["fuse", str(source), "-o", str(tmp_path / "f.pt2")]) == 2
    error = capsys.readouterr().err.strip()
    assert "the model takes 2 inputs (x, labels); this command reads models of one input " \
           "tensor (`archc prune` reads several)" in error and "\n" not in error
