"""`archc space analyze`: EDFs, the complexity-normalized EDF, bootstrapped best parameter values
and trend plots of one or more sweeps, plus a JSON and a Markdown summary.

Each results file is one space (labelled by the `space` its lines share, else the file name). A
model's error is its `best_error` (the minimum validation error over epochs); failed models are
counted and left out. The parameters of a model come from its spec: for a RegNet body d, w0, wa,
wm, b (the bottleneck ratio) and g (the group width); for an AnyNet body d is the total depth,
b and g the value the stages share (else the most frequent), and w0, wa, wm and e_fit those of
the quantized linear fit of its widths (`archc.space.fit`), as the paper analyses AnyNetX_E; plus
flops, params and acts, and every numeric parameter the sampler drew for all stages at once. The
statistics are `archc.space.stats`; plots use matplotlib's Agg backend, in PNG and SVG.

The flops-normalized EDFs of all the spaces share one normalization: `--bins` log-spaced bins over
the flops of every space, weights uniform over the bins every space occupies, models in other
bins dropped (and counted). Each pair of spaces is tested for a difference: its error EDFs by the
exact two-sample Kolmogorov-Smirnov test, its normalized EDFs (as plotted) by the stratified
permutation test of the weighted KS statistic; the summary says, per pair, D, p and the sample
sizes, and whether p < ALPHA (per pair, no correction for the number of pairs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from archc.common.fileio import atomic_output
from archc.errors import SpaceError
from archc.space.records import read_records
from archc.space.stats import (
    bin_index,
    bootstrap_best,
    common_bins,
    edf,
    ks_two_sample,
    log_bins,
    median_interval,
    normalized_weights,
    stratified_permutation_test,
)

TREND_METRICS = ("d", "w0", "wa", "wm", "b", "g", "flops")
LABELS = {"d": "depth d", "w0": "w0", "wa": "wa", "wm": "wm", "b": "bottleneck ratio b",
          "g": "group width g", "flops": "flops (M)", "params": "params (M)",
          "acts": "acts (M)", "e_fit": "e_fit"}
SCALE = {"flops": 1e-6, "params": 1e-6, "acts": 1e-6}
ALPHA = 0.05  # the level at which a pair's test is said to show a difference
NAMED_PATHS = {"body.depth", "body.w0", "body.wa", "body.wm", "body.group_width",
               "body.bottleneck_ratio", "body.bottleneck_multiplier",
               "body.stages[*].bottleneck_ratio", "body.stages[*].group_width"}  # d, w0, ..., g


@dataclass
class SpaceResults:
    label: str
    files: list[str]
    ids: list[str] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)  # per model
    failed: int = 0
    truncated: int = 0  # files whose cut-short last line was skipped

    def column(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(values, errors) of the models that have metric `name`."""
        rows = [(m[name], e) for m, e in zip(self.metrics, self.errors) if name in m]
        if not rows:
            return np.empty(0), np.empty(0)
        values, errors = zip(*rows)
        return np.asarray(values, dtype=np.float64), np.asarray(errors, dtype=np.float64)

    def metric_names(self) -> list[str]:
        names = {name for m in self.metrics for name in m}
        ordered = [n for n in (*TREND_METRICS, "e_fit", "params", "acts") if n in names]
        return ordered + sorted(names - set(ordered))


def model_metrics(record: dict[str, Any], where: str) -> dict[str, float]:
    """The analysed parameters of one result line (module docstring)."""
    from archc.errors import SpecError
    from archc.frontend.spec import RegNetBody, validate_schema
    from archc.space.fit import fit_spec, shared_value

    try:
        spec = validate_schema(record["spec"], where)
    except SpecError as exc:
        raise SpaceError(f"the spec is not valid: {exc.message}", exc.path, where) from None
    metrics: dict[str, float] = {}
    body = spec.body
    if isinstance(body, RegNetBody):
        metrics.update(d=body.depth, w0=body.w0, wa=body.wa, wm=body.wm, b=1 / body.bottleneck,
                       g=body.group_width)
    else:
        stages = spec.stages()
        metrics["d"] = sum(stage.depth for stage in stages)
        metrics["b"] = shared_value([1 / stage.bottleneck for stage in stages])
        groups = [stage.group_width for stage in stages if stage.group_width]
        if groups:
            metrics["g"] = shared_value(groups)
        fit, _ = fit_spec(spec)
        if fit is not None:
            metrics.update(w0=fit.w0, wa=fit.wa, wm=fit.wm, e_fit=fit.e_fit)
    for name in ("flops", "params", "acts"):
        value = record.get("complexity", {}).get(name)
        if isinstance(value, (int, float)):
            metrics[name] = value
    for path, value in record.get("parameters", {}).items():
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if numeric and path not in NAMED_PATHS:
            metrics[path] = value
    return metrics


def load_results(paths: list[Path]) -> list[SpaceResults]:
    """One `SpaceResults` per file; `SpaceError` for unreadable files or lines."""
    spaces = []
    for path in paths:
        records, truncated = read_records(path, "results")
        labels = {r.get("space") for r in records}
        label = labels.pop() if len(labels) == 1 and None not in labels else path.stem
        space = SpaceResults(label, [str(path)], truncated=int(truncated))
        for number, record in enumerate(records, start=1):
            where = f"{path}:line {number}"
            if "spec" not in record or "best_error" not in record:
                raise SpaceError("not a result line (no spec or best_error)", f"line {number}",
                                 str(path))
            if record.get("failed") or record["best_error"] is None:
                space.failed += 1
                continue
            if not isinstance(record["best_error"], (int, float)):
                raise SpaceError("best_error is not a number", f"line {number}", str(path))
            space.ids.append(str(record.get("id", number)))
            space.errors.append(float(record["best_error"]))
            space.metrics.append(model_metrics(record, where))
        if not space.errors:
            raise SpaceError("no trained models to analyze", "", str(path))
        spaces.append(space)
    labels = [s.label for s in spaces]
    for space in spaces:  # two files of one space keep apart
        if labels.count(space.label) > 1:
            space.label = f"{space.label} ({Path(space.files[0]).stem})"
    return spaces


@dataclass
class Normalized:
    """The flops-normalized EDFs of the spaces (module docstring): the bin edges, which bins are
    common, and per space the errors, weights and bins of the models kept, and the count of
    models with flops that were dropped."""

    edges: np.ndarray | None  # None: no model has flops
    common: np.ndarray  # bool per bin
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # (errors, weights, bins) per space
    dropped: list[int]


def normalize(spaces: list[SpaceResults], bins: int) -> Normalized:
    columns = [space.column("flops") for space in spaces]
    if not any(len(flops) for flops, _ in columns):
        empty = (np.empty(0), np.empty(0), np.empty(0, dtype=np.int64))
        return Normalized(None, np.zeros(bins, bool), [empty] * len(spaces),
                          [0] * len(spaces))
    edges = log_bins([flops for flops, _ in columns], bins)
    common = common_bins([flops for flops, _ in columns], edges)
    kept, dropped = [], []
    for flops, errors in columns:
        weights = normalized_weights(flops, edges, common)
        keep = weights > 0
        kept.append((errors[keep], weights[keep], bin_index(flops, edges)[keep]))
        dropped.append(int((~keep).sum()))
    return Normalized(edges, common, kept, dropped)


def compare(spaces: list[SpaceResults], normalized: Normalized, seed: int,
            permutations: int) -> list[dict[str, Any]]:
    """Per pair of spaces: the KS test of their error EDFs and the permutation test of their
    normalized EDFs (None when either space keeps no model)."""
    comparisons = []
    for first in range(len(spaces)):
        for second in range(first + 1, len(spaces)):
            a, b = spaces[first], spaces[second]
            statistic, p = ks_two_sample(a.errors, b.errors)
            entry: dict[str, Any] = {
                "spaces": [a.label, b.label],
                "edf": {"statistic": statistic, "p": p, "n": [len(a.errors), len(b.errors)]},
                "normalized_edf": None}
            kept_a, kept_b = normalized.kept[first], normalized.kept[second]
            if len(kept_a[0]) and len(kept_b[0]):
                rng = np.random.Generator(np.random.PCG64(
                    np.random.SeedSequence([seed, first, second], spawn_key=(1,))))
                statistic, p = stratified_permutation_test(*kept_a, *kept_b, rng, permutations)
                entry["normalized_edf"] = {"statistic": statistic, "p": p,
                                           "n": [len(kept_a[0]), len(kept_b[0])],
                                           "permutations": permutations}
            comparisons.append(entry)
    return comparisons


def summarize(spaces: list[SpaceResults], resamples: int, seed: int, fraction: float,
              bins: int, permutations: int = 10_000) -> dict[str, Any]:
    normalized = normalize(spaces, bins)
    summary: dict[str, Any] = {"resamples": resamples, "fraction": fraction, "seed": seed,
                               "normalized_by": "flops", "bins": bins,
                               "common_bins": int(normalized.common.sum()),
                               "permutations": permutations, "alpha": ALPHA, "spaces": []}
    for index, space in enumerate(spaces):
        errors = np.asarray(space.errors)
        best = int(np.argmin(errors))
        entry = {"label": space.label, "files": space.files, "n": len(errors),
                 "failed": space.failed,
                 "error": {"min": float(errors.min()), "mean": float(errors.mean()),
                           "median": float(np.median(errors)), "max": float(errors.max()),
                           "median_interval": median_interval(errors)},
                 "best": {"id": space.ids[best], "error": float(errors[best]),
                          **{k: space.metrics[best][k] for k in ("flops", "params", "acts")
                             if k in space.metrics[best]}},
                 "normalized": {"kept": len(normalized.kept[index][0]),
                                "dropped": normalized.dropped[index]},
                 "bootstrap": {}}
        for name in space.metric_names():
            values, metric_errors = space.column(name)
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index])))
            low, median, high = bootstrap_best({name: values}, metric_errors, rng, fraction,
                                               resamples)[name]
            entry["bootstrap"][name] = {"low": low, "median": median, "high": high,
                                        "models": len(values)}
        summary["spaces"].append(entry)
    summary["comparisons"] = compare(spaces, normalized, seed, permutations)
    return summary


def comparison_text(comparison: dict[str, Any]) -> str:
    """One line: each test's D, p and sample sizes, and what p says at level ALPHA."""
    def said(test: dict[str, Any]) -> str:
        verdict = ("differ" if test["p"] < ALPHA else "cannot be told apart")
        return (f"D = {test['statistic']:.3f}, p = {test['p']:.3g} (n = {test['n'][0]}, "
                f"{test['n'][1]}): {verdict} at the {ALPHA:.0%} level")

    first, second = comparison["spaces"]
    normalized = comparison["normalized_edf"]
    return (f"{first} vs {second}: error EDFs {said(comparison['edf'])}; normalized EDFs "
            + (said(normalized) if normalized else "not compared (no common flops bin)"))


def _figure_style():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "archc", "font.size": 8, "axes.grid": True,
                         "grid.alpha": 0.3, "legend.fontsize": 7})
    return plt


def plot_edfs(spaces: list[SpaceResults], bins: int, normalized: bool):
    plt = _figure_style()
    figure, axis = plt.subplots(figsize=(5.0, 3.6))
    kept = normalize(spaces, bins).kept if normalized else None
    for index, space in enumerate(spaces):
        errors = np.asarray(space.errors)
        weights = None
        if normalized:
            errors, weights, _ = kept[index]
            if not len(errors):
                continue
        x, cumulative = edf(errors, weights)
        label = f"{space.label}  {len(x)} | {x.min():.1f} | {errors.mean():.1f}"
        axis.plot(np.concatenate([[x[0]], x]), np.concatenate([[0.0], cumulative]),
                  drawstyle="steps-post", color=f"C{index}", label=label)
    axis.set_xlabel("error (%)")
    axis.set_ylabel("cumulative prob." + (" (flops-normalized)" if normalized else ""))
    axis.set_ylim(0, 1.02)
    if axis.get_lines():
        axis.legend(loc="lower right", title="n | min | mean")
    else:
        axis.text(0.5, 0.5, "no flops bin common to every space", ha="center",
                  transform=axis.transAxes)
    figure.tight_layout()
    return figure


def plot_trends(spaces: list[SpaceResults], summary: dict[str, Any]):
    plt = _figure_style()
    metrics = [m for m in TREND_METRICS if any(len(s.column(m)[0]) > 1 for s in spaces)]
    figure, axes = plt.subplots(len(spaces), len(metrics), squeeze=False,
                                figsize=(1.9 * len(metrics), 1.7 * len(spaces) + 0.3),
                                sharey="row")
    for row, (space, entry) in enumerate(zip(spaces, summary["spaces"])):
        for column, name in enumerate(metrics):
            axis = axes[row][column]
            values, errors = space.column(name)
            if len(values) == 0:
                axis.set_visible(False)
                continue
            scale = SCALE.get(name, 1.0)
            band = entry["bootstrap"][name]
            axis.scatter(values * scale, errors, s=6, color=f"C{row}", alpha=0.7)
            axis.axvspan(band["low"] * scale, band["high"] * scale, color="0.5", alpha=0.2)
            axis.axvline(band["median"] * scale, color="k", linewidth=1)
            axis.set_xlabel(LABELS.get(name, name))
            if column == 0:
                axis.set_ylabel(f"{space.label}\nerror (%)")
    figure.tight_layout()
    return figure


def write_report(spaces: list[SpaceResults], out_dir: Path, resamples: int, seed: int,
                 fraction: float = 0.25, bins: int = 10,
                 permutations: int = 10_000) -> dict[str, Any]:
    """Compute everything, then write the plots, summary.json and summary.md into `out_dir`."""
    summary = summarize(spaces, resamples, seed, fraction, bins, permutations)
    figures = {"edf": plot_edfs(spaces, bins, normalized=False),
               "edf_normalized": plot_edfs(spaces, bins, normalized=True),
               "trends": plot_trends(spaces, summary)}
    summary["plots"] = [f"{name}.{kind}" for name in figures for kind in ("png", "svg")]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, figure in figures.items():
        for kind in ("png", "svg"):
            with atomic_output(out_dir / f"{name}.{kind}") as temporary:
                figure.savefig(temporary, format=kind, dpi=110,
                               metadata={"Date": None} if kind == "svg" else {"Software": None})
        _figure_style().close(figure)  # pyplot keeps every figure until closed
    for name, text in (("summary.json", json.dumps(summary, indent=1) + "\n"),
                       ("summary.md", markdown(summary))):
        with atomic_output(out_dir / name) as temporary:
            temporary.write_text(text)
    return summary


def markdown(summary: dict[str, Any]) -> str:
    lines = ["# Sweep analysis", "",
             f"Error = the best validation top-1 error (%) over epochs. Bootstrap: "
             f"{summary['resamples']:,} resamples of {summary['fraction']:.0%} of the models "
             f"with replacement (seed {summary['seed']}); the interval is the 2.5-97.5 percentile "
             f"range of the best model's value.", "",
             "| space | models | failed | min | mean | median [95% interval] | best model |",
             "|---|---|---|---|---|---|---|"]
    for space in summary["spaces"]:
        e = space["error"]
        band = e.get("median_interval")
        interval = "" if band is None else f" [{band[0]:.2f}, {band[1]:.2f}]"
        lines.append(f"| {space['label']} | {space['n']} | {space['failed']} | {e['min']:.2f} | "
                     f"{e['mean']:.2f} | {e['median']:.2f}{interval} | {space['best']['id']} |")
    lines += ["", "The median's interval is distribution-free (order statistics: it holds the "
              "median of the space's error distribution with probability at least 95%; none "
              "below 6 models). The min is the best of the sampled models, not an estimate of "
              "anything: compare spaces by their EDFs and the tests below."]
    lines += ["", "## Normalized EDFs", "",
              f"Flops-normalized: {summary['common_bins']} of {summary['bins']} log-spaced flops "
              f"bins hold models of every space; each space's weight is uniform over those bins, "
              f"and its models in the other bins are dropped.", "",
              "| space | models kept | dropped |", "|---|---|---|"]
    for space in summary["spaces"]:
        lines.append(f"| {space['label']} | {space['normalized']['kept']} | "
                     f"{space['normalized']['dropped']} |")
    if summary["comparisons"]:
        lines += ["", "## Do the spaces differ?", "",
                  f"Error EDFs: exact two-sample Kolmogorov-Smirnov test. Normalized EDFs: the "
                  f"weighted KS statistic D, p by {summary['permutations']:,} permutations of "
                  f"the errors within each common bin. p < {summary['alpha']} is read as a "
                  f"difference (per pair, uncorrected); a larger p means these samples cannot "
                  f"tell the spaces apart, not that they are alike.", "",
                  "| spaces | n | D | p | normalized n | D | p |",
                  "|---|---|---|---|---|---|---|"]
        for comparison in summary["comparisons"]:
            raw, normalized = comparison["edf"], comparison["normalized_edf"]
            cells = (["-", "-", "-"] if normalized is None else
                     [f"{normalized['n'][0]}, {normalized['n'][1]}",
                      f"{normalized['statistic']:.3f}", f"{normalized['p']:.3g}"])
            lines.append(f"| {' vs '.join(comparison['spaces'])} | {raw['n'][0]}, "
                         f"{raw['n'][1]} | {raw['statistic']:.3f} | {raw['p']:.3g} | "
                         + " | ".join(cells) + " |")
    lines += ["", "## Best value of each parameter (median [95% interval])", "",
              "| parameter | " + " | ".join(s["label"] for s in summary["spaces"]) + " |",
              "|---|" + "---|" * len(summary["spaces"])]
    names = []
    for space in summary["spaces"]:
        names += [n for n in space["bootstrap"] if n not in names]
    for name in names:
        cells = []
        for space in summary["spaces"]:
            band = space["bootstrap"].get(name)
            cells.append("" if band is None else
                         f"{_number(band['median'])} [{_number(band['low'])}, "
                         f"{_number(band['high'])}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in summary["plots"]), ""]
    return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
