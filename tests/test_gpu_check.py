"""scripts/gpu_check.py on the CPU at 64 px with the smallest budgets: every stage runs on the
SD v1.4-shaped fixture and gpu_check.json carries finite, positive figures under the issue's keys,
so the check is known to run before a GPU is lent; bad flags are one line and write nothing."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from report_schema import assert_documented

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "scripts" / "gpu_check.py")
# the CPU try-out: LoRA (a full 860M U-Net with Adam needs ~16 GB on the CPU), one step of each,
# no removal stage (at SD's size on one CPU thread it took 12 min in CI: its code path is
# test_removal_stage_on_the_sd_shaped_model below), the audit on 2 targets x 2 seeds (NeMo compares seeds: 2 at least) instead of the GPU's 4 x 4
SMALL = ["--device", "cpu", "--resolution", "64", "--prompts", "1", "--seeds", "2", "--steps", "2", "--repeats", "1",
         "--attack_targets", "2", "--attack_steps", "1", "--noise_samples", "1", "--matmul_size", "1024",
         "--finetune", "lora", "--finetune_steps", "1", "--finetune_batch", "1",
         "--removal_steps", "0",
         "--audit_targets", "2", "--audit_seeds", "2", "--audit_steps", "2", "--audit_attack_steps", "1"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True, text=True)


@pytest.mark.parametrize("flags", [["--device", "tpu"], ["--dtype", "fp8"]])
def test_bad_flags_are_one_line_and_write_nothing(tmp_path, flags):
    out = tmp_path / "out"
    proc = _run(*flags, "--output_dir", str(out))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_cpu_check_writes_every_figure(tmp_path):
    out = tmp_path / "out"
    proc = _run(*SMALL, "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-2].startswith("ratio: ")
    doc = json.loads((out / "gpu_check.json").read_text())
    assert_documented("gpu_check.json (scripts/gpu_check.py)", doc)  # docs/reports.md
    assert doc["device"]["device"] == "cpu" and doc["device"]["dtype"] == "fp32"
    figures = {"generation": ["images_per_s", "pipeline_images_per_s", "ratio"],
               "attack": ["tflops", "matmul_tflops", "fraction"],
               "finetune": ["seconds_per_image", "peak_memory_gb"],
               "audit": ["seconds", "peak_memory_gb"]}
    for section, keys in figures.items():
        for key in keys:
            value = doc[section][key]
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (section, key, value)
    assert doc["finetune"]["finetune"] == "lora" and doc["audit"]["mitigations"] == ["none", "pad_mask", "nemo"]
    assert doc["audit"]["targets"] == 2 and doc["audit"]["seeds"] == 2 and doc["audit"]["rows"] > 0
    assert doc["generation"]["resolution"] == 64
    # the 4 GB fixture and the scratch are gone; only the JSON and the stage logs stay
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "logs"]


def test_removal_stage_on_the_sd_shaped_model(sd_shaped_dir, tmp_path):
    """The GPU check's removal stage (what it writes under `removal`) on the small SD-shaped model."""
    import dataclasses

    import numpy as np
    from PIL import Image

    from memtrain.bench.gpu_check import CheckBudget, removal_stage
    from memtrain.core.manifest import ManifestItem, write_manifest

    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    write_manifest(tmp_path / "m.jsonl", [ManifestItem(id="p0", prompt="a photo of a red barn", image=str(image))])
    budget = dataclasses.asdict(CheckBudget(removal_steps=1, removal_methods=["esd", "siss"]))
    doc = removal_stage({"budget": budget, "dtype": "fp32", "model": str(sd_shaped_dir),
                         "manifest": str(tmp_path / "m.jsonl"), "output_dir": str(tmp_path / "removal")})
    assert list(doc) == ["esd", "siss"] and doc["siss"]["gradient_accumulation_steps"] == 16
    assert all(r["seconds_per_step"] > 0 and r["peak_memory_gb"] > 0 for r in doc.values())
