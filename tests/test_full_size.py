"""Full-size fixtures: the published SD configs, checked on the meta device (shapes, no memory)."""

from __future__ import annotations

import pytest
from accelerate import init_empty_weights

from memtrain.core.errors import MemtrainError
from memtrain.testbed.full_size import sd_modules, sd_scheduler, variant

# Parameter counts of the published checkpoints' U-Net, text encoder and VAE.
PUBLISHED = {
    "sd14": (859_520_964, 123_060_480, 83_653_863),
    "sd15": (859_520_964, 123_060_480, 83_653_863),
    "sd21-base": (865_910_724, 340_387_840, 83_653_863),
    "sd21": (865_910_724, 340_387_840, 83_653_863),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_variants_have_the_published_parameter_counts(name):
    with init_empty_weights():
        modules = sd_modules(name, resolution=256)
    assert tuple(sum(p.numel() for p in m.parameters()) for m in modules) == PUBLISHED[name]
    unet, text, vae = modules
    assert unet.config.sample_size == 32 and vae.config.sample_size == 256  # the CPU resolution override
    assert text.config.hidden_size == unet.config.cross_attention_dim


def test_sd2_variants_pad_with_bang_and_21_predicts_v():
    assert variant("sd14").pad_token == "<|endoftext|>" and variant("sd21-base").pad_token == "!"
    assert sd_scheduler("sd21").config.prediction_type == "v_prediction"
    assert sd_scheduler("sd21-base").config.prediction_type == "epsilon"
    assert sd_scheduler("sd14").config.clip_sample is False  # as SD v1.x's published scheduler config
    with init_empty_weights():
        unet, _, _ = sd_modules("sd21")
    assert unet.config.sample_size == 96 and unet.config.upcast_attention


def test_unknown_variant_and_bad_resolution_are_refused():
    with pytest.raises(MemtrainError, match="unknown SD variant 'sd3'.*sd14"):
        variant("sd3")
    with pytest.raises(MemtrainError, match="multiple of 64"):
        sd_modules("sd14", resolution=300)


def test_photo_manifests_are_laion_like_and_refuse_a_taken_folder(tmp_path):
    from PIL import Image

    from memtrain.core.manifest import load_image, read_manifest
    from memtrain.testbed.photos import write_photo_manifests

    folder = write_photo_manifests(tmp_path / "photos")
    memorized = read_manifest(folder / "memorized.jsonl", require_images=True)
    held_out = read_manifest(folder / "held_out.jsonl", require_images=True)
    assert len(memorized) == len(held_out) == 4 and not {m.id for m in memorized} & {h.id for h in held_out}
    modes = {Image.open(it.image).mode for it in memorized + held_out}
    assert {"CMYK", "L", "RGBA", "P"} <= modes  # what a scraped dataset holds
    assert all(load_image(it).mode == "RGB" for it in memorized + held_out)
    with pytest.raises(MemtrainError, match="already exists"):
        write_photo_manifests(folder)
