"""`archc space analyze` (archc.space.report) on small results files written here: the report
folder (plots, summaries), the summary's error statistics and bootstraps and the plotted EDFs
against archc.space.stats computed directly, two spaces side by side, failed models, and a bad
results file as one line and exit 2."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from archc.cli.main import main
from archc.space import stats
from archc.space.report import load_results, plot_edfs

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "specs/regnetx_200mf.yaml").read_text())
RESAMPLES, SEED, FRACTION, BINS = 300, 4, 0.25, 5


def _record(space: str, index: int, rng: np.random.Generator) -> dict:
    """One result line of a RegNet model, its parameters and error drawn from `rng`."""
    body = {"depth": int(rng.integers(10, 21)), "w0": int(rng.choice([16, 24, 32, 48])),
            "wa": round(float(rng.uniform(20, 40)), 1),
            "wm": round(float(rng.uniform(2.2, 2.8)), 3),
            "group_width": int(rng.choice([8, 16, 24]))}
    spec = copy.deepcopy(BASE)
    spec["body"].update(body)
    return {"id": f"{space}_{index:04d}", "space": space, "index": index, "spec": spec,
            "complexity": {"flops": int(rng.integers(150, 450)) * 10**6,
                           "params": int(rng.integers(2, 6)) * 10**6,
                           "acts": int(rng.integers(1, 4)) * 10**6},
            "parameters": {f"body.{key}": value for key, value in body.items()}
            | {"head.dropout": round(float(rng.uniform(0, 0.3)), 2)},  # a drawn extra
            "best_error": round(float(rng.uniform(20, 60)), 2)}


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _space(tmp_path: Path, name: str, n: int = 16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return _write(tmp_path / f"{name}.jsonl", [_record(name, i, rng) for i in range(n)])


def _analyze(results: list[Path], out: Path) -> int:
    return main(["space", "analyze", *map(str, results), "-o", str(out), "--resamples",
                 str(RESAMPLES), "--seed", str(SEED), "--fraction", str(FRACTION), "--bins",
                 str(BINS)])


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_report_folder(tmp_path, capsys):
    results = _space(tmp_path, "alpha")
    out = tmp_path / "report"
    assert _analyze([results], out) == 0
    plots = [f"{name}.{kind}" for name in ("edf", "edf_normalized", "trends")
             for kind in ("png", "svg")]
    assert sorted(p.name for p in out.iterdir()) == sorted([*plots, "summary.json",
                                                            "summary.md"])
    for plot in plots:
        content = (out / plot).read_bytes()
        if plot.endswith(".png"):
            assert content.startswith(b"\x89PNG")
        else:
            assert content.startswith(b"<?xml") and b"<svg" in content
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plots"] == plots
    errors = np.array([r["best_error"] for r in _lines(results)])
    printed = capsys.readouterr().out.splitlines()
    ordered = np.sort(errors)  # 16 models: the 4th and 13th errors hold the median (97.9%)
    assert printed == [
        f"alpha: 16 models (0 failed), error min {errors.min():.2f} mean {errors.mean():.2f} "
        f"median {np.median(errors):.2f} [95%: {ordered[3]:.2f}, {ordered[12]:.2f}]",
        f"wrote {out}/: {', '.join(plots)}, summary.json, summary.md"]
    text = (out / "summary.md").read_text()
    assert text.startswith("# Sweep analysis")
    assert f"| alpha | 16 | 0 | {errors.min():.2f} | {errors.mean():.2f} |" in text
    assert "| head.dropout | " in text and "| wm | " in text


def _metric_columns(records: list[dict]) -> dict[str, np.ndarray]:
    """The analysed parameters, read straight from the result lines (report's docstring)."""
    body = [r["spec"]["body"] for r in records]
    columns = {"d": [b["depth"] for b in body], "w0": [b["w0"] for b in body],
               "wa": [b["wa"] for b in body], "wm": [b["wm"] for b in body],
               "b": [b["bottleneck_ratio"] for b in body], "g": [b["group_width"] for b in body],
               "head.dropout": [r["parameters"]["head.dropout"] for r in records]}
    for name in ("flops", "params", "acts"):
        columns[name] = [r["complexity"][name] for r in records]
    return {name: np.asarray(values, dtype=np.float64) for name, values in columns.items()}


def test_summary_numbers_are_the_statistics_of_the_results(tmp_path):
    results = _space(tmp_path, "alpha")
    assert _analyze([results], tmp_path / "report") == 0
    summary = json.loads((tmp_path / "report/summary.json").read_text())
    assert (summary["resamples"], summary["seed"], summary["fraction"], summary["bins"]) == (
        RESAMPLES, SEED, FRACTION, BINS)
    (space,) = summary["spaces"]
    records = _lines(results)
    errors = np.array([r["best_error"] for r in records])
    band = space["error"].pop("median_interval")
    assert band == list(stats.median_interval(errors))
    assert space["error"] == pytest.approx({"min": errors.min(), "mean": errors.mean(),
                                            "median": np.median(errors), "max": errors.max()})
    best = records[int(np.argmin(errors))]
    assert space["best"] == {"id": best["id"], "error": best["best_error"], **best["complexity"]}
    columns = _metric_columns(records)
    assert set(space["bootstrap"]) == set(columns)
    for name, values in columns.items():
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([SEED, 0])))
        low, median, high = stats.bootstrap_best({name: values}, errors, rng, FRACTION,
                                                 RESAMPLES)[name]
        assert space["bootstrap"][name] == {"low": low, "median": median, "high": high,
                                            "models": len(records)}, name
        assert values.min() <= low <= median <= high <= values.max()


def _shifted(path: Path, factor: float) -> Path:
    """The results file with every model's flops multiplied by `factor`."""
    records = _lines(path)
    for record in records:
        record["complexity"]["flops"] = int(record["complexity"]["flops"] * factor)
    return _write(path, records)


def test_plotted_edfs_are_the_statistics_edfs(tmp_path):
    """The normalized EDFs keep the models in the bins both spaces occupy (beta's flops are
    shifted up, so some of alpha's lowest and beta's highest are dropped)."""
    paths = [_space(tmp_path, "alpha", seed=0), _shifted(_space(tmp_path, "beta", n=11, seed=1),
                                                         1.6)]
    spaces = load_results(paths)
    records = [_lines(path) for path in paths]
    errors = [np.array([r["best_error"] for r in rs]) for rs in records]
    flops = [np.array([r["complexity"]["flops"] for r in rs], dtype=float) for rs in records]
    edges = stats.log_bins(flops, BINS)
    common = stats.common_bins(flops, edges)
    assert 0 < common.sum() < BINS
    for normalized in (False, True):
        lines = plot_edfs(spaces, BINS, normalized).axes[0].get_lines()
        assert len(lines) == 2
        for line, space_errors, space_flops in zip(lines, errors, flops):
            weights = None
            if normalized:
                weights = stats.normalized_weights(space_flops, edges, common)
                space_errors, weights = space_errors[weights > 0], weights[weights > 0]
                assert len(space_errors) < len(space_flops)
            x, cumulative = stats.edf(space_errors, weights)
            np.testing.assert_array_equal(line.get_xdata(), np.concatenate([[x[0]], x]))
            np.testing.assert_allclose(line.get_ydata(), np.concatenate([[0.0], cumulative]))
            assert line.get_ydata()[-1] == pytest.approx(1.0)
            assert line.get_label().endswith(
                f"{len(x)} | {x.min():.1f} | {space_errors.mean():.1f}")


def test_two_spaces_side_by_side(tmp_path, capsys):
    alpha, beta = _space(tmp_path, "alpha", seed=0), _space(tmp_path, "beta", n=11, seed=1)
    out = tmp_path / "report"
    assert _analyze([alpha, beta], out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["label"], s["n"], s["files"]) for s in summary["spaces"]] == [
        ("alpha", 16, [str(alpha)]), ("beta", 11, [str(beta)])]
    beta_errors = np.array([r["best_error"] for r in _lines(beta)])
    values = _metric_columns(_lines(beta))["wa"]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([SEED, 1])))  # 2nd space
    low, median, high = stats.bootstrap_best({"wa": values}, beta_errors, rng, FRACTION,
                                             RESAMPLES)["wa"]
    assert summary["spaces"][1]["bootstrap"]["wa"] == {"low": low, "median": median,
                                                       "high": high, "models": 11}
    text = (out / "summary.md").read_text()
    assert "| parameter | alpha | beta |" in text and "|---|---|---|" in text
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed[:2]] == ["alpha", "beta"]


def test_each_pair_of_spaces_is_tested(tmp_path, capsys):
    """summary.json, summary.md and the printed lines carry, per pair, the exact KS test of the
    error EDFs and the permutation test of the normalized EDFs, computed here directly."""
    paths = [_space(tmp_path, "alpha", seed=0), _shifted(_space(tmp_path, "beta", n=11, seed=1),
                                                         1.6), _space(tmp_path, "gamma", seed=2)]
    out = tmp_path / "report"
    assert main(["space", "analyze", *map(str, paths), "-o", str(out), "--resamples", "50",
                 "--bins", str(BINS), "--seed", str(SEED), "--permutations", "400"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    records = [_lines(path) for path in paths]
    errors = [np.array([r["best_error"] for r in rs]) for rs in records]
    flops = [np.array([r["complexity"]["flops"] for r in rs], dtype=float) for rs in records]
    edges = stats.log_bins(flops, BINS)
    common = stats.common_bins(flops, edges)
    assert summary["common_bins"] == common.sum() and summary["permutations"] == 400
    kept = []
    for space, space_flops, space_errors in zip(summary["spaces"], flops, errors):
        weights = stats.normalized_weights(space_flops, edges, common)
        keep = weights > 0
        assert space["normalized"] == {"kept": int(keep.sum()), "dropped": int((~keep).sum())}
        kept.append((space_errors[keep], weights[keep], stats.bin_index(space_flops, edges)[keep]))
    assert sum(space["normalized"]["dropped"] for space in summary["spaces"]) > 0
    pairs = [(0, 1), (0, 2), (1, 2)]
    assert [c["spaces"] for c in summary["comparisons"]] == [
        [summary["spaces"][i]["label"], summary["spaces"][j]["label"]] for i, j in pairs]
    printed = capsys.readouterr().out.splitlines()
    for (i, j), comparison in zip(pairs, summary["comparisons"]):
        statistic, p = stats.ks_two_sample(errors[i], errors[j])
        assert comparison["edf"] == {"statistic": statistic, "p": p,
                                     "n": [len(errors[i]), len(errors[j])]}
        generator = np.random.Generator(np.random.PCG64(
            np.random.SeedSequence([SEED, i, j], spawn_key=(1,))))
        statistic, p = stats.stratified_permutation_test(*kept[i], *kept[j], generator, 400)
        assert comparison["normalized_edf"] == {
            "statistic": statistic, "p": p, "n": [len(kept[i][0]), len(kept[j][0])],
            "permutations": 400}
        raw = comparison["edf"]
        verdict = "differ" if raw["p"] < 0.05 else "cannot be told apart"
        line = next(line for line in printed if line.startswith(" vs ".join(
            comparison["spaces"]) + ":"))
        assert (f"error EDFs D = {raw['statistic']:.3f}, p = {raw['p']:.3g} (n = "
                f"{raw['n'][0]}, {raw['n'][1]}): {verdict} at the 5% level; normalized EDFs D = "
                f"{statistic:.3f}, p = {p:.3g}") in line
    dropped = ", ".join(f"{s['normalized']['dropped']} of {s['label']}"
                        for s in summary["spaces"] if s["normalized"]["dropped"])
    assert (f"normalized EDFs: {common.sum()} of {BINS} flops bins common; models dropped: "
            f"{dropped}") in printed
    text = (out / "summary.md").read_text()
    assert "## Do the spaces differ?" in text and "| alpha vs beta | 16, 11 |" in text
    assert f"| beta | {summary['spaces'][1]['normalized']['kept']} | " in text


def test_spaces_without_a_common_bin_are_not_compared_normalized(tmp_path, capsys):
    paths = [_space(tmp_path, "alpha", seed=0), _shifted(_space(tmp_path, "beta", seed=1), 10)]
    assert _analyze(paths, tmp_path / "report") == 0
    summary = json.loads((tmp_path / "report/summary.json").read_text())
    assert summary["common_bins"] == 0
    assert [s["normalized"] for s in summary["spaces"]] == [{"kept": 0, "dropped": 16}] * 2
    (comparison,) = summary["comparisons"]
    assert comparison["normalized_edf"] is None and comparison["edf"]["n"] == [16, 16]
    assert "normalized EDFs not compared (no common flops bin)" in capsys.readouterr().out


def test_two_files_of_one_space_keep_apart(tmp_path):
    rng = np.random.default_rng(0)
    first = _write(tmp_path / "first.jsonl", [_record("alpha", i, rng) for i in range(4)])
    second = _write(tmp_path / "second.jsonl", [_record("alpha", i, rng) for i in range(4)])
    assert [s.label for s in load_results([first, second])] == ["alpha (first)",
                                                                "alpha (second)"]


def test_failed_models_are_counted_and_left_out(tmp_path, capsys):
    rng = np.random.default_rng(0)
    records = [_record("alpha", i, rng) for i in range(6)]
    records[1] |= {"failed": True, "best_error": None}
    records[4]["best_error"] = None
    results = _write(tmp_path / "alpha.jsonl", records)
    assert _analyze([results], tmp_path / "report") == 0
    (space,) = json.loads((tmp_path / "report/summary.json").read_text())["spaces"]
    kept = [r["best_error"] for i, r in enumerate(records) if i not in (1, 4)]
    assert (space["n"], space["failed"]) == (4, 2)
    assert space["error"]["mean"] == pytest.approx(np.mean(kept))
    assert "alpha: 4 models (2 failed)" in capsys.readouterr().out


def _bad(tmp_path: Path, case: str) -> Path:
    """A results file that cannot be analysed, for the `case` of `BAD`."""
    rng = np.random.default_rng(0)
    good = [_record("alpha", i, rng) for i in range(3)]
    path = tmp_path / "results.jsonl"
    if case == "missing":
        return path
    if case == "not_json":
        path.write_text(json.dumps(good[0]) + "\n{not json\n" + json.dumps(good[1]) + "\n")
    elif case == "no_error":
        del good[1]["best_error"]
    elif case == "error_not_a_number":
        good[2]["best_error"] = "low"
    elif case == "all_failed":
        for record in good:
            record["failed"] = True
    elif case == "invalid_spec":
        good[0]["spec"]["body"]["depth"] = -2
    if not path.exists():
        _write(path, good)
    return path


BAD = {"missing": "no such results file",
       "not_json": "line 2: not a JSON line",
       "no_error": "line 2: not a result line (no spec or best_error)",
       "error_not_a_number": "line 3: best_error is not a number",
       "all_failed": "no trained models to analyze",
       "invalid_spec": "line 1:body.depth: the spec is not valid"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_results_file_is_one_line_and_exit_2(tmp_path, capsys, case):
    path, out = _bad(tmp_path, case), tmp_path / "report"
    assert _analyze([path], out) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}") and BAD[case] in err[0], err
    assert "Traceback" not in captured.err and captured.out == ""
    assert not out.exists()


def test_a_rerun_writes_into_its_own_report_folder(tmp_path, capsys):
    """`-o DIR` is a folder: a second analyze into the folder the first one made replaces its
    files; an existing file as `-o` is one line and exit 2, before any work."""
    results, report = _space(tmp_path, "alpha", n=8), tmp_path / "report"
    assert _analyze([results], report) == 0
    first = (report / "summary.json").read_text()
    assert _analyze([results], report) == 0
    assert (report / "summary.json").read_text() == first
    capsys.readouterr()
    (tmp_path / "afile").write_text("")
    assert _analyze([results], tmp_path / "afile") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "afile is a file" in err[0], err
