"""Devices and precision (archc.train.device): device names resolved or refused, autocast and the
gradient scaler on the CPU, bf16/fp16 training on digits, and the CLI's one-line refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch

from archc.cli.main import main
from archc.errors import DeviceError
from archc.train.device import (
    autocast,
    check_precision,
    grad_scaler,
    pins_memory,
    resolve_device,
    to_device,
)
from archc.train.loop import TrainConfig, Trainer
from tests.train.test_train import TINY, digits, tiny_model  # noqa: F401 - the fixture

NO_GPU = pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(),
                            reason="auto resolves to a GPU here")


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@NO_GPU
def test_auto_is_the_cpu_on_this_machine():
    assert resolve_device("auto") == torch.device("cpu")


def test_names_resolve(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == resolve_device(" CPU ") == torch.device("cpu")


@pytest.mark.parametrize("name, phrase", [
    ("tpu", "unknown device"), ("cuda:x", "unknown device"), ("gpu0", "unknown device"),
    ("cuda", "CUDA is not available"), ("cuda:1", "CUDA is not available"),
    ("mps", "no MPS"),
])
def test_unknown_or_absent_devices_are_refused(no_gpu, name, phrase):
    with pytest.raises(DeviceError, match=phrase):
        resolve_device(name)


def test_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == resolve_device("mps") == torch.device("mps")


def test_a_cuda_index_beyond_the_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match=r"has 1 CUDA devices \(cuda:0 to cuda:0\)"):
        resolve_device("cuda:3")


def test_precisions():
    assert [check_precision(p) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    with pytest.raises(DeviceError, match="unknown precision 'fp8'"):
        check_precision("fp8")
    cpu, conv, x = torch.device("cpu"), torch.nn.Conv2d(3, 4, 3), torch.randn(2, 3, 8, 8)
    for precision, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16),
                             ("fp16", torch.float16)]:
        with autocast(cpu, precision):
            assert conv(x).dtype == dtype
    assert [grad_scaler(cpu, p).is_enabled() for p in ("fp32", "bf16", "fp16")] == [
        False, False, True]


def test_only_cuda_pins_memory():
    assert pins_memory(torch.device("cuda", 0)) and pins_memory(torch.device("cuda"))
    assert not pins_memory(torch.device("cpu")) and not pins_memory(torch.device("mps"))
    x = torch.arange(6.0)
    assert to_device(x, torch.device("cpu")) is x


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_training_on_the_cpu(digits, precision):  # noqa: F811
    config = TrainConfig(epochs=1, batch_size=64, lr=0.1, precision=precision)
    first = Trainer(config, progress=False).fit(tiny_model(), digits)
    again = Trainer(config, progress=False).fit(tiny_model(), digits)
    fp32 = Trainer(TrainConfig(epochs=1, batch_size=64, lr=0.1), progress=False).fit(
        tiny_model(), digits)
    loss = first.history[0]["train_loss"]
    assert math.isfinite(loss) and loss < 2.3  # below chance's ln 10: it learns
    assert loss == again.history[0]["train_loss"]  # seeded: repeatable in low precision too
    assert loss != fp32.history[0]["train_loss"]  # autocast really ran
    assert all(p.dtype == torch.float32 for p in first.model.parameters())  # master weights


def test_cli_trains_in_bf16_and_records_it(tmp_path, capsys):
    spec = tmp_path / "tiny.json"
    spec.write_text(json.dumps(TINY))
    assert main(["train", str(spec), "--data", "digits", "--epochs", "1", "--batch-size", "64",
                 "--device", "cpu", "--precision", "bf16", "-o", str(tmp_path / "t.pt"),
                 "--metrics", str(tmp_path / "m.json")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["config"]["precision"] == "bf16" and metrics["config"]["device"] == "cpu"
    assert math.isfinite(metrics["epochs"][0]["train_loss"])
    assert json.loads((tmp_path / "m.json").read_text())["config"]["precision"] == "bf16"
    assert main(["eval", str(tmp_path / "t.pt"), "--data", "digits", "--device", "cpu"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["device"] == "cpu"
    assert evaluated["error"] == pytest.approx(metrics["final_error"])


@pytest.mark.parametrize("argv, phrase", [
    (["train", "SPEC", "--data", "digits", "-o", "OUT", "--device", "tpu"], "unknown device"),
    (["train", "SPEC", "--data", "digits", "-o", "OUT", "--device", "cuda"],
     "CUDA is not available"),
    (["train", "SPEC", "--data", "digits", "-o", "OUT", "--precision", "fp8"],
     "unknown precision"),
    (["eval", "CKPT", "--data", "digits", "--device", "cuda:0"], "CUDA is not available"),
    (["eval", "ONNX", "--data", "digits", "--device", "cuda"], "ONNX Runtime on the CPU"),
    (["qat", "CKPT", "--data", "digits", "-o", "Q", "--device", "mps"], "no MPS"),
    (["space", "sweep", "SAMPLES", "-o", "R", "--data", "digits", "--epochs", "1",
      "--device", "npu"], "unknown device"),
])
def test_cli_refuses_devices_in_one_line(tmp_path, capsys, no_gpu, argv, phrase):
    (tmp_path / "s.json").write_text(json.dumps(TINY))
    (tmp_path / "c.pt").write_bytes(b"not read before the device is checked")
    (tmp_path / "m.onnx").write_bytes(b"not read before the device is checked")
    (tmp_path / "samples.jsonl").write_text("")
    names = {"SPEC": "s.json", "OUT": "out.pt", "CKPT": "c.pt", "ONNX": "m.onnx", "Q": "q.onnx",
             "SAMPLES": "samples.jsonl", "R": "r.jsonl"}
    argv = [str(tmp_path / names[a]) if a in names else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and phrase in err[0], err
    assert not any((tmp_path / n).exists() for n in ("out.pt", "q.onnx", "r.jsonl"))


def test_fake_quantization_trains_under_autocast(digits):  # noqa: F811
    from archc.compress.qat import FakeQuant

    config = TrainConfig(epochs=1, batch_size=128, lr=0.05, precision="bf16")
    result = Trainer(config, [FakeQuant()], progress=False).fit(tiny_model(), digits)
    assert math.isfinite(result.history[0]["train_loss"])


def test_deterministic_mode_without_the_nan_fill_and_restored():
    import torch.utils.deterministic as deterministic

    from archc.train.device import deterministic_algorithms

    before = (torch.are_deterministic_algorithms_enabled(), deterministic.fill_uninitialized_memory)
    with deterministic_algorithms():
        assert torch.are_deterministic_algorithms_enabled()
        assert not deterministic.fill_uninitialized_memory  # no NaN pass over every new buffer
    assert (torch.are_deterministic_algorithms_enabled(),
            deterministic.fill_uninitialized_memory) == before
