"""The one factory of config-built models for tests (no downloads, seconds to build).

`tiny_bundle`: U-Net with CrossAttnDownBlock2D/CrossAttnUpBlock2D blocks and a cross-attention
mid block, a CLIPTextModel of width 32, SD1.4's real CLIP tokenizer (built offline), a DDIM
scheduler and the testbed PixelShuffleCodec(factor=2) as vae, so images are 2x the latent size.
`build_sd_shaped`: the layout of SD1.x on disk (AutoencoderKL, 768-d CLIP text tower, 4-level
U-Net, SD v1.4's PNDM scheduler config), tiny widths.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from memtrain.core.bundle import ModelBundle
from memtrain.testbed.codec import PixelShuffleCodec
from memtrain.core.tokenizer import build_clip_tokenizer

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


def word_bundle(tokenizer_dir: Path) -> ModelBundle:
    """A tiny bundle with SD's real CLIP tokenizer (the prompt-space attacks' whole-word vocabulary)."""
    return tiny_bundle(None, tokenizer=build_clip_tokenizer(tokenizer_dir))


def target_latents(bundle: ModelBundle, n: int = 2) -> torch.Tensor:
    """n fixed random target latents of the bundle's shape (seed 3)."""
    return torch.randn(n, bundle.latent_channels, bundle.sample_size, bundle.sample_size,
                       generator=torch.Generator().manual_seed(3))


def build_sd_shaped(folder: Path, tokenizer_dir: Path) -> Path:
    """Config-built SD1.x-shaped pipeline: AutoencoderKL, 768-d CLIPTextModel, 4-level UNet."""
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


def kill_after_first_unit(cmd: list[str], output_dir: Path, env: dict, cwd: Path, seed: int,
                          max_units: int, timeout: float = 600) -> int:
    """Run `cmd` (an audit or evaluate writing `output_dir`) in its own process group, and once
    its work journal holds k finished units (k drawn from 1..max_units by `seed`; the caller
    picks max_units below the run's unit count), SIGKILL every process of it. Returns the
    number of finished units then. The moment is a unit count, not a delay: after the slow
    start units can take milliseconds each, so a random delay may outlive the run (seen in CI)."""
    import contextlib
    import os
    import random
    import signal
    import subprocess
    import time

    from memtrain.core.journal import journal_dir

    units = journal_dir(output_dir) / "units"
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    k = random.Random(seed).randint(1, max_units)
    while len(list(units.glob("*.json"))) < k and proc.poll() is None and time.time() < start + timeout:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    import psutil  # torch's elastic agent starts the ranks in sessions of their own: kill them all

    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    for pid in family[1:]:  # the ranks are not our children: wait until they are gone
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).wait(timeout=30)
    proc.stderr.close()
    return len(list(units.glob("*.json")))


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state (an in-process training sets its precision and
    gradient accumulation there): the next Accelerator starts afresh."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
