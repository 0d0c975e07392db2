"""A second testbed model that never saw the memorized pairs: the surrogate source.

Paper 004 (App. I) draws surrogate images "under an active mitigation or from a model that
never saw the image". On the testbed the mitigations do not stop the copies (measured: pad_eot,
pad_mask and Wanda at 10% left most prompts with only copies of one memorized image or
another), so the
fine-tuning recipe asks this model instead: the testbed's own tokenizer, frozen text encoder,
codec, scheduler and U-Net shape, trained from scratch on the unique and utility pairs only.
Built on first use (600 steps, about 3 minutes on 2 CPU cores), cached beside the testbed's model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from diffusers import UNet2DConditionModel

from memtrain.core.bundle import load_bundle
from memtrain.core.diffusion import images_to_latents
from memtrain.core.errors import MemtrainError
from memtrain.core.files import staged_dir
from memtrain.core.manifest import load_image, read_manifest
from memtrain.core.sampling import SAMPLER_FILE
from memtrain.core.text import encode_prompts
from memtrain.testbed.train_unet import TrainConfig, train_unet

REFERENCE_KEY = "testbed_reference"  # the recipe spelling: surrogates.model: testbed_reference
REFERENCE_DIR = "reference_model"
REFERENCE_SPLITS = ("unique", "utility")


def reference_model_dir(testbed_root: str | Path) -> Path:
    """Where a testbed keeps its reference model."""
    return Path(testbed_root) / REFERENCE_DIR


def ensure_reference_model(testbed_root: str | Path, steps: int = 600, seed: int = 0,
                           progress: bool = True, device: str | torch.device = "cpu") -> Path:
    """testbed_root/reference_model (diffusers layout), trained first (on `device`) if it is not there."""
    root = Path(testbed_root)
    out = reference_model_dir(root)
    if (out / "model_index.json").is_file():
        return out
    if not (root / "model" / "model_index.json").is_file():
        raise MemtrainError(f"'{root}' is not a built testbed (no model/model_index.json): "
                            "build one with memtrain build-testbed")
    items = [it for split in REFERENCE_SPLITS
             for it in read_manifest(root / "manifests" / f"{split}.jsonl", require_images=True)]
    memorized = {it.image for it in read_manifest(root / "manifests" / "memorized.jsonl")}
    if any(it.image in memorized for it in items):  # the whole point: it must never see them
        raise MemtrainError(f"'{root}': a unique/utility pair reuses a memorized image; rebuild the testbed")
    bundle = load_bundle(root / "model")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(bundle.unet.config)  # same shape, fresh weights
    latents = images_to_latents(bundle, [load_image(it) for it in items])
    text = encode_prompts(bundle, [it.prompt for it in items]).embeddings
    uncond = encode_prompts(bundle, [""]).embeddings[0]
    index = torch.arange(len(items))
    cfg = TrainConfig(steps=steps, batch_size=16, lr=1e-3)
    ema = train_unet(unet.to(device), bundle.scheduler, latents, text, uncond, index, cfg, seed, progress=progress)
    bundle.unet = ema.to("cpu")

    with staged_dir(out) as tmp:
        bundle.save(tmp)
        sampler = root / "model" / SAMPLER_FILE
        if sampler.is_file():
            shutil.copy(sampler, tmp / SAMPLER_FILE)
        (tmp / "reference.json").write_text(json.dumps(
            {"trained_on": list(REFERENCE_SPLITS), "pairs": len(items), "steps": steps, "seed": seed}, indent=1))
    return out
