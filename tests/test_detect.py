"""The detection benchmark: its statistics on known score sets, and scripts/detect.py's run on a
tiny random SD1.x-shaped model (plumbing: every detector scores every prompt, outputs are whole)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from factories import tiny_bundle
from memtrain.core.errors import MemtrainError
from memtrain.core.tokenizer import build_clip_tokenizer
from memtrain.data import ManifestItem, write_manifest
from memtrain.eval.detect import DETECTORS, auc, roc_points, tpr_at_fpr
from memtrain.eval.detect_run import DetectConfig, detect

ROOT = Path(__file__).resolve().parents[1]


def test_auc_tpr_and_roc_on_known_scores():
    assert auc([3, 4, 5], [0, 1, 2]) == 1.0 and auc([0, 1], [2, 3]) == 0.0
    assert auc([1, 2], [1, 2]) == 0.5  # ties count one half
    negatives = list(range(200))  # 1% of 200: two negatives (198, 199) may score above the threshold (197)
    assert tpr_at_fpr([196.5, 197.5, 250], negatives) == pytest.approx(2 / 3)
    assert tpr_at_fpr([5, 10], [1, 2, 9]) == 0.5  # fewer than 100 negatives: above all of them
    fpr, tpr = roc_points([2, 3], [1, 2])
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("detect")
    bundle = tiny_bundle(None, tokenizer=build_clip_tokenizer(root / "tok"))
    bundle.save(root / "model")
    (root / "model" / "memtrain.json").write_text(json.dumps(
        {"sampler": {"scheduler": "ddim", "num_inference_steps": 4, "guidance_scale": 3.0, "batch_size": 16}}))
    write_manifest(root / "mem.jsonl", [ManifestItem(id=f"m{k}", prompt=f"a photo of the thing {k}") for k in range(3)])
    write_manifest(root / "non.jsonl", [ManifestItem(id=f"n{k}", prompt=f"a red square number {k}") for k in range(3)])
    return root


def test_detect_scores_every_prompt_and_writes_its_outputs(tiny_model, tmp_path):
    out = tmp_path / "det"
    doc = detect(DetectConfig(model=str(tiny_model / "model"), memorized=str(tiny_model / "mem.jsonl"),
                              non_memorized=str(tiny_model / "non.jsonl"), seeds=2, output_dir=str(out),
                              progress=False)).report
    assert set(doc["detectors"]) == set(DETECTORS)
    for name, r in doc["detectors"].items():
        assert len(r["scores"]["memorized"]) == 3 == len(r["scores"]["non_memorized"])
        assert 0.0 <= r["auc"] <= 1.0 and 0.0 <= r["tpr_at_1pct_fpr"] <= 1.0 and r["seconds_per_prompt"] > 0
        assert all(v == v for v in r["scores"]["memorized"])  # no NaN
    saved = json.loads((out / "detect.json").read_text())
    assert saved["detectors"]["wen"]["auc"] == doc["detectors"]["wen"]["auc"]
    assert (out / "roc.png").is_file() and "| wen |" in (out / "detect.md").read_text()


def test_bad_detect_input_is_one_line_and_writes_nothing(tiny_model, tmp_path):
    with pytest.raises(MemtrainError, match="unknown detector 'magic': choose one of wen, nemo"):
        DetectConfig(detectors=["magic"])
    with pytest.raises(MemtrainError, match="--seeds must be >= 2"):
        DetectConfig(seeds=1)
    out = tmp_path / "det"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "detect.py"), "--model", str(tiny_model / "model"),
                           "--memorized", str(tiny_model / "mem.jsonl"), "--non_memorized",
                           str(tiny_model / "non.jsonl"), "--output_dir", str(out)], capture_output=True, text=True)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1 and "--overwrite" in proc.stderr
    assert (out / "keep.txt").read_text() == "previous run"
