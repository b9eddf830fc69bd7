"""Image transforms of the streaming folder data: PIL for geometry, torch for the tensor; no
torchvision.

Training with `--augment basic` (the Inception / ResNet ImageNet recipe: Szegedy et al. 2015,
"Going deeper with convolutions", section 6; He et al. 2016, section 3.4):
- random-resized crop: a box of area s * W * H, s ~ U(0.08, 1), and aspect ratio w/h = r with
  log r ~ U(log 3/4, log 4/3), placed uniformly inside the image and resized to size x size;
- horizontal flip with probability 1/2.
Evaluation (and both splits with `--augment none`): resize so the shorter side is
round(size / 0.875) (256 for 224), then the centre size x size crop.
Then pixels are scaled to [0, 1] and normalised per channel, x' = (x - mean) / std, with ImageNet's
mean and std for RGB and mean = std = 0.5 (x' in [-1, 1]) for one gray channel.

Each geometric step is a pure function of the image size and an explicit numpy Generator, so a
sample's augmentation depends only on its seed (`archc.train.data`), not on which worker ran it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop; then the centre fallback
EVAL_CROP_FRACTION = 0.875  # 224 / 256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.5,), (0.5,)

Box = tuple[int, int, int, int]  # left, top, width, height in pixels


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = CROP_SCALE,
                            ratio: tuple[float, float] = CROP_RATIO) -> Box:
    """A box of area s*W*H (s ~ U(scale)) and aspect w/h = r (log r ~ U(log ratio)), placed
    uniformly: w = round(sqrt(s*W*H*r)), h = round(sqrt(s*W*H/r)), left ~ U{0..W-w},
    top ~ U{0..H-h}. After `CROP_ATTEMPTS` draws that do not fit, the largest centred box whose
    aspect is clamped to `ratio`. Always inside the image with w, h >= 1."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_ATTEMPTS):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, max(1, min(height, round(width / ratio[0])))
    elif aspect > ratio[1]:
        w, h = max(1, min(width, round(height * ratio[1]))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def shorter_side_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(W', H') with min(W', H') = `shorter` and the aspect kept: the longer side scales by
    shorter / min(W, H), rounded, at least 1."""
    factor = shorter / min(width, height)
    return max(1, round(width * factor)), max(1, round(height * factor))


def centre_crop_box(width: int, height: int, size: int) -> Box:
    """The centred size x size box, (left, top) = ((W - size) // 2, (H - size) // 2); the box may
    reach outside an image smaller than `size` (PIL pads with zeros), never on an image at least
    that large."""
    return (width - size) // 2, (height - size) // 2, size, size


def eval_resize(size: int) -> int:
    """Shorter side before the centre crop: round(size / 0.875) (256 for 224)."""
    return round(size / EVAL_CROP_FRACTION)


def horizontal_flip(x: Tensor) -> Tensor:
    """x[..., ::-1] on the width axis; an involution: flip(flip(x)) = x."""
    return torch.flip(x, dims=(-1,))


def to_tensor(pixels: np.ndarray) -> Tensor:
    """uint8 (H, W) or (H, W, C) -> float32 (C, H, W) in [0, 1]: x / 255."""
    array = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32) / 255.0)


def normalise(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """(x - mean[c]) / std[c] per channel c of (C, H, W)."""
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


def channel_statistics(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's mean/std for 3 channels, else 0.5/0.5 repeated (gray images repeated)."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return GRAY_MEAN * channels, GRAY_STD * channels


def transform(image, size: int, channels: int, rng: np.random.Generator | None) -> Tensor:
    """A PIL image -> the model's (channels, size, size) input. `rng` given: random-resized crop
    and a flip with probability 1/2 (training); None: resize the shorter side and centre-crop."""
    from PIL import Image

    image = image.convert("RGB" if channels == 3 else "L")
    if rng is not None:
        left, top, w, h = random_resized_crop_box(image.width, image.height, rng)
        image = image.resize((size, size), Image.Resampling.BILINEAR,
                             box=(left, top, left + w, top + h))
    else:
        image = image.resize(shorter_side_size(image.width, image.height, eval_resize(size)),
                             Image.Resampling.BILINEAR)
        left, top, w, h = centre_crop_box(image.width, image.height, size)
        image = image.crop((left, top, left + w, top + h))
    x = to_tensor(np.asarray(image))
    if rng is not None and rng.random() < 0.5:
        x = horizontal_flip(x)
    if x.shape[0] != channels:
        x = x.expand(channels, -1, -1)
    return normalise(x, *channel_statistics(channels))
