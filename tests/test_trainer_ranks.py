"""Several processes share every stage of a fine-tuning run (surrogates, the utility check before
training, the per-epoch and closing audits) and reach the figures one process reaches.

The learning rate is too small to move any weight (1e-30 against weights of order 1e-2), so the
1- and 2-process runs audit the same U-Net although DDP splits the training images differently."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from memtrain.core.manifest import ManifestItem, write_manifest

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import SCRIPT, _images, run, single, tiny_recipe, tiny_setup  # noqa: E402,F401

STAGES = ("surrogates/prompts", "utility_before/heldout_rows", "utility_before/kid_prompts", "train/micro_steps",
          "epoch_audit/targets", "closing_audit/targets", "closing_audit/heldout_rows", "closing_audit/kid_prompts")


def ranks_recipe(root: Path, out: Path) -> Path:
    paths = _images(out.parent / "kid_images", "utility16", 16, 3)  # 2 KID chunks: one per process
    utility = out.parent / "utility16.jsonl"
    write_manifest(utility, [ManifestItem(id=f"u{i}", prompt=f"a utility picture number {i}", image=str(p))
                             for i, p in enumerate(paths)])
    memorized = out.parent / "memorized4.jsonl"
    items = [ManifestItem(id=f"m{i}", prompt=f"a memorized picture number {i}", image=str(p))
             for i, p in enumerate(_images(out.parent / "mem_images", "memorized4", 4, 4))]
    write_manifest(memorized, items)
    held_out = root / "manifests" / "held_out.jsonl"
    return tiny_recipe(root, out, memorized_manifest=str(memorized),
                       utility={"format": "manifest", "path": str(utility)},
                       train={"epochs": 1, "updates_per_embedding": 1, "max_steps": None, "learning_rate": 1e-30},
                       checkpointing={"steps": 0},
                       # NeMo (the default surrogate mitigation) with its preparation spread over the
                       # processes: statistics in chunks of 4 reference prompts, tau_mem from them
                       surrogates={"mitigation": "nemo", "mitigation_settings": {
                           "tau_mem": "auto", "num_seeds": 2, "num_inference_steps": 2, "batch_size": 4,
                           "refinement_budget": 4}},
                       audit={"epoch_end": True, "closing": True, "full": False, "kid": True, "kid_prompts": 16,
                              "max_items": 4, "targets_per_attack": 2, "heldout_manifest": str(held_out),
                              "heldout_noise_samples": 16})  # 32 rows: 2 chunks


def figures(out: Path) -> dict:
    report = json.loads((out / "audit" / "report.json").read_text())
    surrogates = [json.loads(line) for line in (out / "surrogates" / "manifest.jsonl").read_text().splitlines()]
    return {"before": json.loads((out / "audit" / "before.json").read_text()),
            "epoch1": json.loads((out / "audit" / "epochs" / "epoch1.json").read_text()),
            "closing": report["memorization"], "utility": report["utility"],
            "surrogates": [(s["id"], s["sscd_orig"]) for s in surrogates]}


def assert_close(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, float):
        assert np.isclose(a, b, rtol=1e-4, atol=1e-6), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a} != {b}"


@pytest.mark.slow  # several processes: the slow tier
def test_two_processes_share_every_stage_and_match_one(tiny_setup, tmp_path):
    one_out, two_out = tmp_path / "one" / "run", tmp_path / "two" / "run"
    one = single(ranks_recipe(tiny_setup, one_out), timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(SCRIPT), str(ranks_recipe(tiny_setup, two_out))], timeout=900, ACCELERATE_USE_CPU="true")
    assert two.returncode == 0, two.stderr[-3000:]
    work = json.loads((two_out / "run_summary.json").read_text())["work_per_rank"]
    assert len(work) == 2
    for stage in STAGES:
        assert work[0].get(stage, 0) > 0 and work[1].get(stage, 0) > 0, (stage, work)
    single_work = json.loads((one_out / "run_summary.json").read_text())["work_per_rank"][0]
    for stage in STAGES:  # the same items, split: nothing done twice, nothing skipped
        if stage != "train/micro_steps":
            assert work[0][stage] + work[1][stage] == single_work[stage], (stage, work, single_work)
    a, b = figures(one_out), figures(two_out)
    assert isinstance(a["before"]["kid"], float) and isinstance(a["before"]["heldout_loss"], float)
    assert_close(a, b)
