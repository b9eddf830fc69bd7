"""Guidance where users get lost: `archc train` warns, and goes on, when the spec has more
outputs than the data has classes, when its input is much larger than the stored images, when a
`--freeze` pattern matches nothing and when the EMA is too slow for the run; none of these fires
for an ordinary run. (The sweep's warnings: tests/space/test_sweep.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from archc.cli.main import main
from archc.train.loop import ema_warning
from tests.train.test_train import TINY


@pytest.mark.parametrize("spec, data, extra, expected", [
    ({}, "digits", [], None),
    ({}, "digits", ["--freeze", "head.*", "--ema", "0.8", "--batch-size", "64"], None),
    ({}, "FEW", [], "the model has 10 outputs but {few} has 3 classes: outputs 3..9 are never "
                    "a target (set num_classes: 3 in the spec)"),
    ({"input": {"channels": 3, "size": 40}}, "digits", [],
     "the model reads 40x40 images but the images of digits are 8x8: each is upscaled 5x"),
    ({}, "digits", ["--freeze", "heads.*"],
     "--freeze 'heads.*' matches no parameter of the model (names look like "
     "'stem.conv.weight')"),
    ({}, "digits", ["--ema", "0.999"],
     "--ema 0.999 averages over about 1,000 steps but the run has 6: the final EMA still holds "
     "99% of the initial random weights; the run is too short for an EMA"),
])
def test_train_warns_and_goes_on(tmp_path, capsys, spec, data, extra, expected):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({**TINY, **spec}))
    few = tmp_path / "few.npz"
    rng = np.random.default_rng(0)
    np.savez(few, x=rng.uniform(0, 1, (30, 1, 8, 8)).astype(np.float32), y=np.arange(30) % 3)
    source = str(few) if data == "FEW" else data
    assert main(["train", str(path), "--data", source, "--epochs", "1", "--batch-size", "256",
                 "--device", "cpu", "-o", str(tmp_path / "m.pt"), *extra]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("warning: ")]
    if expected is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and expected.format(few=few) in warnings[0], warnings
    assert (tmp_path / "m.pt").exists()


def test_quiet_silences_warnings(tmp_path, capsys):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(TINY))
    assert main(["train", str(path), "--data", "digits", "--epochs", "1", "--batch-size", "256",
                 "--device", "cpu", "-o", str(tmp_path / "m.pt"), "--freeze", "x", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_ema_advice():
    assert ema_warning(0.9, 46) is None  # 0.9^46 < 1%: the start is forgotten
    assert ema_warning(0.9999, 100_000) is None
    text = ema_warning(0.999, 230)
    assert "holds 79% of the initial random weights; use --ema 0.956 or less" in text
    assert 0.956 ** 230 < 1e-4  # the advice forgets the start
    assert "use --ema 0.99956 or less" in ema_warning(0.9999, 23_000)
