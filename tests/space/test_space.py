"""Space files and the sampler: the shipped spaces state the paper's ranges, every sample is a
valid spec inside the window with its constraints holding (property tests over seeds), the same
seed gives a byte-identical samples file, and a bad space file gives one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archc.cli.main import main
from archc.frontend.loading import spec_from_mapping
from archc.space.design_space import SamplingStats, load_space
from archc.space.records import read_records

ROOT = Path(__file__).resolve().parents[2]
SPACES = sorted(p.stem for p in (ROOT / "spaces").glob("*.yaml"))
BAD = Path(__file__).resolve().parents[1] / "bad_spaces"


def test_every_space_of_the_paper_is_shipped():
    assert SPACES == ["anynetx_a", "anynetx_b", "anynetx_c", "anynetx_d", "anynetx_e",
                      "anynetxy", "regnetx", "regnety"]


def law(space, path):
    return space.schema.parameters[path]


def test_anynet_spaces_state_the_papers_ranges():
    shared = {"anynetx_a": set(), "anynetx_b": {"bottleneck_ratio"},
              "anynetx_c": {"bottleneck_ratio", "group_width"}}
    for name in ("anynetx_a", "anynetx_b", "anynetx_c", "anynetx_d", "anynetx_e", "anynetxy"):
        space = load_space(ROOT / "spaces" / f"{name}.yaml")
        depth = law(space, "body.stages[*].depth")
        width = law(space, "body.stages[*].width")
        ratio = law(space, "body.stages[*].bottleneck_ratio")
        group = law(space, "body.stages[*].group_width")
        assert (depth.kind, depth.low, depth.high, depth.quantum) == ("log_uniform", 1, 16, 1)
        assert (width.kind, width.low, width.high, width.quantum) == ("log_uniform", 8, 1024, 8)
        assert ratio.law()[0].tolist() == [1, 2, 4]
        assert group.law()[0].tolist() == [1, 2, 4, 8, 16, 32]
        expected = shared.get(name, {"bottleneck_ratio", "group_width"})
        assert {p.split(".")[-1] for p, l in space.schema.parameters.items() if l.shared} == (
            expected | ({"se_ratio"} if name == "anynetxy" else set()))
        monotonic = {"anynetx_d": ["width"], "anynetx_e": ["width", "depth"],
                     "anynetxy": ["width", "depth"]}.get(name, [])
        assert [p.leaf for p in space.monotonic] == monotonic
        assert space.schema.window.flops == [360_000_000, 400_000_000]
        assert space.stage_count == 4


def test_regnet_spaces_state_the_papers_ranges():
    for name, se in (("regnetx", 0.0), ("regnety", 0.25)):
        space = load_space(ROOT / "spaces" / f"{name}.yaml")
        laws = {p.split(".")[-1]: (l.kind, l.low, l.high, l.quantum)
                for p, l in space.schema.parameters.items()}
        assert laws == {"depth": ("uniform", 12, 28, 1), "w0": ("log_uniform", 8, 256, 8),
                        "wa": ("log_uniform", 8.0, 256.0, 0.1),
                        "wm": ("log_uniform", 2.0, 3.0, 0.001),
                        "group_width": ("power2_or_log_uniform", 8, 128, 8)}
        assert space.schema.base["body"]["bottleneck_ratio"] == 1
        assert space.schema.base["body"].get("se_ratio", 0.0) == se
        assert space.schema.window.flops == [360_000_000, 400_000_000]


@pytest.fixture(scope="module")
def spaces():
    return {name: load_space(ROOT / "spaces" / f"{name}.yaml") for name in SPACES}


def assert_constraints_hold(space, sample):
    spec = spec_from_mapping(sample.spec)  # every sample is a valid spec
    assert spec.name == sample.id
    for name, bounds in space.schema.window.model_dump().items():
        if bounds is not None:
            assert bounds[0] <= sample.complexity[name] <= bounds[1]
    stages = spec.stages()
    for path, distribution in space.schema.parameters.items():
        if not distribution.shared:
            continue
        leaf, drawn = path.split(".")[-1], sample.parameters[path]
        for stage in stages:  # b_i = b, g_i = g (also after the group adjustment), one SE ratio
            assert getattr(stage, leaf) == drawn, path
    for path in space.monotonic:
        values = [getattr(stage, path.leaf) for stage in stages]
        assert values == sorted(values), (path.text, values)
    if spec.body.type == "regnet":
        assert len(stages) == 4


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_constraints_always_hold(spaces, seed):
    for name in ("anynetx_b", "anynetx_e", "anynetxy", "regnety"):
        space = spaces[name]
        for sample in space.samples(3, seed):
            assert_constraints_hold(space, sample)


@pytest.mark.parametrize("name", SPACES)
def test_samples_of_every_space_are_valid(spaces, name):
    stats = SamplingStats()
    samples = list(spaces[name].samples(12, 7, stats))
    assert [s.index for s in samples] == list(range(12)) and stats.accepted == 12
    assert sum(stats.rejected.values()) == stats.tries - 12
    for sample in samples:
        assert_constraints_hold(spaces[name], sample)


def widths_changed(sample) -> bool:
    return [s["width"] for s in sample.spec["body"]["stages"]] != sample.parameters[
        "body.stages[*].width"]


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_a_shared_group_width_stays_shared(spaces, seed):
    """AnyNetX_C, D and E: after the group adjustment every model has one group width, the drawn
    one, and the adjustment count is the number of models whose widths differ from the draw."""
    for name in ("anynetx_c", "anynetx_d", "anynetx_e"):
        stats = SamplingStats()
        samples = list(spaces[name].samples(4, seed, stats))
        for sample in samples:
            groups = {stage["group_width"] for stage in sample.spec["body"]["stages"]}
            assert groups == {sample.parameters["body.stages[*].group_width"]}, name
        assert stats.adjusted == sum(widths_changed(sample) for sample in samples)


def test_the_adjustment_count_of_unshared_group_widths(spaces):
    """AnyNetX_A clamps each stage's g to its bottleneck width: a model counts as changed when
    a width or a group width differs from the draw."""
    stats = SamplingStats()
    samples = list(spaces["anynetx_a"].samples(12, 3, stats))
    changed = [widths_changed(sample) or [s["group_width"] for s in sample.spec["body"]["stages"]]
               != sample.parameters["body.stages[*].group_width"] for sample in samples]
    assert stats.adjusted == sum(changed) > 0
    assert f"the group adjustment changed {sum(changed)} of the 12 accepted" in stats.summary()


def test_sample_reports_the_adjusted_models(tmp_path, capsys):
    output = tmp_path / "s.jsonl"
    assert main(["space", "sample", str(ROOT / "spaces/anynetx_c.yaml"), "-n", "8", "--seed",
                 "1", "-o", str(output)]) == 0
    records, _ = read_records(output)
    changed = sum([s["width"] for s in r["spec"]["body"]["stages"]]
                  != r["parameters"]["body.stages[*].width"] for r in records)
    err = capsys.readouterr().err
    assert f"the group adjustment changed {changed} of the 8 accepted" in err
    assert "shared group width above a stage's bottleneck width" in err
    assert main(["space", "sample", str(ROOT / "spaces/regnetx.yaml"), "-n", "2", "-o",
                 str(output)]) == 0
    assert "group adjustment" not in capsys.readouterr().err


def test_same_seed_same_bytes_different_seed_different(tmp_path, capsys):
    paths = [tmp_path / f"{i}.jsonl" for i in range(3)]
    for path, seed in zip(paths, (5, 5, 6)):
        assert main(["space", "sample", str(ROOT / "spaces/anynetx_c.yaml"), "-n", "20",
                     "--seed", str(seed), "-o", str(path)]) == 0
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()
    err = capsys.readouterr().err
    assert "acceptance rate" in err and "samples/s" in err
    records, truncated = read_records(paths[0])
    assert not truncated and len(records) == 20
    line = paths[0].read_text().splitlines()[0]
    assert line == json.dumps(json.loads(line), sort_keys=True, separators=(",", ":"))
    assert set(records[0]) == {"id", "space", "seed", "index", "spec", "complexity", "parameters"}


def test_the_stream_does_not_depend_on_n():
    space = load_space(ROOT / "spaces/regnetx.yaml")
    few = [s.spec for s in space.samples(3, 11)]
    more = [s.spec for s in space.samples(6, 11)]
    assert more[:3] == few


def test_parameter_order_in_the_file_does_not_matter(tmp_path):
    text = (ROOT / "spaces/regnetx.yaml").read_text()
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("parameters:")) + 1
    reordered = lines[:start] + lines[start:start + 5][::-1] + lines[start + 5:]
    (tmp_path / "r.yaml").write_text("".join(reordered))
    assert [s.spec for s in load_space(tmp_path / "r.yaml").samples(3, 2)] == [
        s.spec for s in load_space(ROOT / "spaces/regnetx.yaml").samples(3, 2)]


def test_set_overrides_the_space(tmp_path):
    space = load_space(ROOT / "spaces/regnetx.yaml",
                       [("base.input.size", 32), ("base.num_classes", 10),
                        ("window.flops", [3e5, 1e6]), ("window.params", None),
                        ("window.acts", None)])
    sample = next(space.samples(1, 0))
    assert sample.spec["input"]["size"] == 32 and sample.spec["num_classes"] == 10
    assert 3e5 <= sample.complexity["flops"] <= 1e6


def test_user_space_over_any_field(tmp_path):
    """Distributions over stem, head and stage fields of another block type."""
    (tmp_path / "own.yaml").write_text("""
name: own
base:
  input: {channels: 1, size: 32}
  num_classes: 10
  stem: {type: simple, width: 16}
  body:
    type: anynet
    stages:
      - {block: inverted_residual, depth: 1, width: 16, expansion: 1.0}
      - {block: inverted_residual, depth: 2, width: 24}
parameters:
  stem.width: {distribution: choice, values: [8, 16, 24]}
  head.dropout: {distribution: uniform, low: 0.0, high: 0.5, quantum: 0.1}
  body.stages[1].expansion: {distribution: choice, values: [2.0, 4.0, 6.0]}
  body.stages[*].width: {distribution: log_uniform, low: 8, high: 64, quantum: 8}
monotonic:
  - body.stages[*].width
""")
    space = load_space(tmp_path / "own.yaml")
    for sample in space.samples(10, 3):
        spec = spec_from_mapping(sample.spec)
        assert spec.stem.width in (8, 16, 24) and 0.0 <= spec.head.dropout <= 0.5
        assert spec.stages()[1].expansion in (2.0, 4.0, 6.0)
        widths = [stage.width for stage in spec.stages()]
        assert widths == sorted(widths)


# bad space files: file -> (field path, a phrase of the message)
EXPECTED = {
    "yaml_syntax.yaml": ("line 8", "invalid YAML"),
    "duplicate_key.yaml": ("line 2", "duplicate key 'name'"),
    "not_a_mapping.yaml": ("<root>", "must be a mapping"),
    "misspelt_top_key.yaml": ("nmae", "did you mean 'name'"),
    "misspelt_base_key.yaml": ("base.num_clases", "did you mean 'num_classes'"),
    "unknown_distribution.yaml": ("parameters[body.depth].distribution",
                                  "did you mean 'uniform'"),
    "no_distribution.yaml": ("parameters[body.depth].distribution", "give a distribution"),
    "misspelt_distribution_key.yaml": ("parameters[body.depth].quantun",
                                       "did you mean 'quantum'"),
    "misspelt_field_path.yaml": ("parameters[body.depht]", "did you mean 'depth'"),
    "misspelt_stage_field.yaml": ("parameters[body.stages[*].widht]", "did you mean 'width'"),
    "stage_out_of_range.yaml": ("parameters[body.stages[5].width]", "the base has 2 stages"),
    "bad_path_syntax.yaml": ("parameters[body..depth]", "not a field name"),
    "path_to_a_list.yaml": ("parameters[body.stages]", "stages[*]"),
    "low_above_high.yaml": ("parameters[body.depth].high", "below low 28"),
    "low_not_multiple.yaml": ("parameters[body.w0].low", "not a multiple of the quantum 8"),
    "power2_not_power.yaml": ("parameters[body.group_width].low", "powers of 2"),
    "float_for_int_field.yaml": ("parameters[body.depth]", "valid integer"),
    "value_out_of_field_range.yaml": ("parameters[body.wm]", "greater than 1"),
    "shared_without_stages.yaml": ("parameters[body.depth].shared", "stages[*]"),
    "monotonic_shared.yaml": ("monotonic[0]", "unshared stages[*] parameter"),
    "window_reversed.yaml": ("window", "exceeds max"),
    "empty_window.yaml": ("window", "nothing can be sampled: 2,000 tries in a row"),
    "shared_group_too_wide.yaml": ("window", "shared group width above a stage's bottleneck "
                                   "width 300"),
}


def test_every_bad_space_is_listed():
    assert sorted(p.name for p in BAD.iterdir()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_space_one_line_exit_2_no_output(name, tmp_path, capsys):
    output = tmp_path / "samples.jsonl"
    assert main(["space", "sample", str(BAD / name), "-n", "2", "-o", str(output)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    path, phrase = EXPECTED[name]
    assert len(err) == 1 and err[0].startswith(f"error: {BAD / name}:{path}: "), err
    assert phrase in err[0]
    assert not output.exists() and list(tmp_path.iterdir()) == []


def test_missing_space_file_and_bad_set(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert main(["space", "sample", str(tmp_path / "nope.yaml"), "-n", "1", "-o", str(out)]) == 2
    assert main(["space", "sample", str(ROOT / "spaces/regnetx.yaml"), "-n", "1", "-o", str(out),
                 "--set", "base.input.size=three"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"error: {tmp_path / 'nope.yaml'}: no such file"
    assert "parameters[" in err[1] or "base.input.size" in err[1]
    assert not out.exists()


def test_cli_errors_have_no_traceback():
    result = subprocess.run([sys.executable, "-m", "archc", "space", "sample",
                             str(BAD / "empty_window.yaml"), "-n", "1", "-o", "/dev/null/x"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["space", "--help"], ["space", "sample", "--help"],
                                  ["space", "sweep", "--help"], ["train", "--help"],
                                  ["eval", "x.pt"], ["space", "sample", "s.yaml", "-n", "0"]])
def test_help_and_argument_errors_do_not_import_torch(argv):
    code = ("import sys\nfrom archc.cli.main import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'numpy' in sys.modules, 'pydantic' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "False False False", result.stderr
