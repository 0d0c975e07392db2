"""Slow tier: docs/results.md's fine-tuning figures on the real testbed with the real SSCD. Full
fine-tuning of the U-Net removes the memorized images (attack MR <= 0.3); LoRA on attention
does not (attack MR >= 0.7), as paper 004 found. The closing audit runs the testbed audit recipe
at 4 seeds instead of 10 to keep CI in minutes (fewer seeds can only lower an MR). To keep the
suite within its 40 minutes neither run does the per-epoch audits (the fast tier covers them);
both end with the audit's full-strength attack at 4 seeds, on all 10 targets for the full run and
on 4 for LoRA (docs/results.md's 10 x 10 figures come from the full command)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from report_schema import assert_documented

REPO = Path(__file__).resolve().parents[1]


def finetune(tmp_path: Path, name: str, *overrides: str, full_audit: bool = True, targets: int = 10) -> dict:
    recipe = tmp_path / "audit_4_seeds.yaml"
    text = (REPO / "recipes" / "audit_testbed.yaml").read_text().replace("seeds: 10 ", "seeds: 4 ")
    recipe.write_text(text.replace("max_targets: null ", f"max_targets: {targets} "))
    out = tmp_path / name
    env = {**os.environ, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "adv_finetune.py"), str(REPO / "recipes" / "testbed.yaml"),
                           f"output_dir={out}", f"audit.full_recipe={recipe}", "audit.epoch_end=false",
                           f"audit.full={str(full_audit).lower()}", f"audit.kid={str(full_audit).lower()}", *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "audit" / "report.json").read_text())
    assert_documented("audit/report.json (scripts/adv_finetune.py)", report)  # docs/reports.md
    assert_documented("run_summary.json (scripts/adv_finetune.py)", json.loads((out / "run_summary.json").read_text()))
    if full_audit:
        full = json.loads((out / "audit" / "full" / "report.json").read_text())
        assert full["settings"]["seeds"] == [0, 1, 2, 3] and full["settings"]["n_targets"] == targets
    return report


@pytest.mark.slow
def test_full_finetune_removes_the_memorized_images(testbed_dir, tmp_path):
    full = finetune(tmp_path, "full")
    assert full["mr_attack"] <= 0.3 and full["mr_control"] <= 0.1


@pytest.mark.slow
def test_lora_finetune_only_conceals_them(testbed_dir, tmp_path):
    finetune(tmp_path, "lora", "train.finetune=lora", "train.learning_rate=1e-3", "audit.max_items=10", targets=4)
    # judged by the audit's full-strength attack (50 steps; 4 targets x 4 seeds to keep CI within 40
    # min: the concealment is a property of every image, the removal above is judged on all 10):
    # on testbed v4 the closing small audit's 20-step training attack brought back only 3 of 10
    # (attack MR 0.3, prompts 0.0) where the full attack brought back 9 (0.9, control 0.0)
    lora = json.loads((tmp_path / "lora" / "audit" / "full" / "report.json").read_text())["results"][0]
    assert lora["mr_prompt"] <= 0.3 and lora["mr_attack"] >= 0.7 and lora["mr_control"] <= 0.1
