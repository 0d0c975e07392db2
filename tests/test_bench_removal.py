"""`memtrain bench removal` on a config-built SD1.x-shaped model: every removal method runs its
preparation and one optimizer step at removal_sd14.yaml's settings (SISS included: the memorized
image is the model's own generation, so a replica / non-replica split exists on random weights),
removal_bench.json holds what docs/reports.md says, and the projection is the recipe's steps times
the measured step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from memtrain.core.manifest import ManifestItem, write_manifest
from report_schema import assert_documented

REPO = Path(__file__).resolve().parents[1]


def test_every_method_timed_and_projected(sd_shaped_dir, tmp_path):
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    write_manifest(tmp_path / "memorized.jsonl", [ManifestItem(id="photo_0", prompt="a photo of a red barn", image=str(image))])
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_removal.py"), "--model", str(sd_shaped_dir),
                           "--manifest", str(tmp_path / "memorized.jsonl"), "--steps", "1", "--output_dir", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "removal_bench.json").read_text())
    assert_documented("removal_bench.json (memtrain bench removal)", doc)  # docs/reports.md
    rows = {r["method"]: r for r in doc["methods"]}
    assert list(rows) == ["esd", "concept_ablation", "siss"]
    for r in rows.values():
        assert r["items"] == 1 and not r["skipped"] and r["steps"] == 1, r
        assert r["seconds_per_step"] > 0 and r["peak_memory_gb"] > 0
        assert r["projected_training_seconds"] == round(r["recipe"]["steps"] * r["seconds_per_step"], 1)
    # paper 004's settings (removal_sd14.yaml): ESD 10k steps, Concept Ablation 12k, SISS 35 x 16 per image
    assert [rows[m]["recipe"]["steps"] for m in rows] == [10000, 12000, 35]
    assert rows["siss"]["gradient_accumulation_steps"] == 16 and rows["siss"]["recipe"]["one_model_per_item"]
    assert rows["esd"]["preparation_seconds_per_item"] < rows["siss"]["preparation_seconds_per_item"]
    assert rows["siss"]["recipe"]["images_per_item"] == 128 and rows["concept_ablation"]["recipe"]["images_per_item"] == 1000
    lines = proc.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[-3:]] == ["esd", "concept_ablation", "siss"]


def test_an_unknown_method_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_removal.py"), "--method", "esdx",
                           "--output_dir", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and "esdx" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
