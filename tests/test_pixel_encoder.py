"""DrQ's random shift and encoder (learner/pixel_encoder.py), checked against pad-then-crop in numpy."""

import numpy as np
import pytest
import torch

from o2o.envs.obs_spec import CameraSpec, ObsSpec
from o2o.learner.pixel_encoder import PixelEncoder, random_shift


def position_images(batch: int, height: int, width: int) -> torch.Tensor:
    """uint8 images whose pixels say where they are: channel 0 the row, channel 1 the column, 2 the image."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    images = np.stack([np.stack([rows, cols, np.full_like(rows, b)], axis=-1) for b in range(batch)])
    return torch.as_tensor(images.astype(np.uint8))


def test_random_shift_is_pad_by_the_border_then_crop_at_an_offset_within_the_pad():
    images = position_images(64, 12, 10)
    shifted = random_shift(images, pad=4, generator=torch.Generator().manual_seed(0))
    assert shifted.dtype == torch.uint8 and shifted.shape == images.shape
    seen = set()
    for b in range(64):
        padded = np.pad(images[b].numpy(), ((4, 4), (4, 4), (0, 0)), mode="edge")  # DrQ: replicate pad 4
        # the crop offset is read off the first pixel that is not clamped; then the whole image must match it
        matches = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
                   if np.array_equal(shifted[b].numpy(), padded[4 + dy : 4 + dy + 12, 4 + dx : 4 + dx + 10])]  # fmt: skip
        assert matches, f"image {b} is no pad-and-crop of its input within 4 pixels"
        seen.add(matches[0])
        assert (shifted[b, :, :, 2] == b).all()  # each image keeps its own pixels
    assert len(seen) > 30  # offsets drawn per image, across the whole [-4, 4]^2 range


def test_random_shift_offsets_are_uniform_over_the_pad():
    images = position_images(1, 30, 30).expand(4000, -1, -1, -1)
    shifted = random_shift(images, pad=2, generator=torch.Generator().manual_seed(1))
    dy = shifted[:, 15, 15, 0].long() - 15  # the centre pixel is never clamped
    counts = torch.bincount(dy + 2, minlength=5)
    assert counts.tolist() == pytest.approx([800] * 5, rel=0.15)


def test_the_encoder_gives_bounded_features_per_camera_and_refuses_float_images():
    spec = ObsSpec(3, (CameraSpec("front", 84, 84, 3), CameraSpec("wrist", 64, 64, 1)))
    encoder = PixelEncoder(spec)
    # DrQ's sizes: 84 -> 41 (3x3 stride 2) -> 39 -> 37 -> 35, times 32 filters
    assert encoder.heads["front"][0].in_features == 32 * 35 * 35
    assert encoder.heads["wrist"][0].in_features == 32 * 25 * 25
    images = {"front": torch.randint(0, 256, (5, 84, 84, 3), dtype=torch.uint8),
              "wrist": torch.randint(0, 256, (5, 64, 64, 1), dtype=torch.uint8)}  # fmt: skip
    features = encoder(images)
    assert features.shape == (5, 100) and features.abs().max() <= 1.0
    features.sum().backward()
    assert all(p.grad is not None for p in encoder.parameters())
    with pytest.raises(TypeError, match="uint8"):
        encoder({**images, "front": images["front"].float()})
