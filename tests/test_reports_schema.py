"""docs/reports.md is the report format: every key a command writes is listed there, every listed
key that is not optional is written, and every report document starts with schema_version.
The reports come from real runs at the smallest budgets (the tiny models and the dev testbed
the other tests use). The reports other fast tests write anyway are checked there, through
tests/report_schema.py: the audit's report.json in test_audit.py, the analyses' JSON and the
planted card in test_analyses.py, the fine-tuner's run_summary.json and audit/report.json in
test_trainer.py (and on the real testbed in test_finetune_testbed.py, slow); gpu_check.json in
test_gpu_check.py (slow)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from factories import tiny_bundle
from report_schema import DOC, assert_documented, compare, documented, key_paths, sections
from memtrain.core.report import SCHEMA_VERSION, versioned
from memtrain.core.tokenizer import build_clip_tokenizer
from memtrain.data import ManifestItem, write_manifest

from test_fetch import Server, _image_bytes, _manifest


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- the document itself


def test_every_report_file_has_a_section_with_schema_version():
    table = sections()
    reports = [s for s in table if not s.startswith("fragment ")]
    assert len(reports) >= 12, reports
    for section in reports:
        keys = documented(section)
        assert next(iter(keys)) == "schema_version" and keys["schema_version"] is False, section
        for key, meaning, unit in table[section]:
            assert meaning and unit, f"{section}: `{key}` needs a meaning and a unit"
    assert SCHEMA_VERSION == 1 and f"schema_version: {SCHEMA_VERSION}" in DOC.read_text()


def test_versioned_puts_the_version_first_and_the_checker_catches_drift():
    doc = versioned({"fetched": 1, "dead": [{"id": "a", "url": "u", "reason": "r"}], "schema_version": 7})
    assert list(doc)[0] == "schema_version" and doc["schema_version"] == SCHEMA_VERSION
    paths, stops = key_paths({"a": {"b": [{"c": 1}]}, "fid": {"value": None, "status": "not computed", "reason": "x"},
                              "n": None})
    assert paths == {"a", "a.b", "a.b[]", "a.b[].c", "fid", "n"} and stops == {"fid", "n"}
    good = {"schema_version": 1, "fetched": 1, "dead": [], "skipped_existing": 0, "downloaded": 1, "total": 1,
            "manifest": "m"}
    assert compare("fetch_report.json (scripts/fetch_images.py)", [good]) == ([], [])
    undocumented, missing = compare("fetch_report.json (scripts/fetch_images.py)",
                                    [{**{k: v for k, v in good.items() if k != "total"}, "surprise": 1}])
    assert undocumented == ["surprise"] and missing == ["total"]


# ----------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("schema_detect")
    bundle = tiny_bundle(None, tokenizer=build_clip_tokenizer(root / "tok"))
    bundle.save(root / "model")
    (root / "model" / "memtrain.json").write_text(json.dumps(
        {"sampler": {"scheduler": "ddim", "num_inference_steps": 2, "guidance_scale": 3.0, "batch_size": 16}}))
    write_manifest(root / "mem.jsonl", [ManifestItem(id=f"m{k}", prompt=f"a photo of the thing {k}") for k in range(2)])
    write_manifest(root / "non.jsonl", [ManifestItem(id=f"n{k}", prompt=f"a red square number {k}") for k in range(2)])
    return root


def test_detect_json(tiny_model, tmp_path):
    from memtrain.eval.detect_run import DetectConfig, detect

    detect(DetectConfig(model=str(tiny_model / "model"), memorized=str(tiny_model / "mem.jsonl"),
                        non_memorized=str(tiny_model / "non.jsonl"), seeds=2, output_dir=str(tmp_path / "det"),
                        progress=False))
    assert_documented("detect.json (scripts/detect.py)", _load(tmp_path / "det" / "detect.json"))


def test_fetch_report_json(tmp_path):
    from memtrain.data import fetch_images

    server = Server()
    try:
        server.routes.update({"/good.png": (200, "image/png", _image_bytes("PNG"), {}),
                              "/gone.png": (404, "text/plain", b"no", {})})
        manifest = _manifest(tmp_path, server, {"good": "/good.png", "gone": "/gone.png"})
        fetch_images(manifest, tmp_path / "out", workers=2, retries=0, progress=False)
    finally:
        server.close()
    assert_documented("fetch_report.json (scripts/fetch_images.py)", _load(tmp_path / "out" / "fetch_report.json"))


def test_evaluate_and_triage_json(dev_testbed, tmp_path):
    from memtrain.eval.triage import TriageConfig, triage
    from memtrain.core.manifest import read_manifest
    from memtrain.testbed.resolver import resolve_model

    items = read_manifest(dev_testbed / "manifests" / "memorized.jsonl", require_images=True)[:2]
    twin = dataclasses.replace(items[0], id="twin", prompt="another caption for the same photo")
    release = write_manifest(tmp_path / "release.jsonl", [*items, twin])
    out = tmp_path / "triage"
    cfg = TriageConfig(model=str(dev_testbed / "model"), seeds=2, output_dir=str(out), progress=False,
                       release=str(release), duplicate_threshold=0.95)
    triage(cfg, resolve_model(cfg.model))
    assert_documented("metrics.json (scripts/evaluate.py)", _load(out / "metrics.json"))
    assert_documented("triage.json (scripts/triage.py)", _load(out / "triage.json"))
    assert_documented("duplicates.json (scripts/triage.py)", _load(out / "duplicates.json"))


def test_testbed_card_json(dev_testbed):
    assert_documented("testbed_card.json (scripts/build_testbed.py)", _load(dev_testbed / "testbed_card.json"))
