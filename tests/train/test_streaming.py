"""Image folders streamed through a DataLoader (archc.train.data.ImageFolder): the same run with 0
and 2 worker processes, ImageNet's train/ + val/ layout, the fixed split kept, nothing decoded
until a batch is asked for, the in-memory reading equal to the streamed one, and bad input
(unreadable image, empty class folder, no class folders, --workers -1, --augment on arrays): one
line, exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from archc.backends.checkpoint import load_checkpoint
from archc.cli.main import main
from archc.errors import DataError
from archc.train.data import ImageFolder, load_data, open_data, split_indices

SPEC = {"name": "tiny_gray", "input": {"channels": 1, "size": 8}, "num_classes": 2,
        "stem": {"type": "simple", "width": 4},
        "body": {"type": "anynet", "stages": [{"block": "res_basic", "depth": 1, "width": 8}]}}


def make_folder(root, per_class=20, classes=("a", "b"), size=8, suffix=".png"):
    rng = np.random.default_rng(0)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 120, (size, size, 3)) + 120 * label
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i:03d}{suffix}")
    return root


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(SPEC))
    return path


def train(spec_file, data, out, *extra):
    metrics = out.with_suffix(".json")
    code = main(["train", str(spec_file), "--data", str(data), "--epochs", "1", "--batch-size",
                 "8", "-o", str(out), "--metrics", str(metrics), "--quiet", *extra])
    assert code == 0
    document = json.loads(metrics.read_text())
    for epoch in document["epochs"]:
        epoch.pop("seconds")
        epoch.pop("images_per_second")
    return {k: v for k, v in document.items() if k not in ("seconds", "checkpoint")}


def test_workers_0_and_2_train_identically(tmp_path, spec_file):
    data = make_folder(tmp_path / "images")
    runs = [train(spec_file, data, tmp_path / f"w{workers}.pt", "--workers", str(workers),
                  "--augment", "basic") for workers in (0, 2)]
    assert runs[0] == runs[1]
    assert (runs[0]["train_size"], runs[0]["val_size"]) == (32, 8)  # the fixed 80% split
    states = [load_checkpoint(tmp_path / f"w{w}.pt")[1].state_dict() for w in (0, 2)]
    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])
    plain = train(spec_file, data, tmp_path / "none.pt", "--workers", "0")
    assert plain["epochs"][0]["train_loss"] != runs[0]["epochs"][0]["train_loss"]  # augmented


def test_folder_split_and_order_are_the_fixed_rules(tmp_path):
    folder = open_data(str(make_folder(tmp_path / "images")), 1, 8)
    assert isinstance(folder, ImageFolder)
    everything = np.array(sorted(str(p) for p in (tmp_path / "images").glob("*/*.png")))
    train, val = split_indices(40, "x")
    assert list(folder.train_files) == list(everything[train])
    assert list(folder.val_files) == list(everything[val])
    first = [y for _, y in folder.train_batches(40, seed=3, epoch=1)][0]
    second = [y for _, y in folder.train_batches(40, seed=3, epoch=2)][0]
    assert not torch.equal(first, second)  # a fresh order each epoch


def test_imagenet_layout_and_in_memory_reading_agree(tmp_path, spec_file):
    make_folder(tmp_path / "imnet" / "train", per_class=6)
    make_folder(tmp_path / "imnet" / "val", per_class=3)
    folder = open_data(str(tmp_path / "imnet"), 1, 8, workers=1)
    assert (folder.train_size, folder.val_size, folder.classes) == (12, 6, 2)
    streamed = torch.cat([x for x, _ in folder.val_batches(4)])
    arrays = load_data(str(tmp_path / "imnet"), 1, 8)
    assert np.array_equal(arrays.val_x, streamed.numpy())
    assert list(arrays.val_y) == [0, 0, 0, 1, 1, 1]
    assert train(spec_file, tmp_path / "imnet", tmp_path / "m.pt")["val_size"] == 6
    code = main(["eval", str(tmp_path / "m.pt"), "--data", str(tmp_path / "imnet"),
                 "--workers", "2", "--quiet", "--json"])
    assert code == 0


def test_nothing_is_decoded_until_a_batch_is_asked_for(tmp_path):
    data = make_folder(tmp_path / "images")
    (data / "a" / "broken.png").write_bytes(b"not a png")
    folder = open_data(str(data), 1, 8, workers=2)  # scans paths only: no error yet
    assert folder.train_size + folder.val_size == 41
    with pytest.raises(DataError, match=r"broken\.png: not a readable image \(cannot identify"):
        list(folder.train_batches(4, 0, 1))
        list(folder.val_batches(4))


def expect_refusal(capsys, argv, phrase):
    try:
        code = main([*argv, "--quiet"])
    except SystemExit as usage_error:  # argparse's refusals exit from inside main
        code = usage_error.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert phrase in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("workers", ["0", "2"])
def test_corrupt_image_names_the_file(tmp_path, spec_file, capsys, workers):
    data = make_folder(tmp_path / "images")
    (data / "b" / "zz_truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    expect_refusal(capsys, ["train", str(spec_file), "--data", str(data), "--epochs", "1",
                            "-o", str(tmp_path / "m.pt"), "--workers", workers],
                   "zz_truncated.png: not a readable image")
    assert not (tmp_path / "m.pt").exists()


def test_empty_class_folder(tmp_path, spec_file, capsys):
    data = make_folder(tmp_path / "images")
    (data / "c").mkdir()
    (data / "c" / "notes.txt").write_text("no images here")
    expect_refusal(capsys, ["train", str(spec_file), "--data", str(data), "-o",
                            str(tmp_path / "m.pt")], "c: empty class folder")


def test_folder_without_class_folders(tmp_path, spec_file, capsys):
    (tmp_path / "flat").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "flat" / "0.png")
    expect_refusal(capsys, ["train", str(spec_file), "--data", str(tmp_path / "flat"), "-o",
                            str(tmp_path / "m.pt")], "flat: no class folders")


def test_negative_workers_is_a_usage_error(tmp_path, spec_file, capsys):
    expect_refusal(capsys, ["train", str(spec_file), "--data", "digits", "-o",
                            str(tmp_path / "m.pt"), "--workers", "-1"], "-1 is negative")
    with pytest.raises(DataError, match="--workers -1"):
        open_data(str(tmp_path), 1, 8, workers=-1)


def test_augmentation_applies_to_folders_only(tmp_path, spec_file, capsys):
    expect_refusal(capsys, ["train", str(spec_file), "--data", "digits", "-o",
                            str(tmp_path / "m.pt"), "--augment", "basic"],
                   "--augment basic applies to image folders")


def test_batches_are_pinned_only_for_a_cuda_device(tmp_path):
    from archc.cli.space import _pins_memory

    assert _pins_memory("cuda:1") and not _pins_memory("cpu") and not _pins_memory("mps")
    data = str(make_folder(tmp_path / "images", per_class=2))
    assert open_data(data, 1, 8, pin_memory=True).pin_memory
    assert not open_data(data, 1, 8).pin_memory
