"""The quantized linear fit (archc.space.fit): every zoo RegNet's widths fit back to themselves
exactly, fits of AnyNet models are valid RegNets of the same depth and stages, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from archc.cli.main import main
from archc.frontend.analytic_complexity import spec_complexity
from archc.frontend.loading import load_spec, spec_from_mapping
from archc.space.design_space import load_space
from archc.space.fit import LARGE_CHANGE, e_fit, fit_changes, fit_spec, fit_stages, regnet_widths

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
    changes = fit_changes(spec, rebuilt)
    assert changes["stages"] == {} and changes["large"] == []
    assert all(c["before"] == c["after"] and c["relative"] == 0
               for c in changes["complexity"].values())


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


def fit_report(capsys, source: Path, *options: str) -> tuple[dict, list[str]]:
    """(the --json report, the stderr lines) of `archc space fit SOURCE --json`."""
    assert main(["space", "fit", str(source), "--json", *options]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err.splitlines()


def test_the_fit_of_resnet50_says_what_changed(capsys):
    """ResNet-50 (4.09 GF) has a stride-1 first stage; the RegNet has stride 2 everywhere, so the
    fit has about a quarter of the flops: said per stage field, by complexity, and in one
    warning line."""
    report, err = fit_report(capsys, ROOT / "specs/resnet50.yaml")
    changes = report["changes"]
    fitted = spec_from_mapping(report["spec"])
    assert changes["stages"]["stride"] == {"before": [1, 2, 2, 2], "after": [2, 2, 2, 2]}
    assert changes["stages"]["depth"] == {"before": [3, 4, 6, 3],
                                          "after": [s.depth for s in fitted.stages()]}
    flops = changes["complexity"]["flops"]
    assert flops["before"] == 4_089_185_256  # the spec's 4.09 GFLOPs
    assert flops["after"] == spec_complexity(fitted)[0]
    assert flops["relative"] == pytest.approx(flops["after"] / flops["before"] - 1)
    assert flops["relative"] < -LARGE_CHANGE
    assert f"flops {flops['relative']:+.1%} (beyond ±25%)" in changes["large"]
    assert "    stride: [1, 2, 2, 2] -> 2 (every stage)" in err
    assert f"    flops: 4,089.2M -> {flops['after'] / 1e6:,.1f}M ({flops['relative']:+.1%})" in err
    warnings = [line for line in err if line.startswith("warning:")]
    assert warnings == ["warning: the fitted RegNet is a different network: "
                        + "; ".join(changes["large"])]


def test_a_dense_source_stays_dense():
    """ResNet-50's convs are dense: the fit takes a group width no stage's bottleneck exceeds
    (not the first stage's 64, which would give the later stages 2, 4 and 8 groups)."""
    spec = load_spec(ROOT / "specs/resnet50.yaml")
    _, fitted = fit_spec(spec)
    rebuilt = spec_from_mapping(fitted)
    assert [s.width // 4 for s in rebuilt.stages()] == [s.group_width for s in rebuilt.stages()]
    changes = fit_changes(spec, rebuilt)
    assert "groups" not in changes["stages"] and "group_width" not in changes["stages"]


def test_a_change_of_group_width_and_block_type_is_said(capsys):
    """ResNeXt's 32 groups become one shared group width; MobileOne-S1's mobileone_unit stem
    stage becomes a mobileone stage, which a RegNet cannot express otherwise."""
    report, err = fit_report(capsys, ROOT / "specs/resnext50_32x4d.yaml")
    groups = report["changes"]["stages"]["groups"]
    assert groups["before"] == [32] * 4 and len(set(groups["after"])) > 1
    assert report["changes"]["stages"]["group_width"]["before"] == [4, 8, 16, 32]
    assert "    groups: 32 (every stage) -> [" in "\n".join(err)
    report, err = fit_report(capsys, ROOT / "specs/mobileone_s1.yaml")
    assert report["changes"]["stages"]["block"]["before"][:2] == ["mobileone_unit", "mobileone"]
    reason = "one block type, mobileone, for stages of mobileone, mobileone_unit"
    assert reason in report["changes"]["large"]
    assert sum(line.startswith("warning:") and reason in line for line in err) == 1


def test_fields_a_regnet_cannot_carry_are_said(capsys):
    report, _ = fit_report(capsys, ROOT / "specs/mobilenet_v2.yaml")
    stages = report["changes"]["stages"]
    assert stages["expansion"]["after"] == [1.0] * len(stages["expansion"]["after"])
    assert any(reason.startswith("activation, expansion") and reason.endswith("default")
               for reason in report["changes"]["large"])


def test_a_close_fit_has_no_warning(capsys):
    """ShuffleNetV2 x0.5 refits with one depth moved and flops within 1%: no warning."""
    report, err = fit_report(capsys, ROOT / "specs/shufflenet_v2_x0_5.yaml")
    assert report["changes"]["large"] == [] and list(report["changes"]["stages"]) == ["depth"]
    assert not any(line.startswith("warning:") for line in err)


def test_the_fit_keeps_the_specs_other_fields():
    """VanillaNet's activation_lambda (a top-level field) is kept: the fit is a valid spec."""
    spec = load_spec(ROOT / "specs/vanillanet_5.yaml")
    _, fitted = fit_spec(spec)
    assert spec_from_mapping(fitted).activation_lambda == spec.activation_lambda


def test_fit_quiet_and_json(tmp_path, capsys):
    """--quiet: only the spec (the product) on stdout; -o with --quiet: nothing; --json: one
    document holding the fitted spec, with the notes on stderr unless --quiet."""
    source = str(ROOT / "specs/resnet50.yaml")
    assert main(["space", "fit", source, "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and yaml.safe_load(captured.out)["name"] == "resnet50_fit"
    assert main(["space", "fit", source, "-q", "-o", str(tmp_path / "f.yaml")]) == 0
    assert capsys.readouterr() == ("", "")
    assert main(["space", "fit", source, "-q", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and json.loads(captured.out)["spec"]["name"] == "resnet50_fit"


def test_fits_of_a_samples_file_carry_their_changes(tmp_path, capsys):
    samples = tmp_path / "s.jsonl"
    assert main(["space", "sample", str(ROOT / "spaces/anynetx_e.yaml"), "-n", "4", "-o",
                 str(samples), "-q"]) == 0
    report, err = fit_report(capsys, samples)
    fitted = [entry for entry in report["fits"] if entry["e_fit"] is not None]
    assert fitted
    for entry, line in zip(report["fits"], samples.read_text().splitlines()):
        if entry["e_fit"] is None:
            continue
        source = spec_from_mapping(json.loads(line)["spec"])
        assert entry["changes"] == fit_changes(source, spec_from_mapping(entry["spec"]))
    different = sum(bool(entry["changes"]["large"]) for entry in fitted)
    assert any(line.startswith(f"{different} of {len(fitted)} fitted RegNet") for line in err)
