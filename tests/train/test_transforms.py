"""The image transforms of the streaming folder loader (archc.train.transforms): properties over
image sizes and seeds (the output is always the model's input shape, a crop box lies inside the
image, flipping twice is the identity, resizing keeps the aspect) and the normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from archc.train.transforms import (
    CROP_RATIO,
    IMAGENET_MEAN,
    IMAGENET_STD,
    centre_crop_box,
    channel_statistics,
    eval_resize,
    horizontal_flip,
    normalise,
    random_resized_crop_box,
    shorter_side_size,
    transform,
)

sides = st.integers(1, 400)
seeds = st.integers(0, 2**32 - 1)


@settings(max_examples=300, deadline=None)
@given(width=sides, height=sides, seed=seeds)
def test_random_crop_box_is_inside_the_image(width, height, seed):
    left, top, w, h = random_resized_crop_box(width, height, np.random.default_rng(seed))
    assert w >= 1 and h >= 1
    assert left >= 0 and left + w <= width and top >= 0 and top + h <= height


@settings(max_examples=100, deadline=None)
@given(seed=seeds)
def test_random_crop_box_follows_the_scale_and_ratio_of_the_recipe(seed):
    left, top, w, h = random_resized_crop_box(1000, 1000, np.random.default_rng(seed))
    assert 0.08 - 0.01 <= w * h / 1e6 <= 1.0
    assert CROP_RATIO[0] - 0.01 <= w / h <= CROP_RATIO[1] + 0.01


def test_random_crop_box_falls_back_to_a_centred_box_of_allowed_aspect():
    # a 1000x10 strip: no box of aspect <= 4/3 and area >= 8% fits, so the centre fallback
    left, top, w, h = random_resized_crop_box(1000, 10, np.random.default_rng(0))
    assert (w, h) == (13, 10) and left == (1000 - 13) // 2 and top == 0


@settings(max_examples=200, deadline=None)
@given(width=sides, height=sides, shorter=st.integers(1, 300))
def test_shorter_side_resize_keeps_the_aspect(width, height, shorter):
    w, h = shorter_side_size(width, height, shorter)
    assert min(w, h) == shorter
    assert abs(w / h - width / height) <= (width / height) / min(w, h) + 1e-9


@settings(max_examples=200, deadline=None)
@given(width=sides, height=sides, size=st.integers(1, 400))
def test_centre_crop_box_is_centred_and_inside_a_large_enough_image(width, height, size):
    left, top, w, h = centre_crop_box(width, height, size)
    assert (w, h) == (size, size)
    if width >= size and height >= size:
        assert left >= 0 and left + w <= width and top >= 0 and top + h <= height
        assert abs((width - left - w) - left) <= 1 and abs((height - top - h) - top) <= 1


@settings(max_examples=100, deadline=None)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9)), seed=seeds)
def test_flipping_twice_is_the_identity(shape, seed):
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))
    flipped = horizontal_flip(x)
    assert torch.equal(horizontal_flip(flipped), x)
    assert torch.equal(flipped[..., 0], x[..., -1])


@settings(max_examples=150, deadline=None)
@given(width=st.integers(1, 64), height=st.integers(1, 64), size=st.integers(1, 32),
       channels=st.sampled_from([1, 2, 3]), seed=st.one_of(st.none(), seeds))
def test_output_is_always_the_models_input_shape(width, height, size, channels, seed):
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    rng = None if seed is None else np.random.default_rng(seed)
    x = transform(Image.fromarray(pixels), size, channels, rng)
    assert x.shape == (channels, size, size) and x.dtype == torch.float32
    assert torch.isfinite(x).all()


def test_normalisation_uses_imagenet_statistics_for_rgb_and_one_half_for_gray():
    assert channel_statistics(3) == (IMAGENET_MEAN, IMAGENET_STD)
    assert channel_statistics(1) == ((0.5,), (0.5,))
    rgb = torch.tensor(IMAGENET_MEAN).view(3, 1, 1).expand(3, 2, 2)
    assert torch.allclose(normalise(rgb, *channel_statistics(3)), torch.zeros(3, 2, 2))
    gray = torch.tensor([[[0.0, 1.0]]])
    assert torch.equal(normalise(gray, *channel_statistics(1)), torch.tensor([[[-1.0, 1.0]]]))


def test_evaluation_resizes_to_size_over_0_875_then_centre_crops():
    assert eval_resize(224) == 256 and eval_resize(8) == 9
    # a 20x10 image whose columns are their index: the centre crop keeps the middle columns
    pixels = np.tile(np.arange(20, dtype=np.uint8) * 10, (10, 1))
    x = transform(Image.fromarray(pixels), 8, 1, None)  # -> 18x9, then columns 5..12
    centre = (x[0, 0] * 0.5 + 0.5) * 255
    assert centre[0] < centre[-1] and centre.mean().item() == pytest.approx(95, abs=6)
