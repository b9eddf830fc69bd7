"""Print the tables of docs/compression.md from the results.json of bench/compression/run.py.

    python bench/compression/tables.py OUT_DIR/results.json

Every accuracy is printed with its 95% Wilson interval, and every comparison pairs the two models
image by image on the validation split (each entry's "right" strings: "1" where the model is
right) with the exact McNemar test (archc.common.accuracy_stats). A cell "Δ (b:c, p = P)" is
the row's accuracy minus the reference's in points, b the images only the row's model gets
right, c those only the reference gets right, P the two-sided p-value; a difference is called
one only for P < 0.05.
"""

from __future__ import annotations

import json
import sys

from archc.common.accuracy_stats import accuracy_with_interval, compare_paired

PRUNED = (("resnet_l1_p50", "resnet"), ("regnetx_l1_p50_keep-count", "regnetx"),
          ("regnetx_l1_p50_keep-width", "regnetx"),
          ("regnetx_l1_global_p50_keep-count", "regnetx"),
          ("regnetx_l1_p50_keep-count_kd", "regnetx"),
          ("regnetx_l1_global_p50_keep-count_kd", "regnetx"),
          ("regnetx_l1_p50_keep-width_kd", "regnetx"),
          ("resnet_slim_bn_p50", "resnet_slimming"), ("resnet_bn_p50", "resnet"),
          ("resnet_l1_global_p50", "resnet"), ("resnet_random_p50", "resnet"))


def pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%"


def right(bits: str) -> list[bool]:
    return [bit == "1" for bit in bits]


def acc(bits: str) -> str:
    return accuracy_with_interval(bits.count("1"), len(bits), counts=False)


class Tests:
    """The paired comparisons of the tables, for the count printed under each."""

    def __init__(self):
        self.found = []

    def versus(self, bits: str, reference: str) -> str:
        paired = compare_paired(right(reference), right(bits))
        self.found.append(paired)
        return paired.difference()

    def summary(self) -> str:
        found, self.found = self.found, []
        different = sum(paired.different for paired in found)
        return (f"{different} of {len(found)} comparisons above differ at p < 0.05 (exact "
                f"McNemar, n = {found[0].n} paired images)." if found else "")


def print_seeds(r: dict, seeds: list[int], tests: Tests) -> None:
    """The ResNet pruning criteria right after pruning, per training seed, and each against
    per-layer l1 in every seed: a criterion is called better or worse only when McNemar says so
    in every seed, in the same direction."""
    def key(name: str, seed: int) -> str:
        return name if seed == 0 else f"{name}_seed{seed}"

    criteria = ("resnet_l1_p50", "resnet_bn_p50", "resnet_slim_bn_p50", "resnet_l1_global_p50",
                "resnet_random_p50")
    print("| criterion (accuracy right after pruning) | "
          + " | ".join(f"seed {seed}" for seed in seeds) + " |\n|---|"
          + "---:|" * len(seeds))
    for name in criteria:
        print(f"| {name} | " + " | ".join(acc(r[key(name, seed)]["right_pruned"])
                                          for seed in seeds) + " |")
    print()
    print("| vs resnet_l1_p50, right after pruning | "
          + " | ".join(f"seed {seed}: Δ (b:c, p)" for seed in seeds)
          + " | verdict over the seeds |\n|---|" + "---:|" * len(seeds) + "---|")
    for name in criteria[1:]:
        found = [compare_paired(right(r[key("resnet_l1_p50", seed)]["right_pruned"]),
                                right(r[key(name, seed)]["right_pruned"])) for seed in seeds]
        directions = {paired.only_b > paired.only_a for paired in found}
        if all(paired.different for paired in found) and len(directions) == 1:
            verdict = (f"{'better' if directions.pop() else 'worse'} in all {len(seeds)} "
                       f"seeds (each p < 0.05)")
        else:
            verdict = (f"no consistent difference ({sum(p.different for p in found)} of "
                       f"{len(seeds)} seeds differ at p < 0.05)")
        print(f"| {name} | " + " | ".join(paired.difference() for paired in found)
              + f" | {verdict} |")


def main(path: str) -> None:
    with open(path) as handle:
        r = json.load(handle)
    tests = Tests()
    n = len(r["resnet"]["right"])
    print(f"n = {n} validation images per accuracy; [..] the 95% Wilson interval.\n")
    print("| model | command | accuracy [95% CI] |\n|---|---|---:|")
    for name in ("resnet", "regnetx", "resnet_slimming"):
        if name in r:
            print(f"| {name} | `{r[name]['command']}` | {acc(r[name]['right'])} |")
    if "resnet_slimming" in r:
        print(f"\nresnet_slimming vs resnet: "
              f"{tests.versus(r['resnet_slimming']['right'], r['resnet']['right'])}")
        tests.summary()  # counted on its own line, not in the next table's count
    print()
    print("| run | prune command | MACs kept | params kept | accuracy after pruning | "
          "after fine-tuning | unpruned | fine-tuned vs unpruned: Δ (b:c, p) |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|")
    for name, base in PRUNED:
        if name not in r:
            continue
        e = r[name]
        print(f"| {name} | `{e['command']}` | {pct(e['macs'][1], e['macs'][0])} | "
              f"{pct(e['params'][1], e['params'][0])} | {acc(e['right_pruned'])} | "
              f"{acc(e['right_fine_tuned'])} | {acc(r[base]['right'])} | "
              f"{tests.versus(e['right_fine_tuned'], r[base]['right'])} |")
    print("\n" + tests.summary())
    print()
    print("| comparison | after pruning: Δ (b:c, p) | after fine-tuning: Δ (b:c, p) |\n"
          "|---|---:|---:|")
    pairs = [(f"{name}_kd vs {name} (teacher vs none)", f"{name}_kd", name)
             for name in ("regnetx_l1_p50_keep-count", "regnetx_l1_global_p50_keep-count",
                          "regnetx_l1_p50_keep-width")]
    pairs += [("regnetx keep-width vs keep-count (per layer)", "regnetx_l1_p50_keep-width",
               "regnetx_l1_p50_keep-count")]
    pairs += [(f"{name} vs resnet_l1_p50", name, "resnet_l1_p50")
              for name in ("resnet_slim_bn_p50", "resnet_bn_p50", "resnet_l1_global_p50",
                           "resnet_random_p50")]
    pairs += [("resnet_slim_bn_p50 vs resnet_bn_p50", "resnet_slim_bn_p50", "resnet_bn_p50")]
    for label, a, b in pairs:
        if a in r and b in r:
            before = ("(same pruned checkpoint)" if r[a]["right_pruned"] == r[b]["right_pruned"]
                      and a.endswith("_kd") else
                      tests.versus(r[a]["right_pruned"], r[b]["right_pruned"]))
            print(f"| {label} | {before} | "
                  f"{tests.versus(r[a]['right_fine_tuned'], r[b]['right_fine_tuned'])} |")
    print("\n" + tests.summary())
    seeds = [0] + sorted({int(k.rsplit("seed", 1)[1]) for k in r if "_seed" in k})
    if len(seeds) > 1:
        print()
        print_seeds(r, seeds, tests)
    print()
    print("| model | energy | layers replaced | MACs kept | params kept | relative output error "
          "| accuracy (no fine-tuning) | vs the model it came from: Δ (b:c, p) |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")
    for model in ("resnet", "regnetx", "resnet (--kxk spatial)"):
        for energy in ("0.99", "0.95", "0.9", "0.8", "0.6"):
            key = "resnet_lowrank_spatial" if "spatial" in model else f"{model}_lowrank"
            e = r.get(f"{key}_{energy}")
            if e:
                base = r["resnet" if "resnet" in model else "regnetx"]["right"]
                print(f"| {model} | {energy} | {e['layers']} | {pct(e['macs'][1], e['macs'][0])}"
                      f" | {pct(e['params'][1], e['params'][0])} | {e['output_error']:.2e} | "
                      f"{acc(e['right'])} | {tests.versus(e['right'], base)} |")
    print("\n" + tests.summary())
    print()
    print("| energy | Kx1 + 1xK vs Tucker-2 (ResNet): Δ (b:c, p) |\n|---:|---:|")
    for energy in ("0.9", "0.8", "0.6"):
        spatial, tucker = (r.get(f"resnet_lowrank_spatial_{energy}"),
                           r.get(f"resnet_lowrank_{energy}"))
        if spatial and tucker:
            print(f"| {energy} | {tests.versus(spatial['right'], tucker['right'])} |")
    print("\n" + tests.summary())
    print()
    print("| student | command | accuracy [95% CI] |\n|---|---|---:|")
    for name in ("student_plain", "student_kd"):
        if name in r:
            print(f"| {name} | `{r[name]['command']}` | {acc(r[name]['right'])} |")
    if "student_kd" in r and "student_plain" in r:
        print(f"\nstudent_kd vs student_plain: "
              f"{tests.versus(r['student_kd']['right'], r['student_plain']['right'])}; "
              f"student_plain vs the teacher resnet: "
              f"{tests.versus(r['student_plain']['right'], r['resnet']['right'])}")
    tests.summary()
    print()
    print("| step | command | params | MACs | accuracy [95% CI] | vs the previous step: Δ (b:c, "
          "p) |\n|---|---|---:|---:|---:|---:|")
    previous = None
    for name in ("reducenet_train", "reducenet_reduced", "reducenet_reduced_ft",
                 "reducenet_lora", "reducenet_fused"):
        if name in r:
            e = r[name]
            macs = f"{e['macs']:,}" if "macs" in e else "-"
            extra = (f" (merge rel. error {e['merge_relative_error']:.1e})"
                     if "merge_relative_error" in e else "")
            against = "" if previous is None else tests.versus(e["right"], previous)
            print(f"| {name} | `{e['command']}` | {e['params']:,} | {macs} | "
                  f"{acc(e['right'])}{extra} | {against} |")
            previous = e["right"]
    if "reducenet_reduced_ft" in r:
        print(f"\nreducenet_reduced_ft vs reducenet_train: "
              f"{tests.versus(r['reducenet_reduced_ft']['right'], r['reducenet_train']['right'])}")
    tests.summary()


if __name__ == "__main__":
    main(sys.argv[1])
