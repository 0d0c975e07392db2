"""The testbed's image codec: a lossless pixel (un)shuffle standing where SD has its VAE.

A tiny model cannot afford to train a VAE on CPU, and a lossy codec would cap how faithfully
it can reproduce a memorized image. Pixel unshuffle keeps every pixel, so a memorized latent
decodes to the exact training image. It lives behind the same encode/decode interface as
AutoencoderKL (see ModelBundle) and saves in diffusers layout under `vae/`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class PixelShuffleCodec(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, factor: int = 2, in_channels: int = 3, scaling_factor: float = 1.0):
        super().__init__()
        # A (saved) buffer so ModelMixin knows a device and dtype and writes a weights file,
        # which diffusers' loader expects, even though nothing is learned.
        self.register_buffer("anchor", torch.zeros(1))

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels * self.config.factor**2

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images in [-1, 1], (B, 3, H, W) -> scaled latents (B, 3 f^2, H/f, W/f)."""
        return F.pixel_unshuffle(images, self.config.factor) * self.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents / self.config.scaling_factor, self.config.factor)
