"""Every metric runs on the device it is given and says so; FID/KID embed the reference images once
per run. This machine has no GPU (and onnxruntime-gpu is absent), so the placements checked are
the CPU's; the ONNX provider choice is checked for CUDA with a list of providers."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch

from memtrain.core.manifest import load_image, read_manifest
from memtrain.eval.utility import ReferenceFeatures, fid_kid, metric_devices
from memtrain.metrics import (ClipScorer, TorchScriptSSCD, fid, get_descriptor, inception_features,
                              inception_placement, kid, not_computed, onnx_providers)
from memtrain.metrics.sscd import StandInDescriptor
from test_audit import _audit, _config, tiny_testbed  # noqa: F401  (the tiny testbed fixture, reused)

fid_module = importlib.import_module("memtrain.metrics.fid")  # the package's `fid` is the function
CPU = torch.device("cpu")
ONNX_ON_CPU = "cpu (onnxruntime CPUExecutionProvider, int8)"


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(5)]


# ----------------------------------------------------------------------------- SSCD


@pytest.mark.parametrize("device, available, expected", [
    ("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"],
     [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]),
    (torch.device("cuda:1"), ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
     [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]),
    ("cuda:0", ["AzureExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),  # no onnxruntime-gpu
    (CPU, ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),  # a CPU run stays there
    (None, ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),
])
def test_onnx_provider_choice(device, available, expected):
    assert onnx_providers(device, available) == expected


def test_onnx_sscd_runs_where_it_says(images):
    d = get_descriptor("onnx", device=CPU, batch_size=2)
    assert d._session.get_providers() == ["CPUExecutionProvider"] and d.placement == ONNX_ON_CPU
    assert d.batch_size == 2
    emb = d.embed(images)  # 5 images in batches of 2: the order and the figures do not depend on the batching
    np.testing.assert_allclose(emb, get_descriptor("onnx", batch_size=16).embed(images), atol=1e-5)
    # a CUDA device without onnxruntime's CUDA provider (this machine): the CPU, and the report says so
    fallback = get_descriptor("onnx", device="cuda")
    assert fallback._session.get_providers() == ["CPUExecutionProvider"] and fallback.placement == ONNX_ON_CPU
    assert get_descriptor("onnx-distilled", device=CPU).placement == "cpu (onnxruntime CPUExecutionProvider, fp32)"
    assert StandInDescriptor().placement.startswith("cpu")


def test_torchscript_sscd_moves_to_the_device(tmp_path, images):
    # a TorchScript file with weights (no SSCD TorchScript ships offline): what moves is its parameters
    path = tmp_path / "conv.torchscript.pt"
    torch.manual_seed(0)
    torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1))).save(str(path))
    d = get_descriptor(str(path), device=CPU, batch_size=3)
    assert isinstance(d, TorchScriptSSCD) and d.placement == "cpu (torchscript)" and d.batch_size == 3
    assert {p.device for p in d._model.parameters()} == {CPU}
    emb = d.embed(images)
    assert emb.shape == (5, 8) and np.allclose(np.linalg.norm(emb, axis=1), 1.0)


# ----------------------------------------------------------------------------- Inception


def test_inception_on_the_device_loaded_once(images):
    feats = inception_features(images, batch_size=2, device=CPU)
    model = fid_module._load_inception("cpu")
    assert {p.device for p in model.parameters()} == {CPU}
    before = fid_module._load_inception.cache_info()
    again = inception_features(images[:2], batch_size=4)  # None is the CPU: the same cached model
    after = fid_module._load_inception.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 1
    assert feats.shape == (5, 2048) and feats.dtype == np.float64
    np.testing.assert_allclose(again, feats[:2], rtol=1e-4, atol=1e-4)  # batching does not move the features
    assert inception_placement(CPU) == inception_placement(None) == "cpu (torchscript)"


# ----------------------------------------------------------------------------- CLIP


def test_clip_scorer_on_the_device(tiny_testbed, images):  # noqa: F811
    scorer = ClipScorer(tiny_testbed / "clip", batch_size=2, device=CPU)
    assert scorer.placement == "cpu (transformers)"
    assert {p.device for p in scorer.model.parameters()} == {CPU}
    cos = scorer.score(images, [f"a blob number {k}" for k in range(5)])
    assert cos.shape == (5,) and np.all(np.abs(cos) <= 1 + 1e-6)


def test_metric_devices_name_what_did_not_run():
    d = get_descriptor("onnx", device=CPU)
    assert metric_devices(d, None, not_computed("no utility manifest"), CPU) == {
        "sscd": ONNX_ON_CPU, "inception": "not computed", "clip": "not computed"}


# ----------------------------------------------------------------------------- reference features


def test_reference_features_reused_with_the_same_figures(tiny_testbed):  # noqa: F811
    """A shared ReferenceFeatures gives exactly the figures of embedding the references beside
    the generations chunk by chunk (the way fid_kid did before), and embeds them once."""
    manifest = tiny_testbed / "manifests" / "utility.jsonl"
    items = list(read_manifest(manifest, require_images=True))
    refs = [np.asarray(load_image(it).convert("RGB")) for it in items]

    def sampler(prompts, seeds):  # generations: the references flipped, as (N, S, 3, H, W) in [0, 1]
        by_prompt = {it.prompt: im for it, im in zip(items, refs)}
        x = torch.stack([torch.from_numpy(by_prompt[p][:, ::-1].copy()).permute(2, 0, 1) for p in prompts])
        return type("Out", (), {"images": (x.float() / 255.0)[:, None]})()

    chunk = 2  # two chunks: 2 + 1 images
    expected_gen = np.concatenate([inception_features(sampler([it.prompt for it in items[s:s + chunk]], [0]).images[:, 0])
                                   for s in range(0, len(items), chunk)])
    expected_ref = np.concatenate([inception_features(refs[s:s + chunk]) for s in range(0, len(items), chunk)])
    fresh = fid_kid(str(manifest), sampler, chunk_items=chunk, device=CPU)
    shared = ReferenceFeatures()
    first = fid_kid(str(manifest), sampler, chunk_items=chunk, device=CPU, reference=shared)
    second = fid_kid(str(manifest), sampler, chunk_items=chunk, device=CPU, reference=shared)
    assert shared.embedded == len(items)  # the second call reused them
    assert fresh == first == second
    assert first[0]["value"] == fid(expected_gen, expected_ref)
    assert first[1]["value"] == kid(expected_gen, expected_ref, subset_size=len(items))[0]


class _CountingInception:
    """The real Inception, counting the images that go through its forward."""

    def __init__(self, model):
        self.model, self.images = model, 0

    def __call__(self, x):
        self.images += x.shape[0]
        return self.model(x)


def test_audit_embeds_the_reference_images_once(tiny_testbed, tmp_path, monkeypatch):  # noqa: F811
    real = fid_module._load_inception
    counting = _CountingInception(real("cpu"))
    monkeypatch.setattr(fid_module, "_load_inception", lambda device="cpu": counting)
    out = tmp_path / "audit"
    doc = _audit(_config(tiny_testbed, out, ["none", "wanda"], max_targets=2))
    n_utility = 3  # the tiny recipe's utility_prompts
    runs = 1 + 2  # the unmitigated model and two mitigations, each with its generations
    assert all(r["utility"]["fid"]["n_generated"] == n_utility for r in doc["results"])
    assert counting.images == n_utility * runs + n_utility  # references once, not once per mitigation
    saved = json.loads((out / "report.json").read_text())
    assert saved["metric_devices"] == {"sscd": ONNX_ON_CPU, "inception": "cpu (torchscript)",
                                       "clip": "cpu (transformers)"}
    assert saved["runtime"]["device"] == "cpu"
    assert "metrics ran on | sscd: cpu (onnxruntime" in (out / "report.md").read_text()
