"""`archc prune --macs 0.5` against Torch-Pruning (issue 23), on the same models and target.

    pip install -c constraints.txt -e ".[bench]"      # Torch-Pruning, the optional extra
    python bench/pruning.py                           # both sections, into the docs
    python bench/pruning.py --sections speed --rounds 3
    python bench/pruning.py --sections models --models resnet18,mobilenet_v2 --out /tmp/p.md

Neither torchvision nor timm is a dependency: the models are the torchvision- and timm-style
definitions of `tests/wild/prunable.py` (ResNet-18/50, MobileNetV2, a ResNeXt bottleneck net, a
timm-style SE stage), of `tests/wild/channels_last.py` (timm's ConvNeXt) and
`tests/wild/attention.py` (LeViT, EfficientViT), and archc's own ShuffleNetV2 and RegNetX
specs, built at 10 classes.

Sections (each between `<!-- begin: NAME -->` markers, rewritten alone):
- `prune-speed` (docs/performance.md): a ResNet-50 (torchvision layout, 224x224) pruned to 50% of
  its MACs, timed in one process, interleaved round by round: archc on the `.pt2` (the CLI's
  handler: load and lift the program, canonical pipeline with its float64 verification, channel
  analysis, scores, the ratio search, the resize, re-export verified against eager; and the same
  with `--no-verify`) against Torch-Pruning on the pickled module (`torch.load`, DependencyGraph,
  L1 magnitude importance, the pruning step at the ratio tuned beforehand to reach 50% of the MACs,
  its MAC count, `torch.save`), and Torch-Pruning writing a `.pt2` as archc does (the same,
  then `torch.export` with a dynamic batch and `torch.export.save`; it cannot read a `.pt2`
  itself). Medians of the rounds and the load average are reported.
- `prune-models` (docs/compression.md): per model, at 3x32x32: success or the refusal (or
  Torch-Pruning's error, one line with the frame it was raised in; its pruned model must run),
  MACs and parameters kept (both counted by archc's rule), wall time (archc's CLI on the pickled
  module with `--trust-pickle`, or, for a model torch cannot pickle (the archc-built
  GraphModules of ShuffleNetV2 and RegNetX), on its `torch.export` `.pt2`, writing a `.pt2`;
  Torch-Pruning on `torch.load` of the pickle as above, or on a deepcopy in memory, its ratio
  tuned by bisection to the largest MACs not above 50%), each unrounded and with `--round-to 8` /
  `round_to=8`; ONNX Runtime latency of the unpruned and the four pruned models at 1x3x224x224
  (LeViT, fixed-resolution: 1x3x32x32), one thread, all interleaved in one run (medians of the
  rounds, `archc.common.timing`; by default the CPU time of the process, `--ort-clock cpu`, so
  that other processes on a shared machine do not stretch it), and each rounded model's median
  over its unrounded one (slower or faster only where the ranges of round medians do not
  overlap); the digits validation accuracy of every model after the same fine-tuning
  (`archc.train.loop`) of the same trained base model, with its 95% Wilson interval, and archc
  against Torch-Pruning at equal rounding by the exact McNemar test (`archc.common.accuracy_stats`).

The ConvNeXt-, LeViT- and EfficientViT-style networks are those of `tests/wild/channels_last.py`
and `tests/wild/attention.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from run import ROOT, baseline_onnx, machine, ort_session, write_sections

from archc.common.timing import interleaved

sys.path.insert(0, str(ROOT))
MODELS = ["resnet18", "mobilenet_v2", "resnext_bottleneck", "timm_style", "shufflenet_v2_x0_5",
          "regnetx_200mf", "timm_convnext", "levit", "efficientvit"]
FIXED_RESOLUTION = {"levit"}  # attention biases indexed by position: latency at SIDE, not 224
SECTIONS = ("speed", "models")
CLOCKS = {"cpu": "CPU time of the process", "wall": "wall time"}
TARGET = 0.5
SIDE = 32  # pruning and fine-tuning input side; latency is measured at 224
LATENCY_SHAPE = (1, 3, 224, 224)


def build_model(name: str, classes: int = 10):
    """A fresh randomly initialized model (random BN statistics too), in eval mode."""
    import yaml

    import archc
    from archc.ir.init import random_input, randomize
    from tests.wild import attention, channels_last, prunable

    if name in ("shufflenet_v2_x0_5", "regnetx_200mf"):
        spec = yaml.safe_load((ROOT / "specs" / f"{name}.yaml").read_text())
        spec.update(num_classes=classes, input={**spec["input"], "size": SIDE})
        model = archc.build(spec, init="random")
    elif name in ("resnet18", "resnet50"):
        model = getattr(prunable, name)(classes)
    elif name in channels_last.NETWORKS:
        model = channels_last.NETWORKS[name]()
    elif name in attention.NETWORKS:
        model = attention.NETWORKS[name]()
    else:
        model = prunable.NETWORKS[name]()
    side = 224 if name == "resnet50" else SIDE
    return randomize(model, 0, calibration_input=random_input((4, 3, side, side), 1)).eval()


def archc_macs(model, shape) -> tuple[int, int]:
    """(MACs, params) per sample by archc's counting rule, for any traceable module."""
    import torch

    from archc.ir.analysis import complexity

    gm = model if isinstance(model, torch.fx.GraphModule) else torch.fx.symbolic_trace(model)
    flops, params, _ = complexity(gm, tuple(shape))
    return flops, params


# ---- Torch-Pruning ----

def tp_prune(model, example, ratio: float, round_to: int | None = None):
    """Torch-Pruning's MetaPruner with the L1 magnitude importance at one uniform ratio, the
    classifier (the last Linear) left alone, as its README prunes a torchvision model."""
    import torch
    import torch_pruning as tp

    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=last, round_to=round_to)
    pruner.step()
    return model


def tp_ratio(model, example, round_to: int | None = None, steps: int = 10) -> float:
    """The smallest uniform ratio whose pruned model keeps at most TARGET of the MACs (by
    Torch-Pruning's own counter), by bisection; each try prunes a fresh copy."""
    import torch_pruning as tp

    base, _ = tp.utils.count_ops_and_params(model, example)
    low, high = 0.0, 0.9
    for _ in range(steps):
        ratio = (low + high) / 2
        pruned = tp_prune(copy.deepcopy(model), example, ratio, round_to)
        macs, _ = tp.utils.count_ops_and_params(pruned, example)
        low, high = (low, ratio) if macs <= TARGET * base else (ratio, high)
    return high


def tp_run(source: Path, out: Path, example, ratio: float, round_to: int | None = None) -> None:
    """What a Torch-Pruning user runs: load the pickled model, prune, count, save; `out` a .pt2:
    export the pruned module with a dynamic batch as archc writes its programs (Torch-Pruning
    cannot read a .pt2 itself: its tracer calls `eval()`, which an exported module refuses)."""
    import torch
    import torch_pruning as tp

    model = torch.load(source, weights_only=False)  # the benchmark's own file
    tp_prune(model, example, ratio, round_to)
    tp.utils.count_ops_and_params(model, example)
    if out.suffix == ".pt2":
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(model, (torch.cat([example, example]),),
                                      dynamic_shapes=({0: batch},))
        torch.export.save(program, out)
    else:
        torch.save(model, out)


# ---- archc ----

def archc_cli(arguments: list[str]) -> dict:
    """`archc prune ... --json` in this process; its report."""
    from archc.cli.main import main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["prune", *arguments, "--json"])
    if code != 0:
        raise RuntimeError(f"archc prune exited {code}")
    return json.loads(stdout.getvalue())


def archc_pruned(model, example, round_to: int = 1):
    """The same pruning as the CLI's pickle route (trace, canonical pipeline, MAC search), as a
    trainable GraphModule."""
    import torch

    from archc.backends.importers import canonical_graph
    from archc.compress.pruning import PruneConfig, prune_to_macs

    traced = model if isinstance(model, torch.fx.GraphModule) else torch.fx.symbolic_trace(model)
    gm = canonical_graph(traced, example)
    return prune_to_macs(gm, example, TARGET,
                         lambda r: PruneConfig(r, round_to=round_to)).graph_module


# ---- sections ----

def bench_speed(args) -> dict:
    import torch

    from archc.ir.init import random_input

    model = build_model("resnet50", 1000)
    example = random_input((1, 3, 224, 224), 0)
    tuned = tp_ratio(model, example, steps=args.tp_steps)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        torch.export.save(torch.export.export(model, (example,)), folder / "r50.pt2")
        torch.save(model, folder / "r50.pt")
        report: dict = {}
        load = os.getloadavg()

        def archc_run(*extra: str):
            def run():
                report.update(archc_cli([str(folder / "r50.pt2"), "--macs", str(TARGET), "-o",
                                         str(folder / "out.pt2"), *extra]))
            return run

        timings = interleaved({
            "archc (.pt2, verified)": archc_run(),
            "archc (.pt2, --no-verify)": archc_run("--no-verify"),
            "Torch-Pruning (pickled module)": lambda: tp_run(
                folder / "r50.pt", folder / "tp.pt", example, tuned),
            "Torch-Pruning, then torch.export to .pt2": lambda: tp_run(
                folder / "r50.pt", folder / "tp.pt2", example, tuned),
        }, rounds=args.rounds, iters=1, warmup=1)
        tp_model = torch.load(folder / "tp.pt", weights_only=False)
    tp_macs = archc_macs(tp_model, example.shape)
    return {"timings": timings, "ratio": tuned, "archc": report, "tp": tp_macs, "load": load}


def speed_section(result: dict, args) -> str:
    timings, report = result["timings"], result["archc"]
    tp = timings["Torch-Pruning (pickled module)"].median
    tp_pt2 = timings["Torch-Pruning, then torch.export to .pt2"].median
    (m0, m1), (p0, p1) = report["macs"], report["params"]
    tp_macs, tp_params = result["tp"]
    lines = [
        f"`python bench/pruning.py --sections speed --rounds {args.rounds}`: a ResNet-50 "
        f"(torchvision layout, `tests/wild/prunable.py`, 224x224, 1000 classes) pruned to "
        f"{100 * TARGET:.0f}% of its MACs in one process, the tools interleaved round by round "
        f"(median of {args.rounds} rounds, [min-max]). {machine()}; load average at the start "
        f"of the timed rounds {' '.join(f'{v:.1f}' for v in result['load'])}.",
        "",
        "| run | wall time | vs Torch-Pruning | vs Torch-Pruning + export | MACs kept "
        "| params kept |",
        "|---|---|---|---|---|---|",
    ]
    for label, timing in timings.items():
        if label.startswith("archc"):
            kept = f"{100 * m1 / m0:.1f}% | {100 * p1 / p0:.1f}%"
        else:
            kept = f"{100 * tp_macs / m0:.1f}% | {100 * tp_params / p0:.1f}%"
        lines.append(f"| {label} | {timing.text()} | "
                     f"{timing.median / tp:.2f}x | {timing.median / tp_pt2:.2f}x | {kept} |")
    lines += ["", f"Torch-Pruning's uniform ratio {result['ratio']:.3f} was tuned beforehand "
              f"(bisection, {args.tp_steps} tries, not timed) to the largest MACs not above the "
              f"target; archc's time includes its own ratio search. Both MAC counts by archc's "
              f"rule."]
    return "\n".join(lines)


def save_source(model, folder: Path, example) -> tuple[Path, list[str]]:
    """The file `archc prune` reads and its extra arguments: the pickled module (`--trust-pickle`)
    where torch can pickle it, else a torch.export program (archc-built GraphModules do not
    pickle: torch.fx's import-block writer fails on their generated code)."""
    import torch

    shape = ["--input-shape", f"1,3,{SIDE},{SIDE}"]
    source = folder / "model.pt"
    try:
        torch.save(model, source)
        return source, ["--trust-pickle", *shape]
    except Exception:  # noqa: BLE001 - any pickling failure sends the model the .pt2 way
        source.unlink(missing_ok=True)
        source = folder / "model.pt2"
        torch.export.save(torch.export.export(model, (example,)), source)
        return source, shape


def tp_candidate(base, source: Path, folder: Path, example, round_to: int | None,
                 steps: int) -> tuple[object, float, str]:
    """(Torch-Pruning's pruned model, its wall time, the route): its ratio tuned beforehand, then
    timed as a user runs it: `torch.load` of the pickle, prune, count, `torch.save`; for a model
    torch cannot pickle, the same on a deepcopy in memory. The pruned model must run."""
    import torch
    import torch_pruning as tp

    ratio = tp_ratio(base, example, round_to, steps)
    start = time.perf_counter()
    if source.suffix == ".pt":
        tp_run(source, folder / "tp.pt", example, ratio, round_to)
        route = "pickle"
    else:
        tp.utils.count_ops_and_params(tp_prune(copy.deepcopy(base), example, ratio, round_to),
                                      example)
        route = "in memory"
    seconds = time.perf_counter() - start
    model = tp_prune(copy.deepcopy(base), example, ratio, round_to)
    with torch.no_grad():
        model(example)  # a pruning that breaks the forward is a failure, not a result
    return model, seconds, route


def latency_shape(name: str) -> tuple[int, ...]:
    return (1, 3, SIDE, SIDE) if name in FIXED_RESOLUTION else LATENCY_SHAPE


def bench_model(name: str, args) -> dict:
    import torch

    from archc.backends.export import quiet
    from archc.ir.init import random_input
    from archc.train.data import load_data
    from archc.train.loop import TrainConfig, Trainer

    row: dict = {"model": name, "latency shape": latency_shape(name)}
    example = random_input((1, 3, SIDE, SIDE), 0)
    data = load_data("digits", 3, SIDE)
    train = TrainConfig(epochs=args.base_epochs, batch_size=64, lr=0.05, seed=0)
    base = Trainer(train, progress=False).fit(build_model(name), data).model.eval()
    row["base right"] = _right(base, data)
    base_macs, base_params = archc_macs(base, example.shape)
    candidates: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        source, extra = save_source(base, folder, example)
        row["route"] = source.suffix
        for round_to in (1, 8):
            suffix = "" if round_to == 1 else " r8"
            try:
                start = time.perf_counter()
                archc_cli([str(source), *extra, "--macs", str(TARGET), "--round-to",
                           str(round_to), "-o", str(folder / "out.pt2")])
                row[f"archc{suffix} seconds"] = time.perf_counter() - start
                candidates[f"archc{suffix}"] = archc_pruned(copy.deepcopy(base), example,
                                                            round_to)
            except Exception as exc:  # noqa: BLE001 - a refusal is a result
                row[f"archc{suffix} refused"] = _one_line(exc)
            try:
                model, seconds, route = tp_candidate(
                    base, source, folder, example, None if round_to == 1 else round_to,
                    args.tp_steps)
                candidates[f"tp{suffix}"] = model
                row[f"tp{suffix} seconds"], row["tp route"] = seconds, route
            except Exception as exc:  # noqa: BLE001 - Torch-Pruning's failure is a result
                row[f"tp{suffix} refused"] = _one_line(exc)
    for key, model in candidates.items():
        macs, params = archc_macs(model, example.shape)
        row[f"{key} kept"] = (macs / base_macs, params / base_params)
    sessions = {}
    latency_input = random_input(row["latency shape"], 2).numpy()
    for key, model in [("unpruned", base), *candidates.items()]:
        try:
            with quiet():
                onnx = baseline_onnx(model, torch.from_numpy(latency_input))
            session, input_name, _ = ort_session(onnx, threads=1)
        except Exception as exc:  # noqa: BLE001 - an export failure is a result
            row[f"{key} onnx failed"] = _one_line(exc)
            continue
        sessions[key] = (lambda s=session, n=input_name: s.run(None, {n: latency_input}))
    clock = time.process_time if args.ort_clock == "cpu" else time.perf_counter
    timings = interleaved(sessions, rounds=args.rounds, iters=args.iters, warmup=3, clock=clock)
    row["latency"] = {key: timing.rounds for key, timing in timings.items()}
    tune = TrainConfig(epochs=args.tune_epochs, batch_size=64, lr=0.01, seed=0)
    for key, model in candidates.items():
        tuned = Trainer(tune, progress=False).fit(model, data).model.eval()
        row[f"{key} right"] = _right(tuned, data)
    return row


def _one_line(exc: Exception) -> str:
    """'ZeroDivisionError: integer division or modulo by zero (torch_pruning/.../x.py:fn)': the
    error and the innermost frame it was raised in."""
    import traceback

    text = str(exc).strip().splitlines()
    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    if frames:
        parts = Path(frames[-1].filename).parts
        where = f" (in {'/'.join(parts[-2:])}:{frames[-1].name})"
    return f"{type(exc).__name__}: {text[0][:140] if text else ''}{where}"


def _right(model, data) -> str:
    """'1' per validation image the model classifies right, '0' per wrong one (in order)."""
    from archc.train.loop import evaluate_batches

    predictions: list[tuple[int, int]] = []
    evaluate_batches(model, data.val_batches(256), predictions=predictions)
    return "".join("1" if label == top1 else "0" for label, top1 in predictions)


def rounded_vs_unrounded(rounded: list[float], unrounded: list[float]) -> str:
    """'0.97x (within the spread)': the ratio of the round-to 8 model's median ORT latency to the
    unrounded one's, both from the same interleaved rounds; 'slower'/'faster' only when the two
    ranges of round medians do not overlap."""
    import statistics

    ratio = statistics.median(rounded) / statistics.median(unrounded)
    if min(rounded) > max(unrounded):
        verdict = "slower: the ranges do not overlap"
    elif max(rounded) < min(unrounded):
        verdict = "faster: the ranges do not overlap"
    else:
        verdict = "within the spread"
    return f"{ratio:.2f}x ({verdict})"


def models_section(rows: list[dict], args) -> str:
    n = len(rows[0]["base right"]) if rows else 0
    lines = [
        f"`python bench/pruning.py --sections models --rounds {args.rounds} --iters {args.iters} "
        f"--ort-clock {args.ort_clock} "
        f"--base-epochs {args.base_epochs} --tune-epochs {args.tune_epochs}`: each model trained "
        f"{args.base_epochs} epochs on digits (3x{SIDE}x{SIDE}), pruned to {100 * TARGET:.0f}% "
        f"of its MACs by archc (`archc prune --macs {TARGET}`, L1, per-group ratio searched; on "
        f"the pickled module with `--trust-pickle`, or on a `.pt2` export where torch cannot "
        f"pickle the model: the archc-built ShuffleNetV2 and RegNetX) and by Torch-Pruning 1.6 "
        f"(MetaPruner, L1 magnitude importance, uniform ratio tuned by bisection to the largest "
        f"MACs not above the target, classifier ignored; `torch.load` of the pickle, or a "
        f"deepcopy in memory for the models that do not pickle), each with and without "
        f"`--round-to 8` / `round_to=8`, then every pruned model fine-tuned {args.tune_epochs} "
        f"epochs with `archc.train.loop` (same config and seed). Kept MACs and params by archc's "
        f"counting rule. ORT: {CLOCKS[args.ort_clock]} "
        f"per run, one thread, 1x3x224x224 (LeViT, whose attention biases fix its "
        f"resolution: 1x3x{SIDE}x{SIDE}), all of a model's variants interleaved in one run, "
        f"median of {args.rounds} rounds of {args.iters} [min-max of the round medians]; "
        f"\"vs unrounded\" is the round-to 8 model's median over the same tool's unrounded one, "
        f"called slower or faster only when the two ranges do not overlap. Accuracy on the "
        f"{n} digits validation images, 95% Wilson interval; archc against Torch-Pruning at the "
        f"same rounding: accuracy difference in points (images only archc gets right : images "
        f"only Torch-Pruning gets right, exact McNemar p). {machine()}.",
        "",
        "| model | tool | kept MACs / params | wall s | ORT ms | vs unrounded | accuracy "
        "[95%] | archc vs Torch-Pruning |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines += _model_lines(row)
    return "\n".join(lines)


def _ort_cell(row: dict, key: str) -> str:
    import statistics

    if key in row.get("latency", {}):
        runs = row["latency"][key]
        return f"{1e3 * statistics.median(runs):.2f} [{1e3 * min(runs):.2f}-{1e3 * max(runs):.2f}]"
    return f"no ONNX: {row[f'{key} onnx failed']}" if f"{key} onnx failed" in row else ""


def _accuracy_cell(row: dict, key: str) -> str:
    from archc.common.accuracy_stats import accuracy_with_interval

    bits = row.get(f"{key} right")
    return accuracy_with_interval(bits.count("1"), len(bits), counts=False) if bits else ""


def _model_lines(row: dict) -> list[str]:
    """The table rows of one model: unpruned, then archc and Torch-Pruning, each unrounded and
    at round-to 8."""
    from archc.common.accuracy_stats import compare_paired

    latency, model = row.get("latency", {}), row["model"]
    shape = "" if tuple(row["latency shape"]) == LATENCY_SHAPE else f" (ORT at {SIDE}x{SIDE})"
    lines = [f"| {model}{shape} | unpruned | 100% / 100% | | {_ort_cell(row, 'unpruned')} | | "
             f"{_accuracy_cell(row, 'base')} | |"]
    for tool, label in (("archc", "archc"), ("tp", "Torch-Pruning")):
        for suffix in ("", " r8"):
            key = f"{tool}{suffix}"
            name = f"{label}{' round-to 8' if suffix else ''}"
            if f"{key} refused" in row:
                reason = row[f"{key} refused"].replace("|", "/")
                lines.append(f"| {model} | {name} | failed: {reason} | | | | | |")
                continue
            macs, params = row[f"{key} kept"]
            route = ".pt2" if tool == "archc" and row["route"] == ".pt2" else \
                "in memory" if tool == "tp" and row.get("tp route") == "in memory" else ""
            seconds = f"{row[f'{key} seconds']:.1f}{f' ({route})' if route else ''}"
            versus = rounded_vs_unrounded(latency[key], latency[tool]) \
                if suffix and key in latency and tool in latency else ""
            paired, other = "", f"tp{suffix}"
            if tool == "archc" and f"{key} right" in row and f"{other} right" in row:
                paired = compare_paired([b == "1" for b in row[f"{other} right"]],
                                        [b == "1" for b in row[f"{key} right"]]).difference()
            lines.append(f"| {model} | {name} | {100 * macs:.1f}% / {100 * params:.1f}% | "
                         f"{seconds} | {_ort_cell(row, key)} | {versus} | "
                         f"{_accuracy_cell(row, key)} | {paired} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--tp-steps", type=int, default=8)
    parser.add_argument("--base-epochs", type=int, default=4)
    parser.add_argument("--tune-epochs", type=int, default=2)
    parser.add_argument("--ort-clock", choices=("cpu", "wall"), default="cpu",
                        help="models section: ORT latency as the CPU time of this process "
                        "(one-thread sessions; robust to other processes) or wall time")
    parser.add_argument("--out", type=Path, default=None,
                        help="one file for both sections (default: the docs)")
    parser.add_argument("--json", type=Path, default=None, help="also dump the raw rows here")
    args = parser.parse_args()
    sections = args.sections.split(",")
    raw: dict = {}
    if "speed" in sections:
        result = bench_speed(args)
        raw["speed"] = {"medians": {k: t.median for k, t in result["timings"].items()},
                        "ratio": result["ratio"]}
        write_sections(args.out or ROOT / "docs" / "performance.md",
                       {"prune-speed": speed_section(result, args)})
    if "models" in sections:
        rows = []
        for name in args.models.split(","):
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows.append(bench_model(name, args))
            print(json.dumps(rows[-1], default=str), file=sys.stderr, flush=True)
        raw["models"] = rows
        write_sections(args.out or ROOT / "docs" / "compression.md",
                       {"prune-models": models_section(rows, args)})
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    main()
