"""Post-training int8 quantization of small specs trained on digits: accuracy, SQNR and the
int8/fp32 ONNX Runtime latency ratio (the tables of docs/quantization.md).

For each spec: `archc train SPEC --data digits --epochs E`, `archc fuse` to fp32 ONNX (the deploy
form), then `archc.compress.quantize.quantize` with each calibration method (per-channel weights)
and with per-tensor weights (min-max), measured on the validation split (360 images, held out from
calibration). Latency: fp32 and int8 (min-max, per-channel) sessions in ONNX Runtime on the CPU,
no spin-waiting, `--threads` intra-op threads, interleaved rounds (each round runs fp32 then int8,
`--iterations` runs each), medians over the rounds, at batch 1 and `--batch`. For the RepVGG
specs also `archc qat` (fake-quantized fine-tuning of the fused form, `--qat-epochs`) and, as its
control, the same extra epochs of plain float training followed by PTQ.

    .venv/bin/python bench/quantization.py [--epochs 6] [--rounds 21] [--threads 1] [--json R.json]
    .venv/bin/python bench/quantization.py --tables R.json   # the tables again, from R.json

Every accuracy is printed with its 95% Wilson interval, and every int8 model is compared with
its fp32 model image by image (exact McNemar test on the paired correctness; `archc eval
--predictions` gives each model's top-1 per validation image). Prints three markdown tables on
stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "docs" / "examples" / "quantization"
NAMES = ("resnet_digits", "regnetx_digits", "mobilenetv2_digits", "repvgg_digits",
         "qarepvgg_digits")
METHODS = ("minmax", "entropy", "percentile")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cli(*argv) -> str:
    from archc.cli.main import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main([str(a) for a in argv])
    if code != 0:
        raise SystemExit(f"archc {' '.join(map(str, argv))} failed with exit code {code}")
    return buffer.getvalue()


def correctness(model: Path) -> str:
    """One character per digits validation image, "1" where `model` (an ONNX file, run in ONNX
    Runtime by `archc eval --predictions`) is right, "0" where wrong, in the split's order: the
    paired tests of the tables need them."""
    predictions = model.with_name(model.name + ".predictions.json")
    cli("eval", model, "--data", "digits", "--predictions", predictions)
    document = json.loads(predictions.read_text())
    return "".join("1" if label == top1 else "0"
                   for label, top1 in zip(document["labels"], document["predictions"],
                                          strict=True))


def latency(fp32: Path, int8: Path, batch: int, args) -> dict[str, float]:
    import numpy as np

    from archc.backends.onnx_runtime import cpu_session
    from archc.compress.quantize import interleaved_latency, read_model

    _, model_input = read_model(fp32)
    x = np.random.default_rng(0).uniform(0, 1, (batch, model_input.channels, model_input.size,
                                                  model_input.size)).astype(np.float32)
    sessions = {"fp32": cpu_session(str(fp32), args.threads),
                "int8": cpu_session(str(int8), args.threads)}
    return interleaved_latency(sessions, model_input.name, x, args.rounds, args.iterations)


def bench_spec(name: str, work: Path, args) -> dict:
    from archc.compress.quantize import quantize

    spec = SPECS / f"{name}.yaml"
    checkpoint, fp32 = work / f"{name}.pt", work / f"{name}.onnx"
    say(f"{name}: training {args.epochs} epochs on digits")
    metrics = json.loads(cli("train", spec, "--data", "digits", "--epochs", args.epochs,
                             "--seed", args.seed, "-o", checkpoint))
    fused = json.loads(cli("fuse", checkpoint, "-o", fp32, "--json"))
    row = {"name": name, "train_error": metrics["final_error"],
           "convs": fused["deploy_form"]["convs"], "quantized": {},
           "right": {"fp32": correctness(fp32)}}
    for method in METHODS:
        say(f"{name}: quantizing ({method})")
        report = quantize(fp32, "digits", work / f"{name}.{method}.int8.onnx", method=method,
                          samples=args.samples, latency_rounds=0)
        row["quantized"][method] = report.document()
        row["right"][method] = correctness(work / f"{name}.{method}.int8.onnx")
    say(f"{name}: quantizing (minmax, per-tensor weights)")
    report = quantize(fp32, "digits", work / f"{name}.tensor.int8.onnx", samples=args.samples,
                      per_channel=False, latency_rounds=0)
    row["quantized"]["per_tensor"] = report.document()
    row["right"]["per_tensor"] = correctness(work / f"{name}.tensor.int8.onnx")
    if name in args.qat_specs.split(","):
        qat_out = work / f"{name}.qat.int8.onnx"
        say(f"{name}: archc qat, {args.qat_epochs} epochs")
        row["qat"] = json.loads(cli("qat", checkpoint, "--data", "digits", "-o", qat_out,
                                    "--epochs", args.qat_epochs, "--lr", args.qat_lr,
                                    "--samples", args.samples, "--latency-rounds", 0, "--json"))
        # control: the same extra epochs in float (same lr, no weight decay), then PTQ
        say(f"{name}: control, {args.qat_epochs} more float epochs, then PTQ")
        tuned = work / f"{name}.tuned.pt"
        cli("train", checkpoint, "--data", "digits", "--epochs", args.qat_epochs, "--lr",
            args.qat_lr, "--weight-decay", 0, "-o", tuned)
        cli("fuse", tuned, "-o", work / f"{name}.tuned.onnx", "--quiet")
        row["tuned_ptq"] = quantize(work / f"{name}.tuned.onnx", "digits",
                                    work / f"{name}.tuned.int8.onnx", samples=args.samples,
                                    latency_rounds=0).document()
        row["right"]["qat"] = correctness(qat_out)
        row["right"]["tuned_fp32"] = correctness(work / f"{name}.tuned.onnx")
        row["right"]["tuned_ptq"] = correctness(work / f"{name}.tuned.int8.onnx")
    int8 = work / f"{name}.minmax.int8.onnx"
    row["latency"] = {}
    for batch in (1, args.batch):
        say(f"{name}: latency at batch {batch} ({args.rounds} interleaved rounds)")
        row["latency"][batch] = latency(fp32, int8, batch, args)
    return row


def _right(bits: str) -> list[bool]:
    return [bit == "1" for bit in bits]


def _accuracy(bits: str) -> str:
    """'98.89% [97.2, 99.6]': top-1 and its 95% Wilson interval (n is in the table's caption)."""
    from archc.common.accuracy_stats import accuracy_with_interval

    return accuracy_with_interval(bits.count("1"), len(bits), counts=False)


def _versus(bits: str, reference: str) -> str:
    """'+0.28 (1:0, p = 1)': `bits` against `reference` on the same images (exact McNemar)."""
    from archc.common.accuracy_stats import compare_paired

    return compare_paired(_right(reference), _right(bits)).difference()


def _any_difference(pairs: list[tuple[str, str]]) -> str:
    """The verdict over several paired comparisons: which of them the test calls a difference."""
    from archc.common.accuracy_stats import compare_paired

    found = [compare_paired(_right(a), _right(b)) for a, b in pairs]
    different = sum(paired.different for paired in found)
    n = found[0].n if found else 0
    return (f"{different} of {len(found)} comparisons differ at p < 0.05 (exact McNemar, "
            f"n = {n} paired images)")


def accuracy_table(rows: list[dict]) -> str:
    kinds = [*METHODS, "per_tensor"]
    lines = ["| spec | deploy convs | weights, calibration | top-1 [95% CI] | "
             "Δ to fp32 (only int8 right : only fp32 right, McNemar p) | SQNR | "
             "top-1 agreement |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        right = row["right"]
        lines.append(f"| {row['name']} | {row['convs']} | fp32 | {_accuracy(right['fp32'])} "
                     f"| | | |")
        for kind in kinds:
            q = row["quantized"][kind]
            label = ("per-tensor, minmax" if kind == "per_tensor"
                     else f"per-channel, {kind}")
            lines.append(f"| | | int8 {label} | {_accuracy(right[kind])} | "
                         f"{_versus(right[kind], right['fp32'])} | {q['sqnr_db']:.1f} dB | "
                         f"{q['top1_agreement']:.1f}% |")
    pairs = [(row["right"]["fp32"], row["right"][kind]) for row in rows for kind in kinds]
    return "\n".join(lines) + "\n\n" + _any_difference(pairs) + "."


def repvgg_table(rows: list[dict]) -> str:
    lines = ["| spec | model | top-1 [95% CI] | Δ to the deploy form's fp32 (only this right : "
             "only it right, McNemar p) | Δ to float fine-tuning + PTQ (same) | SQNR |",
             "|---|---|---|---|---|---|"]
    pairs = []
    for row in rows:
        if "qat" not in row:
            continue
        right = row["right"]
        deploy = right["fp32"]
        entries = (("deploy form, fp32", "fp32", None),
                   ("PTQ of the deploy form", "minmax",
                    row["quantized"]["minmax"]["sqnr_db"]),
                   ("float fine-tuning, fp32", "tuned_fp32", None),
                   ("float fine-tuning + PTQ", "tuned_ptq", row["tuned_ptq"]["sqnr_db"]),
                   ("QAT, int8", "qat", row["qat"]["sqnr_db"]))
        for label, key, sqnr in entries:
            against_deploy = "" if key == "fp32" else _versus(right[key], deploy)
            against_control = _versus(right[key], right["tuned_ptq"]) if key == "qat" else ""
            lines.append(f"| {row['name'] if key == 'fp32' else ''} | {label} | "
                         f"{_accuracy(right[key])} | {against_deploy} | {against_control} | "
                         f"{'' if sqnr is None else f'{sqnr:.1f} dB'} |")
            if key != "fp32":
                pairs.append((deploy, right[key]))
        pairs.append((right["tuned_ptq"], right["qat"]))
    return "\n".join(lines) + "\n\n" + _any_difference(pairs) + "."


def latency_table(rows: list[dict]) -> str:
    lines = ["| spec | batch | fp32 | int8 | int8/fp32 | integer ops ORT runs | float convs left |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        q = row["quantized"]["minmax"]
        ops = ", ".join(f"{op} {n}" for op, n in sorted(q["quantized_ops"].items()))
        for batch, timing in row["latency"].items():
            lines.append(f"| {row['name']} | {batch} | {timing['fp32']:.3f} ms | "
                         f"{timing['int8']:.3f} ms | {timing['int8'] / timing['fp32']:.2f} | "
                         f"{ops} | {q['float_convs']} |")
    return "\n".join(lines)


def machine(args) -> str:
    import platform

    import onnxruntime

    cpu = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info
                    if line.startswith("model name")), cpu)
    return (f"{cpu}, {platform.machine()}, onnxruntime {onnxruntime.__version__}, "
            f"{args.threads} intra-op thread(s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6, help="training epochs per spec")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--samples", type=int, default=256, help="calibration images")
    parser.add_argument("--rounds", type=int, default=21, help="interleaved timing rounds")
    parser.add_argument("--iterations", type=int, default=50, help="runs per round")
    parser.add_argument("--batch", type=int, default=64, help="the second timed batch size")
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads of the timings")
    parser.add_argument("--specs", default=",".join(NAMES),
                        help="comma-separated names in docs/examples/quantization")
    parser.add_argument("--qat-specs", default="repvgg_digits,qarepvgg_digits",
                        help="specs that also get `archc qat` and its float control")
    parser.add_argument("--qat-epochs", type=int, default=2,
                        help="fine-tuning epochs of archc qat (and of its float control)")
    parser.add_argument("--qat-lr", type=float, default=0.01, help="learning rate of archc qat")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--tables", type=Path, metavar="RESULTS.json",
                        help="measure nothing: print the tables of a --json file written before")
    args = parser.parse_args()
    if args.tables:
        results = json.loads(args.tables.read_text())
    else:
        import torch

        torch.set_num_threads(args.threads)
        rows = []
        with tempfile.TemporaryDirectory(prefix="archc-bench-quant-") as folder:
            for name in args.specs.split(","):
                rows.append(bench_spec(name, Path(folder), args))
        # file arguments by name only: the docs must not name a folder on the measuring machine
        command = " ".join(["bench/quantization.py",
                            *(Path(a).name if "/" in a else a for a in sys.argv[1:])])
        n = len(rows[0]["right"]["fp32"]) if rows else 0
        results = {"measured": f"Measured with `{command}` on {machine(args)}; {args.epochs} "
                               f"epochs, seed {args.seed}, {args.samples} calibration images, "
                               f"{n} validation images.", "rows": rows}
        if args.json:
            from archc.common.fileio import atomic_output

            with atomic_output(args.json) as temporary:
                temporary.write_text(json.dumps(results, indent=1) + "\n")
    rows = results["rows"]
    print(results["measured"] + "\n")
    print(accuracy_table(rows))
    print()
    print(repvgg_table(rows))
    print()
    print(latency_table(rows))


if __name__ == "__main__":
    main()
