"""The compression experiments of docs/compression.md on 8x8 digits, through the CLI.

    python bench/compression/run.py OUT_DIR      # writes OUT_DIR/results.json and the checkpoints

Every figure in docs/compression.md comes from the results.json this writes; each entry records
the command line that produced it and, for each accuracy, the model's correctness on every
validation image (`right*`: "1" right, "0" wrong, from `archc eval --predictions`), from which
tables.py computes the intervals and the paired tests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
EPOCHS, FINE_TUNE = 15, 8
TRAIN = ["--data", "digits", "--lr", "0.1", "--warmup-epochs", "1", "--threads", "1"]
TUNE = ["--data", "digits", "--lr", "0.02", "--threads", "1"]
SEEDS = (0, 1, 2)  # training seeds of the pruning-criterion comparison (0: every other entry)
# (entry of seed 0, the model it prunes, prune options): the criteria compared right after pruning
CRITERIA = (("resnet_l1_p50", "resnet", ("--macs", "0.5")),
            ("resnet_slim_bn_p50", "resnet_slimming",
             ("--macs", "0.5", "--criterion", "bn-scale", "--global")),
            ("resnet_bn_p50", "resnet", ("--macs", "0.5", "--criterion", "bn-scale", "--global")),
            ("resnet_l1_global_p50", "resnet", ("--macs", "0.5", "--global")),
            ("resnet_random_p50", "resnet", ("--macs", "0.5", "--criterion", "random")))


def archc(*args: str) -> dict:
    command = [sys.executable, "-m", "archc", *map(str, args)]
    print("$", " ".join(command[2:]), file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}


def scored(model: Path) -> tuple[float, str]:
    """(accuracy, correctness) of a checkpoint or ONNX file on the digits validation split, from
    `archc eval --predictions`: the correctness is one character per validation image, "1" right
    and "0" wrong, in the split's order, for the paired tests of tables.py."""
    predictions = model.with_name(model.name + ".predictions.json")
    metrics = archc("eval", model, "--data", "digits", "--predictions", predictions)
    document = json.loads(predictions.read_text())
    right = "".join("1" if label == top1 else "0"
                    for label, top1 in zip(document["labels"], document["predictions"],
                                           strict=True))
    return metrics["accuracy"], right


def trained_accuracy(ckpt: Path, metrics: dict) -> tuple[float, str]:
    """`scored(ckpt)`, compared with the final validation error `archc train` reported (a
    difference is printed: the saved model is not the one the loop last evaluated)."""
    accuracy, right = scored(ckpt)
    if abs(accuracy - (100 - metrics["final_error"])) > 1e-9:
        print(f"note: {ckpt.name}: archc eval gives {accuracy:.2f}%, archc train reported "
              f"{100 - metrics['final_error']:.2f}%", file=sys.stderr, flush=True)
    return accuracy, right


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def save():
        results_path.write_text(json.dumps(results, indent=1) + "\n")

    def trained(name: str, spec: str, *extra: str, epochs: int = EPOCHS) -> Path:
        ckpt = out / f"{name}.pt"
        if name not in results:
            metrics = archc("train", HERE / spec, "-o", ckpt, "--epochs", epochs, *TRAIN,
                            *extra)
            shown = [Path(e).name if e.endswith(".pt") else e for e in map(str, extra)]
            accuracy, right = trained_accuracy(ckpt, metrics)
            results[name] = {"command": f"archc train {spec} --epochs {epochs} "
                             + " ".join(TRAIN + shown), "accuracy": accuracy, "right": right}
            save()
        return ckpt

    def pruned(name: str, source: Path, *options: str, teacher: Path | None = None,
               fine_tune: bool = True) -> Path:
        ckpt, tuned = out / f"{name}.pt", out / f"{name}_ft.pt"
        if name not in results and not fine_tune:
            report = archc("prune", source, "-o", ckpt, "--json", *options)
            entry = {"command": f"archc prune {source.name} " + " ".join(options),
                     "macs": report["macs"], "params": report["params"]}
            entry["accuracy_pruned"], entry["right_pruned"] = scored(ckpt)
            results[name] = entry
            save()
        if name not in results:
            report = archc("prune", source, "-o", ckpt, "--json", *options)
            entry = {"command": f"archc prune {source.name} " + " ".join(options),
                     "macs": report["macs"], "params": report["params"]}
            entry["accuracy_pruned"], entry["right_pruned"] = scored(ckpt)
            kd = [] if teacher is None else ["--teacher", str(teacher), "--kd-weight", "0.7"]
            metrics = archc("train", ckpt, "-o", tuned, "--epochs", FINE_TUNE, *TUNE, *kd)
            shown = [Path(o).name if o.endswith(".pt") else o for o in kd]
            entry["fine_tune"] = (f"archc train {ckpt.name} --epochs {FINE_TUNE} "
                                  + " ".join(TUNE + shown))
            entry["accuracy_fine_tuned"], entry["right_fine_tuned"] = trained_accuracy(tuned,
                                                                                       metrics)
            results[name] = entry
            save()
        return tuned

    resnet = trained("resnet", "digits_resnet.yaml")
    regnet = trained("regnetx", "digits_regnetx.yaml")
    pruned("resnet_l1_p50", resnet, "--macs", "0.5")
    pruned("regnetx_l1_p50_keep-count", regnet, "--macs", "0.5")
    pruned("regnetx_l1_p50_keep-width", regnet, "--macs", "0.5", "--group-policy", "keep-width")
    pruned("regnetx_l1_global_p50_keep-count", regnet, "--macs", "0.5", "--global")
    # the same RegNetX prunings fine-tuned with the unpruned model as teacher
    pruned("regnetx_l1_p50_keep-count_kd", regnet, "--macs", "0.5", teacher=regnet)
    pruned("regnetx_l1_global_p50_keep-count_kd", regnet, "--macs", "0.5", "--global",
           teacher=regnet)
    pruned("regnetx_l1_p50_keep-width_kd", regnet, "--macs", "0.5", "--group-policy",
           "keep-width", teacher=regnet)
    # slimming vs L1 vs random (ResNet): the same MACs target and fine-tuning budget
    slim = trained("resnet_slimming", "digits_resnet.yaml", "--slimming", "1e-4")
    pruned("resnet_slim_bn_p50", slim, "--macs", "0.5", "--criterion", "bn-scale", "--global")
    pruned("resnet_bn_p50", resnet, "--macs", "0.5", "--criterion", "bn-scale", "--global")
    pruned("resnet_random_p50", resnet, "--macs", "0.5", "--criterion", "random")
    pruned("resnet_l1_global_p50", resnet, "--macs", "0.5", "--global")
    # the same criteria right after pruning, on ResNets trained with two more seeds: is the
    # ranking a property of the criterion or of one trained model?
    for seed in SEEDS[1:]:
        base = trained(f"resnet_seed{seed}", "digits_resnet.yaml", "--seed", str(seed))
        slimmed = trained(f"resnet_slimming_seed{seed}", "digits_resnet.yaml", "--slimming",
                          "1e-4", "--seed", str(seed))
        for criterion, source, options in CRITERIA:
            pruned(f"{criterion}_seed{seed}", slimmed if source == "resnet_slimming" else base,
                   *options, fine_tune=False)
    # low-rank across energies
    for model, ckpt in (("resnet", resnet), ("regnetx", regnet)):
        for energy in ("0.99", "0.95", "0.9", "0.8", "0.6"):
            name = f"{model}_lowrank_{energy}"
            if name not in results:
                target = out / f"{name}.pt"
                report = archc("lowrank", ckpt, "--energy", energy, "--data", "digits", "-o",
                               target, "--json")
                results[name] = {"command": f"archc lowrank {ckpt.name} --energy {energy} "
                                 "--data digits",
                                 "macs": report["macs"], "params": report["params"],
                                 "output_error": report["output_error"],
                                 "layers": len(report["layers"])}
                results[name]["accuracy"], results[name]["right"] = scored(target)
                save()
    # the Kx1 -> 1xK chain instead of Tucker-2 for the ResNet's 3x3 convs
    for energy in ("0.9", "0.8", "0.6"):
        name = f"resnet_lowrank_spatial_{energy}"
        if name not in results:
            target = out / f"{name}.pt"
            report = archc("lowrank", resnet, "--energy", energy, "--kxk", "spatial", "--data",
                           "digits", "-o", target, "--json")
            results[name] = {"command": f"archc lowrank resnet.pt --energy {energy} --kxk "
                             "spatial --data digits",
                             "macs": report["macs"], "params": report["params"],
                             "output_error": report["output_error"],
                             "layers": len(report["layers"])}
            results[name]["accuracy"], results[name]["right"] = scored(target)
            save()
    # distillation: the half-width student with and without the ResNet teacher
    trained("student_plain", "digits_resnet_half.yaml")
    trained("student_kd", "digits_resnet_half.yaml", "--teacher", str(resnet),
            "--kd-temperature", "4", "--kd-weight", "0.7")
    # ReduceNet: train phase -> reduced -> distilled fine-tuning (classifier frozen) -> a rank-4
    # linear branch beside every conv, merged -> fused deploy form
    reducenet = trained("reducenet_train", "digits_reducenet.yaml")
    if "reducenet_reduced" not in results:
        reduced = out / "reducenet_reduced.pt"
        archc("reduce", reducenet, "-o", reduced)
        accuracy, right = scored(reduced)
        results["reducenet_reduced"] = {"command": "archc reduce reducenet_train.pt",
                                        "accuracy": accuracy, "right": right}
        save()
    steps = (("reducenet_reduced_ft", "reducenet_reduced", FINE_TUNE, []),
             ("reducenet_lora", "reducenet_reduced_ft", 4, ["--lora", "4"]))
    for name, source, epochs, extra in steps:
        if name not in results:
            options = [*TUNE, "--teacher", str(reducenet), "--kd-weight", "0.7", "--freeze",
                       "head.*", *extra]
            metrics = archc("train", out / f"{source}.pt", "-o", out / f"{name}.pt", "--epochs",
                            epochs, *options)
            shown = [o if o != str(reducenet) else "reducenet_train.pt" for o in options]
            accuracy, right = trained_accuracy(out / f"{name}.pt", metrics)
            results[name] = {"command": f"archc train {source}.pt --epochs {epochs} "
                             + " ".join(shown), "accuracy": accuracy, "right": right,
                             **{k: v for k, v in metrics.get("compression", {}).items()
                                if k.startswith("merge")}}
            save()
    for name in ("reducenet_train", "reducenet_reduced", "reducenet_reduced_ft",
                 "reducenet_lora"):
        if "params" not in results[name]:
            info = archc("info", out / f"{name}.pt", "--json")
            results[name].update(params=info["params"], macs=info["flops"])
            save()
    if "reducenet_fused" not in results:
        onnx = out / "reducenet_fused.onnx"
        report = archc("fuse", out / "reducenet_lora.pt", "-o", onnx, "--json")
        accuracy, right = scored(onnx)
        results["reducenet_fused"] = {
            "command": "archc fuse reducenet_lora.pt -o reducenet_fused.onnx",
            "params": report["deploy_form"]["params"], "convs": report["deploy_form"]["convs"],
            "accuracy": accuracy, "right": right}
        save()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, metavar="OUT_DIR",
                        help="folder for results.json and the checkpoints (a rerun resumes: "
                        "entries already in OUT_DIR/results.json are kept)")
    main(parser.parse_args().out)
