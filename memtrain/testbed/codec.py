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

from memtrain.core.bundle import register_codec


@register_codec
class PixelShuffleCodec(ModelMixin, ConfigMixin):
    """A lossless pixel (un)shuffle codec with optional whitening, behind AutoencoderKL's interface."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, factor: int = 2, in_channels: int = 3, scaling_factor: float = 1.0):
        super().__init__()
        # A (saved) buffer so ModelMixin knows a device and dtype and writes a weights file,
        # which diffusers' loader expects, even though nothing is learned.
        self.register_buffer("anchor", torch.zeros(1))
        c = in_channels * factor**2
        # Optional per-block linear map (identity until fit_whitening): latent = T (block - mean).
        self.register_buffer("mean", torch.zeros(c))
        self.register_buffer("transform", torch.eye(c))
        self.register_buffer("inverse", torch.eye(c))

    @torch.no_grad()
    def fit_whitening(self, images: torch.Tensor, power: float = 1.0, floor: float = 1e-4) -> None:
        """Rotate each f x f pixel block onto its principal components and scale them towards unit
        variance (power 1 = full whitening). Still lossless, but the diffusion noise then hits fine
        detail as hard as coarse structure, as in a VAE latent, instead of drowning the small
        high-frequency components, which a tiny U-Net otherwise reproduces as grain."""
        blocks = F.pixel_unshuffle(images.float(), self.config.factor)
        vectors = blocks.permute(0, 2, 3, 1).reshape(-1, blocks.shape[1]).double()
        mean = vectors.mean(0)
        eigvals, eigvecs = torch.linalg.eigh(torch.cov((vectors - mean).T))
        eigvals = eigvals.clamp_min(floor * eigvals.max())
        scale = eigvals.pow(-0.5 * power)
        self.mean.copy_(mean.float())
        self.transform.copy_((torch.diag(scale) @ eigvecs.T).float())
        self.inverse.copy_((eigvecs @ torch.diag(1 / scale)).float())

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels * self.config.factor**2

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images in [-1, 1], (B, 3, H, W) -> scaled latents (B, 3 f^2, H/f, W/f)."""
        blocks = F.pixel_unshuffle(images, self.config.factor)
        blocks = blocks - self.mean.to(blocks.dtype)[:, None, None]
        latents = torch.einsum("dc,bchw->bdhw", self.transform.to(blocks.dtype), blocks)
        return latents * self.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents / self.config.scaling_factor
        blocks = torch.einsum("cd,bdhw->bchw", self.inverse.to(latents.dtype), latents)
        return F.pixel_shuffle(blocks + self.mean.to(latents.dtype)[:, None, None], self.config.factor)
