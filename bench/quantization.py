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

    .venv/bin/python bench/quantization.py [--epochs 6] [--rounds 21] [--threads 1]

Prints two markdown tables on stdout (progress on stderr).
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
           "convs": fused["deploy_form"]["convs"], "quantized": {}}
    for method in METHODS:
        say(f"{name}: quantizing ({method})")
        report = quantize(fp32, "digits", work / f"{name}.{method}.int8.onnx", method=method,
                          samples=args.samples, latency_rounds=0)
        row["quantized"][method] = report.document()
    say(f"{name}: quantizing (minmax, per-tensor weights)")
    report = quantize(fp32, "digits", work / f"{name}.tensor.int8.onnx", samples=args.samples,
                      per_channel=False, latency_rounds=0)
    row["quantized"]["per_tensor"] = report.document()
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
    int8 = work / f"{name}.minmax.int8.onnx"
    row["latency"] = {}
    for batch in (1, args.batch):
        say(f"{name}: latency at batch {batch} ({args.rounds} interleaved rounds)")
        row["latency"][batch] = latency(fp32, int8, batch, args)
    return row


def accuracy_table(rows: list[dict]) -> str:
    lines = ["| spec | deploy convs | fp32 top-1 | " + " | ".join(
                 f"int8 {m} top-1 (Δ) / SQNR / agree" for m in METHODS)
             + " | int8 per-tensor min-max top-1 (Δ) / SQNR |",
             "|---|---|---|" + "---|" * (len(METHODS) + 1)]
    for row in rows:
        fp32 = row["quantized"]["minmax"]["fp32_accuracy"]
        cells = []
        for method in METHODS:
            q = row["quantized"][method]
            cells.append(f"{q['int8_accuracy']:.2f}% ({q['int8_accuracy'] - fp32:+.2f}) / "
                         f"{q['sqnr_db']:.1f} dB / {q['top1_agreement']:.1f}%")
        q = row["quantized"]["per_tensor"]
        cells.append(f"{q['int8_accuracy']:.2f}% ({q['int8_accuracy'] - fp32:+.2f}) / "
                     f"{q['sqnr_db']:.1f} dB")
        lines.append(f"| {row['name']} | {row['convs']} | {fp32:.2f}% | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def repvgg_table(rows: list[dict]) -> str:
    lines = ["| spec | fp32 top-1 (deploy form) | PTQ top-1 (Δ) / SQNR | "
             "float fine-tuning + PTQ: fp32 / int8 top-1 (Δ to deploy fp32) / SQNR | "
             "QAT int8 top-1 (Δ to deploy fp32) / SQNR vs fine-tuned fp32 |",
             "|---|---|---|---|---|"]
    for row in rows:
        if "qat" not in row:
            continue
        ptq, tuned, qat = row["quantized"]["minmax"], row["tuned_ptq"], row["qat"]
        fp32 = ptq["fp32_accuracy"]
        lines.append(
            f"| {row['name']} | {fp32:.2f}% | {ptq['int8_accuracy']:.2f}% "
            f"({ptq['int8_accuracy'] - fp32:+.2f}) / {ptq['sqnr_db']:.1f} dB | "
            f"{tuned['fp32_accuracy']:.2f}% / {tuned['int8_accuracy']:.2f}% "
            f"({tuned['int8_accuracy'] - fp32:+.2f}) / {tuned['sqnr_db']:.1f} dB | "
            f"{qat['int8_accuracy']:.2f}% ({qat['int8_accuracy'] - fp32:+.2f}) / "
            f"{qat['sqnr_db']:.1f} dB |")
    return "\n".join(lines)


def latency_table(rows: list[dict], args) -> str:
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
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="archc-bench-quant-") as folder:
        for name in args.specs.split(","):
            rows.append(bench_spec(name, Path(folder), args))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    # file arguments by name only: the docs must not name a folder on the measuring machine
    command = " ".join(["bench/quantization.py",
                        *(Path(a).name if "/" in a else a for a in sys.argv[1:])])
    print(f"Measured with `{command}` on {machine(args)}; {args.epochs} epochs, seed "
          f"{args.seed}, {args.samples} calibration images, 360 validation images.\n")
    print(accuracy_table(rows))
    print()
    print(repvgg_table(rows))
    print()
    print(latency_table(rows, args))


if __name__ == "__main__":
    main()
