"""Malformed specs: one line `error: <file>:<field path>: <what>`, exit 2, no output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from archc.cli.main import main

BAD = Path(__file__).resolve().parents[1] / "bad_specs"

# file -> (field path, a phrase the message must contain)
EXPECTED = {
    "yaml_syntax.yaml": ("line 5", "invalid YAML"),
    "trainform_groups_do_not_divide.yaml": ("body.stages[0].width",
                                            "not divisible by the 3 groups"),
    "json_syntax.json": ("line 1", "invalid JSON"),
    "duplicate_key.yaml": ("line 2", "duplicate key 'name'"),
    "not_a_mapping.yaml": ("<root>", "must be a mapping"),
    "empty_file.yaml": ("<root>", "must be a mapping"),
    "missing_body.yaml": ("body", "missing"),
    "body_without_type.yaml": ("body", "needs a 'type'"),
    "unknown_body_type.yaml": ("body.type", "unknown body type 'resnet'"),
    "misspelt_top_key.yaml": ("nmae", "did you mean 'name'"),
    "misspelt_regnet_key.yaml": ("body.w_0", "did you mean 'w0'"),
    "misspelt_stage_key.yaml": ("body.stages[0].strides", "did you mean 'stride'"),
    "wm_not_above_one.yaml": ("body.wm", "greater than 1"),
    "wm_nan.yaml": ("body.wm", "finite"),
    "w0_not_multiple_of_q.yaml": ("body.w0", "not a multiple of q = 8"),
    "depth_wrong_type.yaml": ("body.depth", "integer"),
    "negative_wa.yaml": ("body.wa", "greater than or equal to 0"),
    "regnet_too_few_stages.yaml": ("body", "give 2 stages"),
    "both_bottleneck_forms.yaml": ("body", "not both"),
    "anynet_width_not_divisible.yaml": (
        "body.stages[1].group_width",
        "not divisible by group_width 24",
    ),
    "unknown_block.yaml": ("body.stages[0].block", "did you mean 'res_bottleneck'"),
    "field_unused_by_block.yaml": ("body.stages[0].se_ratio", "does not use"),
    "zero_depth_stage.yaml": ("body.stages[0].depth", "greater than or equal to 1"),
    "empty_stages.yaml": ("body.stages", "at least 1"),
    "stage_not_a_mapping.yaml": ("body.stages[0]", "mapping"),
    "bool_for_int.yaml": ("num_classes", "integer"),
    "json_string_for_float.json": ("body.wm", "number"),
    "unknown_stem_type.yaml": ("stem.type", "'repvit', 'vanillanet' or 'none'"),
    "dropout_out_of_range.yaml": ("head.dropout", "less than 1"),
    "invalid_name.yaml": ("name", "pattern"),
    "input_size_zero.yaml": ("input.size", "greater than or equal to 8"),
    "shufflenet_v2_odd_width.yaml": ("body.stages[0].width", "width 117 is odd"),
    "shufflenet_v1_groups.yaml": (
        "body.stages[0].groups",
        "bottleneck width 60 is not a positive multiple of groups 8",
    ),
    "shufflenet_stride1_width.yaml": ("body.stages[1].width", "must equal the input width 48"),
    "groups_and_group_width.yaml": ("body.stages[0].groups", "not both"),
    "se_gate_without_se.yaml": ("body.stages[0].se_gate", "set se_ratio > 0"),
    "head_activation_without_width.yaml": ("head.activation", "give width"),
    "width_divisor_without_multiplier.yaml": ("body.width_divisor", "give width_multiplier"),
    "kernel_even.yaml": ("body.stages[0].kernel", "kernel 4 is even"),
    "conv_padding_too_large.yaml": ("body.stages[0].padding", "more than half the kernel 3"),
    "conv_groups.yaml": ("body.stages[0].groups", "input width 3 is not divisible by groups 2"),
    "pool_padding_too_large.yaml": ("body.stages[0].pool.padding", "more than half the window"),
    "misspelt_pool_key.yaml": ("body.stages[0].pool.kernal", "did you mean 'kernel'"),
    "se_activation_without_se.yaml": ("body.stages[0].se_activation", "set se_ratio > 0"),
    "se_position_unused.yaml": ("body.stages[0].se_position", "does not use"),
    "remove_activations_with_se.yaml": ("body.stages[0].remove_activations",
                                        "not linear without its activations"),
    "layer_scale_not_positive.yaml": ("body.stages[0].layer_scale", "greater than 0"),
    "repmixer_width.yaml": ("body.stages[0].width", "not a multiple of the input width 48"),
    "compound_and_width_multiplier.yaml": ("body.compound_scaling", "not both"),
    "compound_scaling_missing_depth.yaml": ("body.compound_scaling.depth", "missing"),
    "drop_path_without_residual.yaml": ("body.drop_path_rate", "a residual branch to drop"),
    "activation_lambda_unused.yaml": ("activation_lambda", "no vanillanet stem, block or head"),
    "vanillanet_without_lambda.yaml": ("activation_lambda", "give activation_lambda"),
    "activation_lambda_above_one.yaml": ("activation_lambda", "less than or equal to 1"),
    "stem_field_of_other_type.yaml": ("stem", "a stem of type fastvit has no stride"),
    "repvit_stem_odd_width.yaml": ("stem.width", "width 45 is odd"),
    "repvit_width.yaml": ("body.stages[0].width", "must equal the input width 48"),
    "hidden_dropout_without_hidden.yaml": ("head.hidden_dropout", "give hidden"),
    "conv_classifier_with_width.yaml": ("head", "a head of type conv_classifier has no width"),
    "fire_stride.yaml": ("body.stages[0].stride", "a fire module has stride 1"),
    "fire_odd_width.yaml": ("body.stages[0].width", "width 129 is odd"),
    "mobileone_unit_group_width.yaml": ("body.stages[0].group_width",
                                        "not divisible by group_width 5"),
    "hidden_width_zero.yaml": ("head.hidden[1]", "greater than or equal to 1"),
    "bn_eps_not_positive.yaml": ("bn.eps", "greater than 0"),
    "bn_momentum_above_one.yaml": ("body.stages[0].bn.momentum", "less than or equal to 1"),
    "bn_eps_as_string.yaml": ("bn.eps", "write 1.0e-3, not 1e-3"),
    "misspelt_bn_key.yaml": ("bn.epsilon", "did you mean 'eps'"),
    "bn_on_block_without_batch_norm.yaml": ("body.stages[0].bn", "block 'conv' does not use"),
    "bn_without_batch_norm.yaml": ("bn", "no stem, block or head of this network has BatchNorm"),
}


def test_corpus_is_complete():
    assert sorted(p.name for p in BAD.iterdir()) == sorted(EXPECTED)
    assert len(EXPECTED) >= 20


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("command", ["info", "build"])
def test_malformed_spec_gives_one_line_and_exit_2(name, command, tmp_path, capsys):
    path = BAD / name
    output = tmp_path / "model.onnx"
    argv = [command, str(path)] + (["-o", str(output)] if command == "build" else [])
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    field, phrase = EXPECTED[name]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"error: {path}:{field}: "), lines[0]
    assert phrase in lines[0]
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["misspelt_regnet_key.yaml", "anynet_width_not_divisible.yaml"])
def test_malformed_spec_in_a_real_process(name, tmp_path):
    output = tmp_path / "model.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "archc", "build", str(BAD / name), "-o", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not output.exists() and list(tmp_path.iterdir()) == []


def test_missing_file(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope.yaml'}: no such file"


def test_unknown_output_extension_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["build", "specs/regnetx_600mf.yaml", "-o", "model.tflite"])
    assert exit_info.value.code == 2
    assert "cannot tell the format" in capsys.readouterr().err
