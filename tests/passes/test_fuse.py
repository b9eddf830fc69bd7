"""`archc fuse`: archc checkpoints, foreign pickled modules and torch.export programs collapse to
the same deploy form; bad checkpoints give one line and exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import archc
from archc.cli.main import main
from archc.ir.init import randomize
from archc.ir.verify import relative_error

REPVGG_A0_DEPLOY_PARAMS = 8_309_384
SMALL = "1,3,64,64"


def deploy_structure(gm: nn.Module) -> tuple[int, int, int]:
    modules = list(gm.modules())
    convs = sum(isinstance(m, nn.Conv2d) for m in modules)
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in modules)
    return convs, norms, sum(p.numel() for p in gm.parameters())


@pytest.fixture(scope="module")
def repvgg_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "repvgg_a0.pt"
    assert main(["build", "specs/repvgg_a0.yaml", "-o", str(path), "--init", "random"]) == 0
    return path


@pytest.mark.slow
def test_fuse_archc_repvgg_a0(repvgg_checkpoint, tmp_path, capsys):
    out = tmp_path / "deploy.pt2"
    assert main(["fuse", str(repvgg_checkpoint), "-o", str(out), "--input-shape", SMALL]) == 0
    printed = capsys.readouterr().out
    assert ("deploy form: 44 -> 22 convs, 1 linear layer, 61 -> 0 normalization layers, "
            "9,108,968 -> 8,309,384 params") in printed
    fused = torch.export.load(str(out)).module()
    reference = archc.build("specs/repvgg_a0.yaml", init="random")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(reference(x), fused(x)) <= 1e-5


def test_default_output_name(repvgg_checkpoint, capsys):
    assert main(["fuse", str(repvgg_checkpoint), "--input-shape", SMALL]) == 0
    assert (repvgg_checkpoint.parent / "repvgg_a0.fused.pt2").exists()


class ForeignRepVGGBlock(nn.Module):
    """A RepVGG block as someone else writes it: no archc code, its own names."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.rbr_dense = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        )
        self.rbr_1x1 = nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False), nn.BatchNorm2d(c_out)
        )
        self.rbr_identity = nn.BatchNorm2d(c_in) if c_in == c_out and stride == 1 else None
        self.nonlinearity = nn.ReLU()

    def forward(self, inputs):
        identity = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.nonlinearity(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + identity)


class ForeignRepVGG(nn.Module):
    def __init__(self, widths=(8, 16, 16, 32), num_classes=10):
        super().__init__()
        layers, c_in = [], 3
        for index, width in enumerate(widths):
            layers.append(ForeignRepVGGBlock(c_in, width, 2 if index in (0, 1, 3) else 1))
            c_in = width
        self.features = nn.Sequential(*layers)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.linear(torch.flatten(self.gap(self.features(x)), 1))


def foreign_deploy_params(widths=(8, 16, 16, 32), num_classes=10):
    params, c_in = 0, 3
    for width in widths:
        params += 9 * c_in * width + width
        c_in = width
    return params + c_in * num_classes + num_classes


@pytest.fixture
def foreign_model():
    return randomize(ForeignRepVGG(), seed=4, calibration_input=torch.randn(4, 3, 32, 32))


def fuse_and_load(argv, out):
    assert main(argv) == 0
    return torch.export.load(str(out)).module()


def test_fuse_pickled_foreign_model(foreign_model, tmp_path, capsys):
    ckpt, out = tmp_path / "foreign.pt", tmp_path / "foreign.fused.pt2"
    torch.save(foreign_model, ckpt)
    fused = fuse_and_load(
        ["fuse", str(ckpt), "--trust-pickle", "--input-shape", "1,3,32,32", "-o", str(out)],
        out,
    )
    assert "-> 4 convs" in (printed := capsys.readouterr().out)
    assert f"-> 0 normalization layers, {sum(p.numel() for p in foreign_model.parameters()):,} " \
           f"-> {foreign_deploy_params():,} params" in printed
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(foreign_model(x), fused(x)) <= 1e-5


def test_fuse_exported_program(foreign_model, tmp_path, capsys):
    program, out = tmp_path / "foreign.pt2", tmp_path / "deploy.pt2"
    torch.export.save(torch.export.export(foreign_model, (torch.randn(1, 3, 32, 32),)), program)
    fused = fuse_and_load(["fuse", str(program), "-o", str(out)], out)
    printed = capsys.readouterr().out
    assert "-> 4 convs" in printed and "-> 0 normalization layers" in printed
    assert f"-> {foreign_deploy_params():,} params" in printed
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(foreign_model(x), fused(x)) <= 1e-5


def test_fuse_to_standalone_python(foreign_model, tmp_path):
    ckpt, out = tmp_path / "foreign.pt", tmp_path / "deploy.py"
    torch.save(foreign_model, ckpt)
    assert (
        main(["fuse", str(ckpt), "--trust-pickle", "--input-shape", "1,3,32,32", "-o", str(out)])
        == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "deploy.py",
        "deploy.weights.pt",
        "foreign.pt",
    ]
    source = out.read_text()
    assert "archc" not in source.split('"""', 2)[2]  # only the docstring names its origin
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(foreign_model(x), tmp_path / "y.pt")
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); from deploy import load; "
        "x = torch.load(sys.argv[1] + '/x.pt'); y = torch.load(sys.argv[1] + '/y.pt'); "
        "m = load(); print(float(((m(x) - y).abs().max() / y.abs().max())), "
        "any(k.startswith(('archc', 'passes')) for k in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    error, imported_archc = result.stdout.split()
    assert float(error) <= 1e-5 and imported_archc == "False", result.stderr


def test_fuse_to_onnx(foreign_model, tmp_path, capsys):
    ckpt, out = tmp_path / "foreign.pt", tmp_path / "deploy.onnx"
    torch.save(foreign_model, ckpt)
    assert (
        main(["fuse", str(ckpt), "--trust-pickle", "--input-shape", "1,3,32,32", "-o", str(out)])
        == 0
    )
    import onnx

    ops = [node.op_type for node in onnx.load(str(out)).graph.node]
    assert ops.count("Conv") == 4 and "BatchNormalization" not in ops


# ---------------------------------------------------------------------------------------------
# bad checkpoints: one line, exit 2, no output


def bad_checkpoints(tmp_path, foreign_model):
    good = tmp_path / "good.pt"
    assert main(["build", "specs/regnetx_200mf.yaml", "-o", str(good)]) == 0
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    # seeded noise whose first byte is no format's marker (0x80 pickle, PK zip, 0x08 ONNX)
    noise = torch.randint(0, 256, (4096,), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0)).numpy().tobytes()
    (tmp_path / "random.pt").write_bytes(b"\x13" + noise[1:])
    payload = torch.load(good, weights_only=True)
    payload["state_dict"]["s1.b1.f.a.conv.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save(payload, tmp_path / "mismatch.pt")
    payload = torch.load(good, weights_only=True)
    del payload["state_dict"]["head.fc.bias"]
    torch.save(payload, tmp_path / "missing_key.pt")
    torch.save(foreign_model, tmp_path / "pickled.pt")
    torch.save({"weight": torch.zeros(1)}, tmp_path / "bare_state_dict.pt")
    (tmp_path / "random.pt2").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "model.onnx").write_bytes(b"\x08\x09\x12\x07pytorch")
    (tmp_path / "spec.yaml").write_text("name: x\n")
    good.unlink()


EXPECTED = {
    "truncated.pt": "not a loadable checkpoint",
    "random.pt": "not a file torch.save or torch.export wrote",
    "model.onnx": "an ONNX model: archc rewrites PyTorch models",
    "spec.yaml": "a spec: build it with `archc build SPEC -o model.pt`",
    "mismatch.pt": "state_dict does not match its spec",
    "missing_key.pt": "state_dict does not match its spec",
    "pickled.pt": "--trust-pickle",
    "bare_state_dict.pt": "bare state_dict has no architecture",
    "random.pt2": "not a loadable torch.export program",
}


def test_bad_checkpoints(tmp_path, foreign_model, capsys):
    bad_checkpoints(tmp_path, foreign_model)
    capsys.readouterr()
    for name, phrase in EXPECTED.items():
        out = tmp_path / "out" / f"{name}.pt2"
        assert main(["fuse", str(tmp_path / name), "-o", str(out)]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / name}"), err
        assert phrase in err[0], err[0]
        assert not (tmp_path / "out").exists()


def test_bad_checkpoint_in_a_real_process(tmp_path):
    (tmp_path / "random.pt").write_bytes(b"\x80\x02garbage" * 100)
    result = subprocess.run(
        [sys.executable, "-m", "archc", "fuse", str(tmp_path / "random.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["random.pt"]


# ---- pickled modules: input shapes and classes ----

class Digits(nn.Module):
    """A 1-channel model whose classifier fixes its input to 28x28."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 28 * 28, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


@pytest.fixture
def digits_pickle(tmp_path):
    path = tmp_path / "digits.pt"
    torch.save(randomize(Digits(), 0).eval(), path)
    return path


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err
    return lines[0]


def test_a_pickled_model_gets_its_input_channels_from_its_first_layer(digits_pickle, tmp_path,
                                                                      capsys):
    out = tmp_path / "out.pt2"
    assert main(["fuse", str(digits_pickle), "--trust-pickle", "-o", str(out)]) == 2
    line = _one_line_error(capsys)
    assert "does not run at the example input 1x1x224x224" in line and "--input-shape" in line
    assert not out.exists()
    assert main(["fuse", str(digits_pickle), "--trust-pickle", "-o", str(out),
                 "--input-shape", "2,1,28,28"]) == 0


def test_an_input_shape_of_the_wrong_rank_is_one_line(digits_pickle, tmp_path, capsys):
    out = tmp_path / "out.pt2"
    assert main(["fuse", str(digits_pickle), "--trust-pickle", "-o", str(out),
                 "--input-shape", "1,1,28"]) == 2
    line = _one_line_error(capsys)
    assert "has 3 dims, but the first layer conv (Conv2d) takes 4-dimensional input" in line
    assert not out.exists()
    with pytest.raises(SystemExit) as exit_code:
        main(["fuse", str(digits_pickle), "--input-shape", "7"])
    assert exit_code.value.code == 2 and "give N,C,H,W" in capsys.readouterr().err


MODULE_SOURCE = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))
'''


def test_a_class_next_to_the_users_script_is_found_or_named(tmp_path):
    """The pickle names `mymodels.Tiny`: found from the directory that holds mymodels.py; from
    elsewhere, one line naming the module and what to do."""
    (tmp_path / "mymodels.py").write_text(MODULE_SOURCE)
    save = ("import torch, mymodels; torch.save(mymodels.Tiny().eval(), 'tiny.pt')")
    subprocess.run([sys.executable, "-c", save], cwd=tmp_path, check=True)
    archc_cli = [sys.executable, "-m", "archc", "fuse", str(tmp_path / "tiny.pt"),
                 "--trust-pickle", "--input-shape", "1,3,16,16", "-o"]
    found = subprocess.run([*archc_cli, "out.pt2"], cwd=tmp_path, capture_output=True,
                           text=True)
    assert found.returncode == 0, found.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    missing = subprocess.run([*archc_cli, "out.pt2"], cwd=elsewhere, capture_output=True,
                             text=True)
    lines = missing.stderr.strip().splitlines()
    assert missing.returncode == 2 and len(lines) == 1, missing.stderr
    assert "module 'mymodels'" in lines[0] and "run archc from the directory" in lines[0]
    assert not (elsewhere / "out.pt2").exists()
