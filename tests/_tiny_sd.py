"""A tiny random SD1.x-shaped ModelBundle for fast tests (no downloads, a second to build).

U-Net with CrossAttnDownBlock2D/CrossAttnUpBlock2D blocks and a cross-attention mid block, a
CLIPTextModel of width 32, SD1.4's real CLIP tokenizer (built offline), a DDIM scheduler and
the testbed PixelShuffleCodec(factor=2) as vae, so images are 2x the latent size.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from memtrain.models import ModelBundle
from memtrain.testbed.codec import PixelShuffleCodec
from memtrain.testbed.tokenizer import build_clip_tokenizer

HIDDEN = 32


def tiny_unet(sample_size: int = 8, cross_attention: bool = True, seed: int = 0,
              channels: int = 12) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    if cross_attention:
        down, up, mid = (("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                         ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), "UNetMidBlock2DCrossAttn")
    else:  # no attn2 anywhere: plain ResNet blocks and no mid block
        down, up, mid = ("DownBlock2D", "DownBlock2D"), ("UpBlock2D", "UpBlock2D"), None
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels,
        block_out_channels=(32, 64), down_block_types=down, up_block_types=up,
        mid_block_type=mid, layers_per_block=1, cross_attention_dim=HIDDEN,
        attention_head_dim=8, norm_num_groups=8,
    ).eval()


def tiny_text_encoder(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=HIDDEN,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return CLIPTextModel(config).eval()


def tiny_scheduler(**overrides) -> DDIMScheduler:
    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                  steps_offset=1)
    config.update(overrides)
    return DDIMScheduler(**config)


def tiny_bundle(tokenizer_dir: Path, cross_attention: bool = True, seed: int = 0,
                tokenizer=None, **scheduler_overrides) -> ModelBundle:
    """`tokenizer` reuses an already built tokenizer (building one reads the BPE file: ~2 s)."""
    tokenizer = tokenizer or build_clip_tokenizer(Path(tokenizer_dir))
    codec = PixelShuffleCodec(factor=2)
    bundle = ModelBundle(
        unet=tiny_unet(cross_attention=cross_attention, seed=seed, channels=codec.latent_channels),
        text_encoder=tiny_text_encoder(seed), tokenizer=tokenizer, vae=codec,
        scheduler=tiny_scheduler(**scheduler_overrides), source="tiny-random-sd",
    )
    return bundle.eval()
