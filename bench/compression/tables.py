"""Print the tables of docs/compression.md from the results.json of bench/compression/run.py.

    python bench/compression/tables.py OUT_DIR/results.json
"""

from __future__ import annotations

import json
import sys


def pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%"


def main(path: str) -> None:
    with open(path) as handle:
        r = json.load(handle)
    print("| model | MACs | params | accuracy |\n|---|---:|---:|---:|")
    for name in ("resnet", "regnetx"):
        if name in r:
            print(f"| {name} (unpruned, `{r[name]['command']}`) | 100% | 100% | "
                  f"{r[name]['accuracy']:.2f}% |")
    print()
    print("| run | prune command | MACs kept | params kept | accuracy after pruning | "
          "after fine-tuning | unpruned |\n|---|---|---:|---:|---:|---:|---:|")
    for name, base in (("resnet_l1_p50", "resnet"), ("regnetx_l1_p50_keep-count", "regnetx"),
                       ("regnetx_l1_p50_keep-width", "regnetx"),
                       ("regnetx_l1_global_p50_keep-count", "regnetx"),
                       ("regnetx_l1_p50_keep-count_kd", "regnetx"),
                       ("regnetx_l1_global_p50_keep-count_kd", "regnetx"),
                       ("regnetx_l1_p50_keep-width_kd", "regnetx"),
                       ("resnet_slim_bn_p50", "resnet_slimming"), ("resnet_bn_p50", "resnet"),
                       ("resnet_l1_global_p50", "resnet"), ("resnet_random_p50", "resnet")):
        if name not in r:
            continue
        e = r[name]
        print(f"| {name} | `{e['command']}` | {pct(e['macs'][1], e['macs'][0])} | "
              f"{pct(e['params'][1], e['params'][0])} | {e['accuracy_pruned']:.2f}% | "
              f"{e['accuracy_fine_tuned']:.2f}% | {r[base]['accuracy']:.2f}% |")
    print()
    print("| model | energy | layers replaced | MACs kept | params kept | relative output error "
          "| accuracy (no fine-tuning) |\n|---|---:|---:|---:|---:|---:|---:|")
    for model in ("resnet", "regnetx", "resnet (--kxk spatial)"):
        for energy in ("0.99", "0.95", "0.9", "0.8", "0.6"):
            key = "resnet_lowrank_spatial" if "spatial" in model else f"{model}_lowrank"
            e = r.get(f"{key}_{energy}")
            if e:
                print(f"| {model} | {energy} | {e['layers']} | {pct(e['macs'][1], e['macs'][0])}"
                      f" | {pct(e['params'][1], e['params'][0])} | {e['output_error']:.2e} | "
                      f"{e['accuracy']:.2f}% |")
    print()
    print("| student | command | accuracy |\n|---|---|---:|")
    for name in ("student_plain", "student_kd"):
        if name in r:
            print(f"| {name} | `{r[name]['command']}` | {r[name]['accuracy']:.2f}% |")
    print()
    print("| step | command | params | MACs | accuracy |\n|---|---|---:|---:|---:|")
    for name in ("reducenet_train", "reducenet_reduced", "reducenet_reduced_ft",
                 "reducenet_lora", "reducenet_fused"):
        if name in r:
            e = r[name]
            macs = f"{e['macs']:,}" if "macs" in e else "-"
            extra = (f" (merge rel. error {e['merge_relative_error']:.1e})"
                     if "merge_relative_error" in e else "")
            print(f"| {name} | `{e['command']}` | {e['params']:,} | {macs} | "
                  f"{e['accuracy']:.2f}%{extra} |")


if __name__ == "__main__":
    main(sys.argv[1])
