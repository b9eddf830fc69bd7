"""The quantized linear fit (archc.space.fit): every zoo RegNet's widths fit back to themselves
exactly, fits of AnyNet models are valid RegNets of the same depth and stages, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from archc.cli.main import main
from archc.frontend.loading import load_spec, spec_from_mapping
from archc.space.design_space import load_space
from archc.space.fit import e_fit, fit_spec, fit_stages, regnet_widths

ROOT = Path(__file__).resolve().parents[2]
ZOO = sorted(p.stem for p in (ROOT / "specs").glob("regnet*.yaml"))


def block_widths(stages):
    return [stage.width for stage in stages for _ in range(stage.depth)]


def stage_tuples(stages):
    return [(s.width, s.depth, s.group_width) for s in stages]


@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_regnet_fits_back_to_itself(name):
    spec = load_spec(ROOT / "specs" / f"{name}.yaml")
    fit, fitted = fit_spec(spec)
    assert fit.e_fit == 0.0
    assert fit.widths == block_widths(spec.stages())
    rebuilt = spec_from_mapping(fitted)
    assert stage_tuples(rebuilt.stages()) == stage_tuples(spec.stages())
    assert (rebuilt.body.se_ratio, rebuilt.body.bottleneck) == (spec.body.se_ratio, 1.0)


def test_e_fit_is_the_mean_log_ratio():
    assert e_fit([48, 96], [48, 96]) == 0.0
    assert e_fit([48, 96], [96, 96]) == pytest.approx(np.log(2) / 2)


def test_fits_of_anynet_models_are_regnets_with_their_stages():
    space = load_space(ROOT / "spaces/anynetx_e.yaml")
    for sample in space.samples(6, 3):
        spec = spec_from_mapping(sample.spec)
        stages = spec.stages()
        fit, fitted = fit_spec(spec)
        if fit is None:
            continue
        rebuilt = spec_from_mapping(fitted)
        assert len(rebuilt.stages()) == len(stages) == 4
        assert sum(s.depth for s in rebuilt.stages()) == sum(s.depth for s in stages)
        assert fit.e_fit == pytest.approx(e_fit(block_widths(stages), fit.widths))
        # no worse than the RegNet whose stages start at the model's own widths
        assert fit.e_fit <= e_fit(block_widths(stages), [stages[0].width] * len(fit.widths))


def test_the_papers_linear_widths_fit_closely():
    """w_j = 48 (j + 1), 0 <= j <= 20 (the paper's best AnyNetX_E trend) in 4 stages."""
    widths = [48 * (j + 1) for j in range(21)]
    fit = fit_stages([96, 288, 576, 960], [3, 5, 6, 7])
    assert fit is not None and len(fit.stage_widths) == 4
    assert fit.e_fit < e_fit(widths, [96] * 3 + [288] * 5 + [576] * 6 + [960] * 7) + 0.15


def test_regnet_widths_are_archc_regnet():
    per_block, widths, depths, groups = regnet_widths(22, 24, 24.48, 2.54, 8, 1.0, 16)
    assert widths == [32, 64, 160, 384] and depths == [1, 2, 7, 12] and groups == [16] * 4
    assert per_block == [32] + [64] * 2 + [160] * 7 + [384] * 12


def test_cli_fit_of_a_spec(tmp_path, capsys):
    out = tmp_path / "fit.yaml"
    assert main(["space", "fit", str(ROOT / "specs/regnetx_400mf.yaml"), "-o", str(out)]) == 0
    assert "e_fit = 0.0000" in capsys.readouterr().err
    fitted = spec_from_mapping(yaml.safe_load(out.read_text()))
    original = load_spec(ROOT / "specs/regnetx_400mf.yaml")
    assert stage_tuples(fitted.stages()) == stage_tuples(original.stages())


def test_cli_fit_of_a_samples_file(tmp_path, capsys):
    samples = tmp_path / "s.jsonl"
    assert main(["space", "sample", str(ROOT / "spaces/anynetx_d.yaml"), "-n", "3", "-o",
                 str(samples)]) == 0
    out = tmp_path / "fits.jsonl"
    assert main(["space", "fit", str(samples), "-o", str(out)]) == 0
    fits = [json.loads(line) for line in out.read_text().splitlines()]
    assert [f["id"] for f in fits] == ["anynetx_d_0000", "anynetx_d_0001", "anynetx_d_0002"]
    for entry in fits:
        if entry["e_fit"] is not None:
            spec_from_mapping(entry["spec"])
    assert "e_fit: median" in capsys.readouterr().err


def test_cli_fit_of_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "spec": {"name": "x"}}\n')
    assert main(["space", "fit", str(bad), "-o", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}:line 1: the spec is not valid")
    assert not (tmp_path / "o.jsonl").exists()
