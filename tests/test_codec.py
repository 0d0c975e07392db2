"""The testbed codec: lossless with and without whitening, and saved/loaded with its fit."""

import torch

from memtrain.testbed.codec import PixelShuffleCodec


def _images(n: int = 6, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(n, 3, size // 8, size // 8, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    return (smooth + 0.05 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1) * 2 - 1


def test_roundtrip_is_lossless_and_whitening_normalizes(tmp_path):
    images = _images()
    plain = PixelShuffleCodec(factor=4)
    assert torch.equal(plain.decode_latents(plain.encode_images(images)), images)
    white = PixelShuffleCodec(factor=4)
    white.fit_whitening(images, power=1.0, floor=1e-6)
    latents = white.encode_images(images)
    assert latents.shape == (6, 48, 8, 8)
    assert torch.allclose(white.decode_latents(latents), images, atol=1e-4)
    # full whitening: every principal component gets unit variance over the fitted blocks
    std = latents.permute(0, 2, 3, 1).reshape(-1, 48).std(0)
    assert torch.allclose(std, torch.ones(48), atol=0.05)
    # smooth images: the raw pixel blocks are far from unit variance per channel
    raw = plain.encode_images(images).permute(0, 2, 3, 1).reshape(-1, 48).std(0)
    assert raw.max() < 0.6
    white.save_pretrained(tmp_path / "vae", safe_serialization=True)
    loaded = PixelShuffleCodec.from_pretrained(tmp_path / "vae")
    assert torch.equal(loaded.encode_images(images), latents)
