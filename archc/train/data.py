"""Data sets for `archc train`, `archc eval` and sweeps. Nothing is downloaded.

`DATA` is one of:
- `digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 gray images, 10 classes), pixel
  values 0..16 scaled to [0, 1]; held in memory;
- `PATH.npz`: arrays `x` (N, C, H, W) and `y` (N,) of integer labels 0..K-1, used as stored (as
  float32); optional `x_val`, `y_val` are the validation set; held in memory;
- a directory of class folders, `DIR/<class>/<image>` (any format Pillow reads), classes in sorted
  name order; `DIR/train/<class>/...` and `DIR/val/<class>/...` (ImageNet's layout) give the split
  explicitly. `open_data` streams it: only the file paths and labels are held, and each batch is
  decoded by a `torch.utils.data.DataLoader` with `workers` processes (pinned memory for a CUDA
  device) through `archc.train.transforms` (random-resized crop and flip with `augment="basic"`,
  else resize and centre crop; mean/std normalisation). `load_data` decodes the whole folder
  through the evaluation transform, for the commands that want arrays (quantization calibration).

Without an explicit validation set the split is fixed: the permutation of PCG64(SeedSequence(0))
puts 80% of the examples (rounded down) in training and the rest in validation, the same on every
run and machine, independent of any training seed. Arrays are resized to the model's square input
size (bilinear, antialiased when shrinking) and a one-channel image is repeated to the model's
input channels.

Batch order and augmentation are seeded: epoch e of seed s visits the training examples in the
order of PCG64(SeedSequence([s, e])), and example i's augmentation draws from
PCG64(SeedSequence([s, e, i])), so a run is the same with any number of workers. The loader's
`generator` is seeded with s too, which fixes torch's per-worker seeds. When several processes
train one model (`archc.train.distributed`), each reads its contiguous piece of every batch of
that order (`batch_indices`) and a contiguous share of the validation set (`val_share`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from archc.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
TRAIN_FRACTION = 0.8
AUGMENTATIONS = ("none", "basic")
UPSCALE_LIMIT = 4  # `upscaling` speaks up beyond this factor (224 px models on 8x8 digits: 28)


@dataclass(frozen=True)
class Dataset:
    name: str
    train_x: np.ndarray  # (N, C, H, W) float32
    train_y: np.ndarray  # (N,) int64
    val_x: np.ndarray
    val_y: np.ndarray
    classes: int
    stored_size: tuple[int, int] | None = None  # (H, W) of the images before resizing

    def describe(self) -> str:
        return (f"{self.name}: {len(self.train_y)} train / {len(self.val_y)} validation images, "
                f"{self.classes} classes, {'x'.join(map(str, self.train_x.shape[1:]))}")

    @property
    def train_size(self) -> int:
        return len(self.train_y)

    @property
    def val_size(self) -> int:
        return len(self.val_y)

    def train_batches(self, batch_size: int, seed: int, epoch: int, rank: int = 0,
                      ranks: int = 1) -> Iterator[tuple]:
        """(inputs, targets) tensors of epoch `epoch` in the seeded order (module docstring);
        process `rank`'s part of each when `ranks` processes share the batches."""
        import torch

        order = epoch_order(len(self.train_y), seed, epoch)
        x, y = torch.from_numpy(self.train_x), torch.from_numpy(self.train_y)
        for index in batch_indices(order, batch_size, rank, ranks):
            index = torch.from_numpy(index)
            yield x[index], y[index]

    def val_batches(self, batch_size: int, rank: int = 0, ranks: int = 1) -> Iterator[tuple]:
        import torch

        for index in batch_indices(val_share(self.val_size, rank, ranks), batch_size):
            yield torch.from_numpy(self.val_x[index]), torch.from_numpy(self.val_y[index])


@dataclass(frozen=True)
class ImageFolder:
    """A folder data set read lazily: paths and labels only (module docstring)."""

    name: str
    train_files: np.ndarray  # (N,) str
    train_labels: np.ndarray  # (N,) int64
    val_files: np.ndarray
    val_labels: np.ndarray
    classes: int
    channels: int
    size: int
    augment: str = "none"
    workers: int = 0
    pin_memory: bool = False

    @property
    def train_size(self) -> int:
        return len(self.train_labels)

    @property
    def val_size(self) -> int:
        return len(self.val_labels)

    def describe(self) -> str:
        return (f"{self.name}: {self.train_size} train / {self.val_size} validation images, "
                f"{self.classes} classes, {self.channels}x{self.size}x{self.size}, streamed "
                f"with --workers {self.workers}, augment {self.augment}")

    def train_batches(self, batch_size: int, seed: int, epoch: int, rank: int = 0,
                      ranks: int = 1) -> Iterator[tuple]:
        order = epoch_order(self.train_size, seed, epoch)
        return self._batches(self.train_files, self.train_labels,
                             batch_indices(order, batch_size, rank, ranks), seed, epoch,
                             self.augment == "basic")

    def val_batches(self, batch_size: int, rank: int = 0, ranks: int = 1) -> Iterator[tuple]:
        return self._batches(self.val_files, self.val_labels,
                             batch_indices(val_share(self.val_size, rank, ranks), batch_size),
                             0, 0, False)

    def _batches(self, files, labels, batches, seed, epoch, augment):
        import torch
        from torch.utils.data import DataLoader

        images = _Images(files, labels, self.channels, self.size, augment, seed, epoch)
        loader = DataLoader(images, batch_sampler=[batch.tolist() for batch in batches],
                            num_workers=self.workers, pin_memory=self.pin_memory,
                            collate_fn=_collate, generator=torch.Generator().manual_seed(seed))
        for batch in loader:
            if isinstance(batch, str):
                raise DataError(batch)
            yield batch

    def materialise(self, files: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All of `files` through the evaluation transform, as arrays (for `load_data`)."""
        images = _Images(files, labels, self.channels, self.size, False, 0, 0)
        items = [images[i] for i in range(len(files))]
        unreadable = next((item for item in items if isinstance(item, str)), None)
        if unreadable is not None:
            raise DataError(unreadable)
        return (np.stack([x.numpy() for x, _ in items]).astype(np.float32),
                np.asarray(labels, dtype=np.int64))


class _Images:
    """Map-style torch data set over (path, label); an unreadable file comes back as its one-line
    error message, so that the message crosses the worker boundary intact."""

    def __init__(self, files, labels, channels, size, augment, seed, epoch):
        self.files, self.labels = files, labels
        self.channels, self.size, self.augment = channels, size, augment
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from PIL import Image, UnidentifiedImageError

        from archc.train.transforms import transform

        rng = (np.random.Generator(np.random.PCG64(
            np.random.SeedSequence([self.seed, self.epoch, index]))) if self.augment else None)
        file = str(self.files[index])
        try:
            with Image.open(file) as image:
                x = transform(image, self.size, self.channels, rng)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            reason = str(exc).replace(f" '{file}'", "")  # PIL repeats the path
            return f"{file}: not a readable image ({reason})"
        return x, int(self.labels[index])


def _collate(items: list):
    """Stack a batch (torch's default_collate: in a worker, straight into shared memory), or pass
    on the first unreadable file's message."""
    from torch.utils.data import default_collate

    unreadable = next((item for item in items if isinstance(item, str)), None)
    if unreadable is not None:
        return unreadable
    return tuple(default_collate(items))


def batch_indices(order: np.ndarray, batch_size: int, rank: int = 0,
                  ranks: int = 1) -> list[np.ndarray]:
    """The batches of `batch_size` consecutive entries of `order`; with `ranks` processes,
    process `rank`'s piece of each: the batch cut into `ranks` contiguous pieces whose sizes
    differ by at most one (np.array_split), so that the processes' pieces of a batch are
    disjoint and together are the batch of a one-process run (`archc.train.distributed`)."""
    return [np.array_split(order[start:start + batch_size], ranks)[rank]
            for start in range(0, len(order), batch_size)]


def val_share(n: int, rank: int, ranks: int) -> np.ndarray:
    """The validation examples process `rank` of `ranks` evaluates: a contiguous share."""
    return np.array_split(np.arange(n), ranks)[rank]


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Epoch `epoch`'s training order: the permutation of PCG64(SeedSequence([seed, epoch]))."""
    generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return generator.permutation(n)


def upscaling(dataset: Dataset | ImageFolder, size: int) -> float | None:
    """How many times a model's `size` x `size` input exceeds the side of the stored images, when
    more than UPSCALE_LIMIT times (arrays only: a folder's images are not read to know)."""
    stored = getattr(dataset, "stored_size", None)
    if stored is None or size <= UPSCALE_LIMIT * max(stored):
        return None
    return size / max(stored)


def open_data(source: str, channels: int, size: int, augment: str = "none", workers: int = 0,
              pin_memory: bool = False) -> Dataset | ImageFolder:
    """`source` for training or evaluation: a folder streams (`ImageFolder`), digits and .npz
    are arrays in memory (`Dataset`). Raises `DataError`."""
    if augment not in AUGMENTATIONS:
        raise DataError(f"augment {augment!r}: give one of {', '.join(AUGMENTATIONS)}")
    if workers < 0:
        raise DataError(f"--workers {workers}: give 0 (load in this process) or more")
    path = Path(str(source))
    if str(source) != "digits" and path.is_dir():
        return open_folder(path, channels, size, augment, workers, pin_memory)
    if augment != "none":
        raise DataError(f"{source}: --augment {augment} applies to image folders; digits and "
                        f".npz arrays are used as stored (give --augment none)")
    return load_data(str(source), channels, size)


def open_folder(root: Path, channels: int, size: int, augment: str = "none", workers: int = 0,
                pin_memory: bool = False) -> ImageFolder:
    """Scan `root` (either layout); read no image."""
    if (root / "train").is_dir() and (root / "val").is_dir():
        files, labels, names = _scan_classes(root / "train")
        val_files, val_labels, _ = _scan_classes(root / "val", names)
    else:
        all_files, all_labels, names = _scan_classes(root)
        train, val = split_indices(len(all_labels), str(root))
        files, labels = all_files[train], all_labels[train]
        val_files, val_labels = all_files[val], all_labels[val]
    return ImageFolder(str(root), files, labels, val_files, val_labels, len(names), channels,
                       size, augment, workers, pin_memory)


def _scan_classes(root: Path, names: list[str] | None = None):
    """(paths, labels, class names) of `root/<class>/<image>`, classes and files sorted."""
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not found:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    if names is not None and found != names:
        raise DataError(f"{root}: class folders {found} differ from the training set's {names}")
    files, labels = [], []
    for label, name in enumerate(found):
        images = sorted(str(p) for p in (root / name).iterdir()
                        if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"{root / name}: empty class folder (no "
                            f"{'/'.join(sorted(s[1:] for s in IMAGE_SUFFIXES))} files)")
        files += images
        labels += [label] * len(images)
    return np.array(files), np.array(labels, dtype=np.int64), found


def load_data(source: str, channels: int, size: int) -> Dataset:
    """The data set `source` at the model's input (channels, size x size). Raises `DataError`."""
    return _load(str(source), channels, size)


@lru_cache(maxsize=4)
def _load(source: str, channels: int, size: int) -> Dataset:
    if source == "digits":
        x, y, val = _digits()
    else:
        path = Path(source)
        if path.suffix.lower() == ".npz" and path.is_file():
            x, y, val = _npz(path)
        elif path.is_dir():
            x, y, val = _folders(path, channels, size)
        elif path.suffix.lower() == ".npz":
            raise DataError(f"{source}: no such file")
        else:
            raise DataError(
                f"{source}: not a data set (give digits, a .npz file with x and y, or a "
                f"directory of class folders)")
    if val is None:
        train, held_out = split_indices(len(y), source)
        x, y, val = x[train], y[train], (x[held_out], y[held_out])
    val_x, val_y = val
    classes = int(max(y.max(), val_y.max())) + 1
    return Dataset(source, _fit(x, channels, size, source), y, _fit(val_x, channels, size, source),
                   val_y, classes, tuple(x.shape[2:]))


def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    return x, digits.target.astype(np.int64), None


def _npz(path: Path):
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as exc:  # a zip that is not an npz, a truncated file, pickled objects
        raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{path}: no array {key!r} (found {', '.join(arrays) or 'none'})")
    x, y = _checked(arrays["x"], arrays["y"], f"{path}")
    val = None
    if "x_val" in arrays or "y_val" in arrays:
        if not ("x_val" in arrays and "y_val" in arrays):
            raise DataError(f"{path}: give both x_val and y_val, or neither")
        val = _checked(arrays["x_val"], arrays["y_val"], f"{path} (validation)")
    return x, y, val


def _checked(x: np.ndarray, y: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim != 4:
        raise DataError(f"{where}: x must be (N, C, H, W), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{where}: x must be numbers, got {x.dtype}")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{where}: y must be (N,) = ({len(x)},), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DataError(f"{where}: y must be integer labels >= 0, got {y.dtype}")
    if len(y) == 0:
        raise DataError(f"{where}: no examples")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{where}: x holds NaN or infinite values")
    return x, y.astype(np.int64)


def _folders(root: Path, channels: int, size: int):
    folder = open_folder(root, channels, size)
    x, y = folder.materialise(folder.train_files, folder.train_labels)
    val = folder.materialise(folder.val_files, folder.val_labels)
    return x, y, val


def split_indices(n: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices: the first 80% (rounded down, at least one of each) of the
    permutation of PCG64(SeedSequence(0))."""
    if n < 2:
        raise DataError(f"{source}: {n} example(s) cannot be split into train and validation")
    order = np.random.Generator(np.random.PCG64(np.random.SeedSequence(0))).permutation(n)
    cut = max(1, min(n - 1, int(TRAIN_FRACTION * n)))
    return order[:cut], order[cut:]


def _fit(x: np.ndarray, channels: int, size: int, source: str) -> np.ndarray:
    """Resize to size x size and repeat a single channel to `channels`."""
    if x.shape[1] != channels:
        if x.shape[1] != 1:
            raise DataError(f"{source}: the images have {x.shape[1]} channels, the model reads "
                            f"{channels}")
        x = np.repeat(x, channels, axis=1)
    if x.shape[2:] != (size, size):
        import torch
        import torch.nn.functional as F

        shrinking = x.shape[2] > size or x.shape[3] > size
        x = F.interpolate(torch.from_numpy(np.ascontiguousarray(x)), size=(size, size),
                          mode="bilinear", align_corners=False, antialias=shrinking).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)
