"""Streaming image-folder training: memory against the number of images, speed against a plain loop.

    python bench/train_data.py                        # train-data section of docs/performance.md
    python bench/train_data.py --sizes 2000,20000 --rounds 2 --out /tmp/perf.md

Protocol (as bench/run.py): generate, into a temporary folder, N 64x64 JPEG images in 10 class
folders (`DIR/<class>/<i>.jpg`: a class colour plus noise, written by Pillow) for every N of
`--sizes`; then, interleaved in rounds, for every N:
- `archc train SPEC --data DIR --workers 2 --epochs 1` in a subprocess, as a user runs it;
- a plain hand-written loop in a subprocess (this file with `--plain`): a torch Dataset that opens
  each file with PIL and applies the same transform function (`archc.train.transforms.transform`),
  a `DataLoader(shuffle=True, num_workers=2)`, the same model (archc's build and init), SGD with
  the same settings, channels_last and one intra-op thread as archc's loop, then one pass over the
  validation images; both subprocesses get the OpenMP wait policy the archc CLI sets (PASSIVE).
Both see the same train/validation files (archc's fixed split). Reported per N and loop: the peak
resident set size of the subprocess (`os.wait4`'s ru_maxrss: the largest of the process and its
waited-for children, i.e. the main process or one DataLoader worker), and images/s = training
images / the epoch's wall time (training and the validation pass; start-up and the model build
excluded). Medians of the rounds with their spread [min-max]. Nothing is asserted: the numbers go
to docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import ROOT, machine, write_sections  # bench/run.py: the shared protocol helpers

IMAGE_SIZE, CLASSES, WORKERS, BATCH = 64, 10, 2, 64
SPEC = {"name": "tiny64", "input": {"channels": 3, "size": IMAGE_SIZE}, "num_classes": CLASSES,
        "stem": {"type": "simple", "width": 8},
        "body": {"type": "anynet", "stages": [{"block": "res_basic", "depth": 1, "width": 8},
                                              {"block": "res_basic", "depth": 1, "width": 16}]}}
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4  # archc train's defaults


def generate(root: Path, n: int) -> float:
    """N JPEGs of IMAGE_SIZE^2 in CLASSES folders; returns the seconds it took."""
    import numpy as np
    from PIL import Image

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 64, (256, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    colours = rng.integers(0, 192, (CLASSES, 3), dtype=np.uint8)
    for label in range(CLASSES):
        (root / f"class{label}").mkdir(parents=True)
    for i in range(n):
        label = i % CLASSES
        pixels = noise[i % len(noise)] + colours[label]
        Image.fromarray(pixels).save(root / f"class{label}" / f"{i:06d}.jpg", quality=90)
    return time.perf_counter() - start


def measured(command: list[str]) -> tuple[dict, float]:
    """(the JSON the command wrote to its last argument, peak RSS in MiB) of one subprocess, run
    with the OpenMP wait policy the archc CLI sets for itself (archc.cli.main.idle_threads_sleep:
    PASSIVE unless the environment chose one), so that both loops run under the same policy."""
    environment = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, env=environment)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with {process.returncode}")
    return json.loads(Path(command[-1]).read_text()), usage.ru_maxrss / 1024  # KiB on Linux


def run_archc(spec: Path, data: Path, out: Path) -> tuple[float, float]:
    metrics, rss = measured([sys.executable, "-m", "archc", "train", str(spec), "--data",
                             str(data), "--epochs", "1", "--workers", str(WORKERS),
                             "--batch-size", str(BATCH), "--quiet", "-o", str(out / "m.pt"),
                             "--metrics", str(out / "archc.json")])
    return metrics["train_size"] / metrics["epochs"][0]["seconds"], rss


def run_plain(data: Path, out: Path) -> tuple[float, float]:
    metrics, rss = measured([sys.executable, __file__, "--plain", str(data),
                             str(out / "plain.json")])
    return metrics["train_size"] / metrics["seconds"], rss


class PlainImages:
    """The hand-written baseline's data set: (path, label) -> (tensor, label)."""

    def __init__(self, files, labels):
        self.files, self.labels = list(map(str, files)), [int(y) for y in labels]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        from PIL import Image

        from archc.train.transforms import transform

        with Image.open(self.files[index]) as image:
            return transform(image, IMAGE_SIZE, 3, None), self.labels[index]


def plain_loop(data: Path, out: Path) -> None:
    """One epoch of a hand-written DataLoader + SGD loop and a validation pass; writes the time."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from archc.frontend.loading import spec_from_mapping
    from archc.frontend.lower import build
    from archc.train.data import open_folder

    torch.manual_seed(0)
    torch.set_num_threads(1)
    folder = open_folder(data, 3, IMAGE_SIZE)
    model = build(spec_from_mapping(SPEC), seed=0).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True,
                                weight_decay=WEIGHT_DECAY)
    train = DataLoader(PlainImages(folder.train_files, folder.train_labels), batch_size=BATCH,
                       shuffle=True, num_workers=WORKERS)
    val = DataLoader(PlainImages(folder.val_files, folder.val_labels), batch_size=BATCH,
                     num_workers=WORKERS)
    start = time.perf_counter()
    model.train()
    for inputs, targets in train:
        loss = F.cross_entropy(model(inputs.contiguous(memory_format=torch.channels_last)),
                               targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    wrong = 0
    with torch.no_grad():
        for inputs, targets in val:
            wrong += int((model(inputs).argmax(1) != targets).sum())
    seconds = time.perf_counter() - start
    out.write_text(json.dumps({"train_size": folder.train_size, "seconds": seconds,
                               "val_error": 100 * wrong / folder.val_size}))


def spread(values: list[float], digits: int = 0) -> str:
    return (f"{statistics.median(values):,.{digits}f} "
            f"[{min(values):,.{digits}f}-{max(values):,.{digits}f}]")


def report(sizes, generation, results, rounds) -> str:
    lines = [
        "## Streaming image folders (`archc train --data DIR --workers 2`)",
        "",
        f"Measured by `python bench/train_data.py` ({rounds} interleaved round(s)) on "
        f"{machine()}. The machine was shared with other processes while this ran, so the "
        f"speeds are indicative; peak RSS is less sensitive to that. Generated {IMAGE_SIZE}x"
        f"{IMAGE_SIZE} JPEGs in {CLASSES} class folders; a tiny ResNet-style spec "
        f"(stem 8, stages 8 and 16 wide) at {IMAGE_SIZE} px, batch {BATCH}, 1 epoch, "
        f"{WORKERS} DataLoader workers, `--augment none`. Images/s = training images / the "
        f"epoch's wall time (training and the validation pass); peak RSS = the largest "
        f"process of the run (main or worker). Medians [min-max] over the rounds.",
        "",
        "| images | generation (s) | archc peak RSS (MiB) | plain loop peak RSS (MiB) | "
        "archc images/s | plain loop images/s | archc / plain |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sizes:
        archc, plain = results[n]["archc"], results[n]["plain"]
        ratio = statistics.median(archc["speed"]) / statistics.median(plain["speed"])
        lines.append(f"| {n:,} | {generation[n]:.1f} | {spread(archc['rss'])} | "
                     f"{spread(plain['rss'])} | {spread(archc['speed'])} | "
                     f"{spread(plain['speed'])} | {ratio:.2f} |")
    overlapping = [n for n in sizes
                   if max(min(results[n]["archc"]["speed"]), min(results[n]["plain"]["speed"]))
                   <= min(max(results[n]["archc"]["speed"]), max(results[n]["plain"]["speed"]))]
    if overlapping:
        lines += ["", f"At {', '.join(f'{n:,}' for n in overlapping)} images the two loops' "
                  f"images/s ranges overlap across rounds: this run cannot say whether, or by how "
                  f"much, their speeds differ on a quiet machine, so it neither shows nor "
                  f"refutes \"within 10%\"."]
    small, large = sizes[0], sizes[-1]
    growth = (statistics.median(results[large]["archc"]["rss"])
              / statistics.median(results[small]["archc"]["rss"]))
    lines += ["", f"archc's peak RSS at {large:,} images is {growth:.2f}x its peak at "
              f"{small:,} (the issue's bound is 1.5x): only the file paths and labels are "
              f"held, the images are decoded batch by batch."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,20000", help="image counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md",
                        help="the markdown file whose train-data section is rewritten")
    parser.add_argument("--plain", nargs=2, type=Path, metavar=("DIR", "JSON"),
                        help=argparse.SUPPRESS)  # the baseline's subprocess
    args = parser.parse_args()
    if args.plain:
        plain_loop(*args.plain)
        return
    sizes = [int(n) for n in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        spec = root / "spec.json"
        spec.write_text(json.dumps(SPEC))
        generation = {}
        for n in sizes:
            generation[n] = generate(root / f"images{n}", n)
            print(f"generated {n} images in {generation[n]:.1f} s", file=sys.stderr, flush=True)
        results = {n: {loop: {"speed": [], "rss": []} for loop in ("archc", "plain")}
                   for n in sizes}
        for round_index in range(args.rounds):
            for n in sizes:
                for loop, run in (("archc", lambda d: run_archc(spec, d, root)),
                                  ("plain", lambda d: run_plain(d, root))):
                    speed, rss = run(root / f"images{n}")
                    results[n][loop]["speed"].append(speed)
                    results[n][loop]["rss"].append(rss)
                    print(f"round {round_index + 1}: {n} images, {loop}: {speed:.0f} images/s, "
                          f"peak RSS {rss:.0f} MiB", file=sys.stderr, flush=True)
    print(write_sections(args.out, {"train-data": report(sizes, generation, results,
                                                         args.rounds)}))


if __name__ == "__main__":
    main()
