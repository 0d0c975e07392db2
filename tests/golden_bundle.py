"""memtrain's ModelBundle around the golden fixture's U-Net, text encoder, tokenizer and scheduler,
so the golden tests run memtrain's own code paths (mitigations' `encode`/`unet_forward`, the
sampler, the detectors). The official runs used no VAE (latents in, latents out); the sampler
decodes at the end, so a tiny AutoencoderKL stands in, touching none of the compared numbers."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from memtrain.core.bundle import ModelBundle


def golden_bundle(golden) -> ModelBundle:
    """The golden fixture as a ModelBundle (float32, CPU)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        sample_size=16).eval()
    return ModelBundle(golden.unet, golden.text_encoder, golden.tokenizer, vae, golden.scheduler, source="golden")
