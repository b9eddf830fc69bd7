"""Data sets for `archc train`, `archc eval` and sweeps. Nothing is downloaded.

`DATA` is one of:
- `digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 gray images, 10 classes), pixel
  values 0..16 scaled to [0, 1];
- `PATH.npz`: arrays `x` (N, C, H, W) and `y` (N,) of integer labels 0..K-1, used as stored (as
  float32); optional `x_val`, `y_val` are the validation set;
- a directory of class folders, `DIR/<class>/<image>` (any format Pillow reads), classes in sorted
  name order, pixels scaled to [0, 1]; `DIR/train/<class>/...` and `DIR/val/<class>/...` give the
  split explicitly.

Without an explicit validation set the split is fixed: the permutation of PCG64(SeedSequence(0))
puts 80% of the examples (rounded down) in training and the rest in validation, the same on every
run and machine, independent of any training seed. Images are resized to the model's square input
size (bilinear, antialiased when shrinking) and a one-channel image is repeated to the model's
input channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from archc.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
TRAIN_FRACTION = 0.8


@dataclass(frozen=True)
class Dataset:
    name: str
    train_x: np.ndarray  # (N, C, H, W) float32
    train_y: np.ndarray  # (N,) int64
    val_x: np.ndarray
    val_y: np.ndarray
    classes: int

    def describe(self) -> str:
        return (f"{self.name}: {len(self.train_y)} train / {len(self.val_y)} validation images, "
                f"{self.classes} classes, {'x'.join(map(str, self.train_x.shape[1:]))}")


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
        x, y, val = _fixed_split(x, y, source)
    val_x, val_y = val
    classes = int(max(y.max(), val_y.max())) + 1
    return Dataset(source, _fit(x, channels, size, source), y, _fit(val_x, channels, size, source),
                   val_y, classes)


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
    if (root / "train").is_dir() and (root / "val").is_dir():
        x, y, names = _read_classes(root / "train", channels, size)
        val_x, val_y, _ = _read_classes(root / "val", channels, size, names)
        return x, y, (val_x, val_y)
    x, y, _ = _read_classes(root, channels, size)
    return x, y, None


def _read_classes(root: Path, channels: int, size: int, names: list[str] | None = None):
    from PIL import Image, UnidentifiedImageError

    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not found:
        raise DataError(f"{root}: no class folders")
    if names is not None and found != names:
        raise DataError(f"{root}: class folders {found} differ from the training set's {names}")
    mode = "L" if channels != 3 else "RGB"
    images, labels = [], []
    for label, name in enumerate(found):
        for file in sorted(p for p in (root / name).iterdir()
                           if p.suffix.lower() in IMAGE_SUFFIXES):
            try:
                with Image.open(file) as image:
                    image = image.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
                    pixels = np.asarray(image, dtype=np.float32) / 255.0
            except (OSError, UnidentifiedImageError) as exc:
                raise DataError(f"{file}: not a readable image ({exc})") from None
            images.append(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise DataError(f"{root}: no images in the class folders")
    return np.stack(images), np.array(labels, dtype=np.int64), found


def _fixed_split(x: np.ndarray, y: np.ndarray, source: str):
    if len(y) < 2:
        raise DataError(f"{source}: {len(y)} example(s) cannot be split into train and validation")
    order = np.random.Generator(np.random.PCG64(np.random.SeedSequence(0))).permutation(len(y))
    cut = max(1, min(len(y) - 1, int(TRAIN_FRACTION * len(y))))
    train, val = order[:cut], order[cut:]
    return x[train], y[train], (x[val], y[val])


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
