"""Camera images -> features: DrQ's random-shift augmentation and its convolutional encoder.

Images arrive uint8, channels last, (B, H, W, C) per camera, as the wire, the store and the buffer
hold them (envs/obs_spec.py); they become floats only here.

* ``random_shift`` is DrQ's augmentation (Kostrikov et al. 2021, "Image Augmentation Is All You Need",
  section 3.1: pad 4 pixels by repeating the border, then crop back at a random offset), written as a
  gather with clamped indices: output pixel (i, j) is input pixel (clamp(i + dy), clamp(j + dx)) with
  dy, dx uniform integers in [-pad, pad], per image. That is the same image as pad-then-crop, with
  no padded copy, and it works on uint8 directly.
* ``PixelEncoder`` is DrQ's encoder (denis-yarats/drq, drq.py ``Encoder``): conv 32 3x3 stride 2, three
  conv 32 3x3 stride 1, ReLU after each, then a linear layer to ``feature_dim``, LayerNorm and tanh.
  One conv stack per camera (SERL encodes each image separately, then concatenates).
"""

from __future__ import annotations

import torch
from torch import nn

from o2o.envs.obs_spec import ObsSpec

DRQ_PAD = 4
DRQ_FILTERS = 32
DRQ_FEATURES = 50


def random_shift(images: torch.Tensor, pad: int = DRQ_PAD, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, H, W, C) images, each shifted by its own random (dy, dx) in [-pad, pad] with the border repeated."""
    if images.ndim != 4:
        raise ValueError(f"random_shift: expected (B, H, W, C) images, got shape {tuple(images.shape)}")
    batch, height, width, _ = images.shape
    device = images.device
    shift = torch.randint(-pad, pad + 1, (batch, 2), device=device, generator=generator)
    rows = (torch.arange(height, device=device) + shift[:, :1]).clamp(0, height - 1)  # (B, H)
    cols = (torch.arange(width, device=device) + shift[:, 1:]).clamp(0, width - 1)  # (B, W)
    which = torch.arange(batch, device=device)[:, None, None]
    return images[which, rows[:, :, None], cols[:, None, :]]


def conv_stack(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, DRQ_FILTERS, 3, stride=2), nn.ReLU(),
        nn.Conv2d(DRQ_FILTERS, DRQ_FILTERS, 3, stride=1), nn.ReLU(),
        nn.Conv2d(DRQ_FILTERS, DRQ_FILTERS, 3, stride=1), nn.ReLU(),
        nn.Conv2d(DRQ_FILTERS, DRQ_FILTERS, 3, stride=1), nn.ReLU(),
        nn.Flatten(),
    )  # fmt: skip


class PixelEncoder(nn.Module):
    """{camera: uint8 (B, H, W, C)} -> (B, feature_dim * cameras) features in [-1, 1]."""

    def __init__(self, spec: ObsSpec, feature_dim: int = DRQ_FEATURES):
        super().__init__()
        if not spec.has_images:
            raise ValueError("PixelEncoder: the observation spec has no camera")
        self.names = spec.camera_names
        self.convs = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        for camera in spec.cameras:
            conv = conv_stack(camera.channels)
            with torch.no_grad():
                flat = conv(torch.zeros(1, camera.channels, camera.height, camera.width)).shape[1]
            self.convs[camera.name] = conv
            self.heads[camera.name] = nn.Sequential(nn.Linear(flat, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh())
        self.feature_dim = feature_dim * len(self.names)

    def forward(self, images: dict[str, torch.Tensor]) -> torch.Tensor:
        features = []
        for name in self.names:
            x = images[name]
            if x.dtype != torch.uint8:
                raise TypeError(f"PixelEncoder: camera {name!r} images must be uint8, got {x.dtype}")
            x = x.permute(0, 3, 1, 2).float() / 255.0 - 0.5  # DrQ: obs / 255 - 0.5
            features.append(self.heads[name](self.convs[name](x)))
        return torch.cat(features, dim=1)


class ObsEncoder(nn.Module):
    """(state (B, d) float, {camera: uint8 (B, H, W, C)}) -> (B, pixel features + d): the images through
    ``PixelEncoder``, the state concatenated after it (SERL and DrQ-style agents with proprioception)."""

    def __init__(self, spec: ObsSpec, feature_dim: int = DRQ_FEATURES):
        super().__init__()
        self.pixels = PixelEncoder(spec, feature_dim)
        self.state_dim = spec.state_dim
        self.out_dim = self.pixels.feature_dim + spec.state_dim

    def forward(self, state: torch.Tensor, images: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.pixels(images), state], dim=1)
