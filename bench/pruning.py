"""`archc prune --macs 0.5` against Torch-Pruning (issue 23), on the same models and target.

    pip install -c constraints.txt -e ".[bench]"      # Torch-Pruning, the optional extra
    python bench/pruning.py                           # both sections, into the docs
    python bench/pruning.py --sections speed --rounds 3
    python bench/pruning.py --sections models --models resnet18,mobilenet_v2 --out /tmp/p.md

Neither torchvision nor timm is a dependency: the models are the torchvision- and timm-style
definitions of `tests/wild/prunable.py` (ResNet-18/50, MobileNetV2, a ResNeXt bottleneck net, a
timm-style SE stage) and archc's own ShuffleNetV2 and RegNetX specs, built at 10 classes.

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
- `prune-models` (docs/compression.md): per model, at 3x32x32: success or the refusal, MACs and
  parameters kept (both counted by archc's rule), wall time (archc through the pickle route,
  `--trust-pickle`, writing a `.pt2`; Torch-Pruning as above, its ratio tuned by bisection to the
  largest MACs not above 50%), ONNX Runtime latency of each pruned model at 1x3x224x224 (one
  thread, interleaved, medians; `archc.common.timing`), the same for `--round-to 8` of both
  tools, and the digits validation error after the same fine-tuning (`archc.train.loop`) of the
  same trained base model.
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
          "regnetx_200mf"]
SECTIONS = ("speed", "models")
TARGET = 0.5
SIDE = 32  # pruning and fine-tuning input side; latency is measured at 224
LATENCY_SHAPE = (1, 3, 224, 224)


def build_model(name: str, classes: int = 10):
    """A fresh randomly initialized model (random BN statistics too), in eval mode."""
    import yaml

    import archc
    from archc.ir.init import random_input, randomize
    from tests.wild import prunable

    if name in ("shufflenet_v2_x0_5", "regnetx_200mf"):
        spec = yaml.safe_load((ROOT / "specs" / f"{name}.yaml").read_text())
        spec.update(num_classes=classes, input={**spec["input"], "size": SIDE})
        model = archc.build(spec, init="random")
    elif name in ("resnet18", "resnet50"):
        model = getattr(prunable, name)(classes)
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


def tp_run(source: Path, out: Path, example, ratio: float) -> None:
    """What a Torch-Pruning user runs: load the pickled model, prune, count, save; `out` a .pt2:
    export the pruned module with a dynamic batch as archc writes its programs (Torch-Pruning
    cannot read a .pt2 itself: its tracer calls `eval()`, which an exported module refuses)."""
    import torch
    import torch_pruning as tp

    model = torch.load(source, weights_only=False)  # the benchmark's own file
    tp_prune(model, example, ratio)
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

    gm = canonical_graph(torch.fx.symbolic_trace(model), example)
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


def bench_model(name: str, args) -> dict:
    import torch

    from archc.backends.export import quiet
    from archc.ir.init import random_input
    from archc.train.data import load_data
    from archc.train.loop import TrainConfig, Trainer

    row: dict = {"model": name}
    example = random_input((1, 3, SIDE, SIDE), 0)
    data = load_data("digits", 3, SIDE)
    train = TrainConfig(epochs=args.base_epochs, batch_size=64, lr=0.05, seed=0)
    base = Trainer(train, progress=False).fit(build_model(name), data).model.eval()
    row["base_error"] = _error(base, data)
    base_macs, base_params = archc_macs(base, example.shape)
    candidates: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "model.pt"
        torch.save(base, source)
        for round_to in (1, 8):
            key = f"archc{'' if round_to == 1 else ' r8'}"
            try:
                start = time.perf_counter()
                archc_cli([str(source), "--trust-pickle", "--input-shape", f"1,3,{SIDE},{SIDE}",
                           "--macs", str(TARGET), "--round-to", str(round_to), "-o",
                           str(Path(folder) / "out.pt2")])
                row[f"{key} seconds"] = time.perf_counter() - start
                candidates[key] = archc_pruned(copy.deepcopy(base), example, round_to)
            except Exception as exc:  # a refusal is a result
                row[f"{key} refused"] = str(exc).splitlines()[0][:120]
            try:
                ratio = tp_ratio(base, example, None if round_to == 1 else round_to,
                                 args.tp_steps)
                start = time.perf_counter()
                tp_run(source, Path(folder) / "tp.pt", example, ratio)
                row[f"tp{'' if round_to == 1 else ' r8'} seconds"] = time.perf_counter() - start
                candidates[f"tp{'' if round_to == 1 else ' r8'}"] = tp_prune(
                    copy.deepcopy(base), example, ratio, None if round_to == 1 else round_to)
            except Exception as exc:
                row[f"tp{'' if round_to == 1 else ' r8'} refused"] = \
                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    for key, model in candidates.items():
        macs, params = archc_macs(model, example.shape)
        row[f"{key} kept"] = (macs / base_macs, params / base_params)
    sessions = {}
    latency_input = random_input(LATENCY_SHAPE, 2).numpy()
    for key, model in [("unpruned", base), *candidates.items()]:
        with quiet():
            onnx = baseline_onnx(model, torch.from_numpy(latency_input))
        session, input_name, _ = ort_session(onnx, threads=1)
        sessions[key] = (lambda s=session, n=input_name: s.run(None, {n: latency_input}))
    timings = interleaved(sessions, rounds=args.rounds, iters=args.iters, warmup=3)
    row["latency"] = {key: timing.median for key, timing in timings.items()}
    tune = TrainConfig(epochs=args.tune_epochs, batch_size=64, lr=0.01, seed=0)
    for key in ("archc", "tp"):
        if key in candidates:
            tuned = Trainer(tune, progress=False).fit(candidates[key], data).model.eval()
            row[f"{key} error"] = _error(tuned, data)
    return row


def _error(model, data) -> float:
    from archc.train.loop import evaluate_batches

    return evaluate_batches(model, data.val_batches(256))["error"]


def models_section(rows: list[dict], args) -> str:
    lines = [
        f"`python bench/pruning.py --sections models`: each model trained {args.base_epochs} "
        f"epochs on digits (3x{SIDE}x{SIDE}), pruned to {100 * TARGET:.0f}% of its MACs by "
        f"archc (`archc prune --trust-pickle --macs {TARGET}`, L1, per-group ratio searched) and "
        f"by Torch-Pruning 1.6 (MetaPruner, L1 magnitude importance, uniform ratio tuned by "
        f"bisection to the largest MACs not above the target, classifier ignored), then both "
        f"fine-tuned {args.tune_epochs} epochs with `archc.train.loop` (same config and seed). "
        f"Kept MACs and params by archc's counting rule. ORT: one thread, 1x3x224x224, "
        f"interleaved, median of {args.rounds} rounds of {args.iters}. {machine()}.",
        "",
        "| model | tool | kept MACs / params | wall s | ORT ms (unpruned) | ORT ms round-to 8 "
        "| val error % (base) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        latency = row.get("latency", {})
        for tool, label in (("archc", "archc"), ("tp", "Torch-Pruning")):
            if f"{tool} refused" in row:
                lines.append(f"| {row['model']} | {label} | refused: {row[f'{tool} refused']} "
                             f"| | | | |")
                continue
            macs, params = row[f"{tool} kept"]
            rounded = latency.get(f"{tool} r8")
            rounded_text = "refused" if rounded is None else (
                f"{1e3 * rounded:.2f} ({100 * row[f'{tool} r8 kept'][0]:.1f}% MACs)")
            lines.append(
                f"| {row['model']} | {label} | {100 * macs:.1f}% / {100 * params:.1f}% | "
                f"{row[f'{tool} seconds']:.1f} | {1e3 * latency[tool]:.2f} "
                f"({1e3 * latency['unpruned']:.2f}) | {rounded_text} | "
                f"{row.get(f'{tool} error', float('nan')):.1f} ({row['base_error']:.1f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--tp-steps", type=int, default=8)
    parser.add_argument("--base-epochs", type=int, default=4)
    parser.add_argument("--tune-epochs", type=int, default=2)
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
