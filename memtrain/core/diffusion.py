"""Diffusion helpers shared by the attack, the mitigations, the trainer and the testbed: images
to pixels and latents (one preprocessing for every path), the training noise schedule and its
regression target, seed derivation, and freezing a module (or its gradient checkpointing) for a
block of work."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image

from memtrain.core.errors import MemtrainError
from memtrain.core.manifest import to_rgb


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts (np.random.SeedSequence): independent streams by name."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


def generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by `derived_seed(*parts)`: the same on every device and world size."""
    return torch.Generator(device="cpu").manual_seed(derived_seed(*parts))


def to_pixels(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> (B, 3, size, size) in [-1, 1]: RGB (`to_rgb`: EXIF orientation, 16-bit,
    CMYK, palette), centre crop to square, bicubic resize.

    The one preprocessing every path (audit, evaluate, trainer, surrogates, reference model)
    uses, so images of any size and aspect ratio reach the model the same way."""
    out = []
    for im in images:
        im = to_rgb(im)
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
        if side != size:
            im = im.resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1))
    return torch.stack(out) / 127.5 - 1


def images_to_latents(bundle, images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> the latents the U-Net is trained on (float32, CPU), via `to_pixels`."""
    return bundle.encode_images(to_pixels(images, bundle.pixel_resolution)).float().cpu()


def training_scheduler(bundle) -> DDPMScheduler:
    """The forward-noising schedule the model was trained with (whatever sampler it ships)."""
    return DDPMScheduler.from_config(bundle.scheduler.config)


def regression_target(scheduler, latents: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor) -> torch.Tensor:
    """What the U-Net regresses in training for its prediction_type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise MemtrainError(f"unsupported prediction_type '{kind}' (epsilon, v_prediction, sample)")


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """eval() and no parameter grads for the block; the previous state is restored after."""
    was_training = module.training
    flags = [p.requires_grad for p in module.parameters()]
    module.eval().requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)
        module.train(was_training)


@contextlib.contextmanager
def checkpointing_off(module: torch.nn.Module, active: bool = True) -> Iterator[torch.nn.Module]:
    """Gradient checkpointing off in every block of a diffusers model for the block, each block's
    flag restored after (its checkpointing function is kept). diffusers gates checkpointing on
    grad mode alone, so an attack (grads w.r.t. the embedding only) would run every block's
    forward twice; off, it holds the activations instead. active=False: a no-op."""
    blocks = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False)] if active else []
    for block in blocks:
        block.gradient_checkpointing = False
    try:
        yield module
    finally:
        for block in blocks:
            block.gradient_checkpointing = True
