"""Random-weight pipelines with the published Stable Diffusion configs, built offline.

No weights come from the hub here, so full-size work (tests, benchmarks, the README's examples)
runs on pipelines with SD's exact shapes and random weights: the same parameter counts, memory
and speed as the real checkpoints, nothing memorized. Saved in diffusers layout, they load like
a downloaded SD folder (`load_bundle`, diffusers' StableDiffusionPipeline).

Variants (configs as the checkpoints publish them in their model folders):
  sd14, sd15    860M U-Net (cross-attention 768), CLIP ViT-L/14 text tower, SD's VAE, PNDM,
                epsilon prediction, 512 px, pad = eot (49407)
  sd21-base     866M U-Net (linear projections, heads 5/10/20/20, cross-attention 1024),
                OpenCLIP ViT-H/14 text tower (1024-d, 23 of its 24 layers: SD 2 reads the
                penultimate one), `!` padding (id 0), PNDM, epsilon, 512 px
  sd21          as sd21-base with v-prediction (DDIM), upcast attention, 768 px

`resolution` overrides only the default image size (U-Net sample_size = resolution / 8, the
VAE's sample_size): weights and shapes stay the published ones. CPU runs use 256 px.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from memtrain.core.bundle import ModelBundle
from memtrain.core.errors import MemtrainError
from memtrain.core.files import check_output_dir, staged_dir
from memtrain.core.tokenizer import build_clip_tokenizer

_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1, set_alpha_to_one=False, clip_sample=False)
_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
            act_fn="silu", block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=0.18215)
_UNET = dict(in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
             norm_num_groups=32, norm_eps=1e-5, act_fn="silu", downsample_padding=1, flip_sin_to_cos=True,
             freq_shift=0, center_input_sample=False, mid_block_scale_factor=1,
             down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
_TEXT = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)


@dataclass(frozen=True)
class SDVariant:
    """What distinguishes one published SD checkpoint's configs from another's."""

    resolution: int
    cross_attention_dim: int
    attention_head_dim: int | tuple[int, ...]
    use_linear_projection: bool
    upcast_attention: bool
    text: dict
    pad_token: str
    prediction_type: str


_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
               hidden_act="quick_gelu", projection_dim=768)
_OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                   hidden_act="gelu", projection_dim=512)
_SD1 = SDVariant(512, 768, 8, False, False, _CLIP_L, "<|endoftext|>", "epsilon")
_SD2_BASE = SDVariant(512, 1024, (5, 10, 20, 20), True, False, _OPENCLIP_H, "!", "epsilon")
VARIANTS: dict[str, SDVariant] = {
    "sd14": _SD1,
    "sd15": _SD1,
    "sd21-base": _SD2_BASE,
    "sd21": SDVariant(768, 1024, (5, 10, 20, 20), True, True, _OPENCLIP_H, "!", "v_prediction"),
}


def variant(name: str) -> SDVariant:
    """The named variant; MemtrainError lists the known ones."""
    if name not in VARIANTS:
        raise MemtrainError(f"unknown SD variant '{name}': use one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


def sd_modules(name: str, resolution: int | None = None) -> tuple[UNet2DConditionModel, CLIPTextModel, AutoencoderKL]:
    """U-Net, text tower and VAE of variant `name`, randomly initialised (call under
    accelerate's `init_empty_weights()` to get shapes without memory)."""
    v = variant(name)
    size = int(resolution or v.resolution)
    if size % 64:
        raise MemtrainError(f"resolution {size}: use a multiple of 64 (the U-Net downsamples latents 8x)")
    unet = UNet2DConditionModel(**_UNET, sample_size=size // 8, cross_attention_dim=v.cross_attention_dim,
                                attention_head_dim=v.attention_head_dim,
                                use_linear_projection=v.use_linear_projection, upcast_attention=v.upcast_attention)
    text = CLIPTextModel(CLIPTextConfig(**_TEXT, **v.text, pad_token_id=0 if v.pad_token == "!" else 49407))
    vae = AutoencoderKL(**_VAE, sample_size=size)
    return unet, text, vae


def sd_scheduler(name: str):
    """The scheduler the variant ships: PNDM (epsilon) or DDIM (v-prediction, SD 2.1)."""
    v = variant(name)
    if v.prediction_type == "v_prediction":
        return DDIMScheduler(**_SCHEDULE, prediction_type="v_prediction")
    pndm = PNDMScheduler(**{k: x for k, x in _SCHEDULE.items() if k != "clip_sample"}, skip_prk_steps=True,
                         prediction_type="epsilon")
    # PNDM takes no clip_sample, but SD v1.x's published scheduler_config.json carries
    # "clip_sample": false, which the DDIM/DDPM samplers built from it then read
    pndm.register_to_config(clip_sample=False)
    return pndm


def build_random_sd(name: str, folder: str | Path, resolution: int | None = None, seed: int = 0,
                    overwrite: bool = False) -> Path:
    """Build variant `name` with random weights (seeded) and save it in diffusers layout."""
    folder = check_output_dir(folder, overwrite)
    torch.manual_seed(seed)
    unet, text, vae = sd_modules(name, resolution)
    with staged_dir(folder) as tmp:  # a killed build leaves no half-written model
        tokenizer = build_clip_tokenizer(tmp / "tokenizer", pad_token=variant(name).pad_token)
        ModelBundle(unet, text, tokenizer, vae, sd_scheduler(name), source=f"random-{name}").save(tmp)
    return folder
