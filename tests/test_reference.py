"""The testbed's second model (surrogate source): trained only on unique + utility pairs, saved
atomically in diffusers layout beside the model, reused once built. Mechanics on a tiny
testbed-shaped folder (a few steps); the real one is exercised by recipes/testbed.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from memtrain.core.manifest import ManifestItem, write_manifest
from memtrain.core.errors import MemtrainError


def _testbed_like(root: Path) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from factories import tiny_bundle

    tiny_bundle(root / "tok").save(root / "model")
    rng = np.random.default_rng(0)
    for split, n in (("memorized", 2), ("unique", 3), ("utility", 3), ("held_out", 2)):
        items = []
        for i in range(n):
            path = root / "images" / f"{split}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
            items.append(ManifestItem(id=f"{split}_{i}", prompt=f"a {split} picture {i}", image=str(path), label=split))
        write_manifest(root / "manifests" / f"{split}.jsonl", items)
    return root


def test_reference_model_trains_without_memorized_pairs(tmp_path):
    from memtrain.core.bundle import load_bundle
    from memtrain.testbed.reference import ensure_reference_model
    from memtrain.train.checkpoints import param_checksum

    root = _testbed_like(tmp_path / "tb")
    out = ensure_reference_model(root, steps=3)
    assert out == root / "reference_model"
    info = json.loads((out / "reference.json").read_text())
    assert info["trained_on"] == ["unique", "utility"] and info["pairs"] == 6 and info["steps"] == 3
    ref, main = load_bundle(out), load_bundle(root / "model")
    shape = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}
    assert shape(ref.unet.config) == shape(main.unet.config)  # same shape
    assert param_checksum(ref.unet)["sha256"] != param_checksum(main.unet)["sha256"]  # fresh weights
    for a, b in zip(ref.text_encoder.parameters(), main.text_encoder.parameters()):
        assert torch.equal(a, b)  # the frozen text encoder is shared
    assert not list(root.glob(".reference_model.partial-*"))
    stamp = (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert ensure_reference_model(root, steps=3) == out  # cached: not retrained
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp


def test_reference_model_refuses_a_split_that_reuses_a_memorized_image(tmp_path):
    from memtrain.core.manifest import read_manifest
    from memtrain.testbed.reference import ensure_reference_model

    root = _testbed_like(tmp_path / "tb")
    leak = read_manifest(root / "manifests" / "memorized.jsonl")[0]
    write_manifest(root / "manifests" / "utility.jsonl", [leak])
    with pytest.raises(MemtrainError, match="reuses a memorized image"):
        ensure_reference_model(root, steps=1)
    assert not (root / "reference_model").exists()


def test_reference_model_needs_a_built_testbed(tmp_path):
    from memtrain.testbed.reference import ensure_reference_model

    with pytest.raises(MemtrainError, match="is not a built testbed"):
        ensure_reference_model(tmp_path)
