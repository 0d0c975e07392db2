"""Train the testbed's SD-shaped U-Net from scratch on CPU until duplicated pairs are memorized.

Schedule choices follow what was measured here (docs/measurements.md): at a 16x16
latent SD's scaled_linear schedule leaves signal at t = T, which a tiny model reads as a
per-seed colour cast; zero terminal SNR with v-prediction and trailing spacing fixes it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel


@dataclass
class UNetConfig:
    """The testbed U-Net's widths, depth and attention levels."""

    block_out_channels: tuple[int, ...] = (64, 128)
    layers_per_block: int = 1
    attention_head_dim: int = 32
    # The 16x16 level has no attention: self-attention over 256 tokens dominated the CPU step.
    cross_attention_levels: tuple[bool, ...] = (False, True)


def testbed_scheduler() -> DDIMScheduler:
    """The testbed's noise schedule (see docs/measurements.md for why)."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
        clip_sample=False, set_alpha_to_one=False, steps_offset=0,
    )


def build_unet(cfg: UNetConfig, latent_channels: int, sample_size: int, cross_attention_dim: int,
               seed: int) -> UNet2DConditionModel:
    """A fresh SD-shaped UNet2DConditionModel for the testbed's latents and text width."""
    torch.manual_seed(seed)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.cross_attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.cross_attention_levels))
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=tuple(cfg.block_out_channels), down_block_types=down, up_block_types=up,
        layers_per_block=cfg.layers_per_block, cross_attention_dim=cross_attention_dim,
        attention_head_dim=cfg.attention_head_dim, norm_num_groups=min(32, cfg.block_out_channels[0] // 2),
    )
    return unet


@dataclass
class TrainConfig:
    """The testbed U-Net's training schedule."""

    steps: int = 3000
    max_seconds: float | None = None
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_fraction: float = 0.05
    warmup_steps: int = 100
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    weight_decay: float = 0.0


def train_unet(
    unet: UNet2DConditionModel,
    scheduler,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    uncond_embedding: torch.Tensor,
    sample_index: torch.Tensor,
    cfg: TrainConfig,
    seed: int,
    callback=None,
    progress: bool = True,
) -> UNet2DConditionModel:
    """Plain diffusion training; returns the EMA U-Net.

    latents (N, C, h, w) and text_embeddings (N, L, D) are precomputed once (the text encoder is
    frozen); sample_index lists pair indices with duplicates repeated, so drawing uniformly
    from it reproduces the duplication. Training runs on the U-Net's device; every random draw
    is made on the CPU generator, so the batches are the same on any device.
    """
    # Adam's second moments drift into denormal floats, which made CPU steps several times slower.
    torch.set_flush_denormal(True)
    noise_scheduler = DDPMScheduler.from_config(scheduler.config)
    epsilon = noise_scheduler.config.prediction_type == "epsilon"  # the testbed itself is v-prediction
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    device = next(unet.parameters()).device
    params, ema_params = list(unet.parameters()), list(ema.parameters())
    # fused Adam and the foreach clip/EMA below: one kernel per step instead of a Python loop over
    # ~300 tensors, 2400 times (about 40 s of a 9-minute build on 2 cores; same arithmetic)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    generator = torch.Generator().manual_seed(seed)
    total = cfg.steps
    start = time.time()

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        cosine = 0.5 * (1 + torch.cos(torch.tensor(frac * torch.pi))).item()
        return cfg.lr * (cfg.min_lr_fraction + (1 - cfg.min_lr_fraction) * cosine)

    from tqdm.auto import tqdm

    bar = tqdm(range(total), desc="U-Net", disable=not progress)
    unet.train()
    for step in bar:
        if cfg.max_seconds is not None and time.time() - start > cfg.max_seconds:
            break
        pick = sample_index[torch.randint(len(sample_index), (cfg.batch_size,), generator=generator)]
        x0 = latents[pick]
        y = text_embeddings[pick].clone()
        drop = torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout
        y[drop] = uncond_embedding
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=generator)
        x0, y, noise, t = x0.to(device), y.to(device), noise.to(device), t.to(device)
        x_t = noise_scheduler.add_noise(x0, noise, t)
        target = noise if epsilon else noise_scheduler.get_velocity(x0, noise, t)
        loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=y).sample, target)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if callback is not None:
            callback(step, loss.item(), ema)
    return ema
