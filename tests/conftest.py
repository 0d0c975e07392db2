"""Shared fixtures: a random SD1.x-shaped checkpoint on disk (the path SD v1.4 takes) and the
real memorizing testbed (built once into the cache, then reused)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[1]


def build_sd_shaped(folder: Path, tokenizer_dir: Path) -> Path:
    """Config-built SD1.x-shaped pipeline: AutoencoderKL, 768-d CLIPTextModel, 4-level UNet."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from memtrain.models import ModelBundle
    from memtrain.testbed.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 8, 16, 16), norm_num_groups=4, cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=256, num_hidden_layers=1,
        num_attention_heads=12, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407,
    ))
    # SD v1.4's own scheduler config (PNDM, scaled_linear, epsilon); the sampler swaps in DDIM.
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1)
    tokenizer = build_clip_tokenizer(tokenizer_dir)
    ModelBundle(unet, text_encoder, tokenizer, vae, scheduler).save(folder)
    return folder


@pytest.fixture(scope="session")
def sd_shaped_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sd_shaped")
    return build_sd_shaped(root / "model", root / "tok")


@pytest.fixture(scope="session")
def testbed_dir() -> Path:
    """The real testbed (cached under MEMTRAIN_CACHE; ~13 min to build once on 2 cores)."""
    from memtrain.testbed.build import ensure_testbed

    return ensure_testbed(seed=0, progress=False)
