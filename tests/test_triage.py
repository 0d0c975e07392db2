"""Triage (scripts/triage.py) on the dev testbed with the real SSCD: the release is split at the
threshold exactly as metrics.json scores it, two items sharing one training image form a
near-duplicate group, a URL-only release is refused in one line before any work."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from memtrain.core.errors import MemtrainError
from memtrain.core.manifest import read_manifest, write_manifest
from memtrain.eval.triage import TriageConfig, triage
from memtrain.testbed.resolver import resolve_model

REPO = Path(__file__).resolve().parents[1]


def _release(dev_testbed: Path, folder: Path) -> Path:
    """Six memorized items; the last one re-uses the first one's image under another prompt."""
    items = read_manifest(dev_testbed / "manifests" / "memorized.jsonl", require_images=True)[:5]
    twin = dataclasses.replace(items[0], id="twin_of_first", prompt="another caption for the same photo")
    return write_manifest(folder / "release.jsonl", [*items, twin])


def test_triage_splits_at_the_threshold_and_flags_shared_images(dev_testbed, tmp_path):
    release = _release(dev_testbed, tmp_path)
    out = tmp_path / "triage"
    cfg = TriageConfig(model=str(dev_testbed / "model"), seeds=2, output_dir=str(out), progress=False,
                       release=str(release))
    # a threshold inside the range of the scores, so both outputs are non-empty; the split must
    # follow the scores whatever they are
    probe = triage(dataclasses.replace(cfg, output_dir=str(tmp_path / "probe")), resolve_model(cfg.model))
    scores = sorted(r["sscd_orig_max"] for r in json.loads((Path(probe["output_dir"]) / "metrics.json").read_text())["items"])
    threshold = (scores[1] + scores[2]) / 2
    result = triage(dataclasses.replace(cfg, threshold=threshold, duplicate_threshold=0.95), resolve_model(cfg.model))

    metrics = json.loads((out / "metrics.json").read_text())
    expected = {r["id"] for r in metrics["items"] if r["sscd_orig_max"] > threshold}
    replicating = read_manifest(out / "replicating.jsonl", require_images=True)
    others = read_manifest(out / "non_replicating.jsonl", require_images=True)
    assert {m.id for m in replicating} == expected and len(replicating) + len(others) == 6
    assert result["n_replicating"] == len(expected) and 0 < len(expected) < 6
    assert all(m.extra["sscd_orig_max"] > threshold for m in replicating)
    groups = json.loads((out / "duplicates.json").read_text())["groups"]
    first = read_manifest(release)[0].id
    assert [sorted(g["ids"]) for g in groups] == [sorted([first, "twin_of_first"])]
    assert groups[0]["max_sscd"] > 0.99
    summary = json.loads((out / "triage.json").read_text())
    assert summary["n_replicating"] == len(expected) and summary["n_duplicate_groups"] == 1
    assert summary["metric_backend"].startswith("sscd") and (out / "triage.md").is_file()


def test_a_release_of_urls_is_refused_before_any_work(tmp_path):
    wen = tmp_path / "sdv1_500_memorized.jsonl"
    wen.write_text(json.dumps({"caption": "a photo", "index": 7, "url": "https://example.org/a.jpg"}) + "\n")
    with pytest.raises(MemtrainError, match="memtrain fetch"):
        triage(TriageConfig(output_dir=str(tmp_path / "out"), release=str(wen)))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "triage.py"), str(wen), "--model", str(tmp_path / "none"),
                           "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "memtrain fetch" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()

