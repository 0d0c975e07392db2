"""DeepSpeed ZeRO-3 fine-tuning on the CPU (2 processes over gloo): the U-Net really is partitioned,
yet the main-process audits, checksums and the saved model see whole weights, equal to ZeRO-2's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from test_trainer import REPO, SCRIPT, checksum, run, tiny_recipe, tiny_setup  # noqa: F401 (fixture)

# Adam's update is g / (sqrt(v) + eps): with the default eps 1e-8 a gradient that nearly cancels
# across ranks turns ZeRO-2's and ZeRO-3's different reduction rounding into up to 6e-5 of weight
# (measured, 3 steps); eps 1e-4 keeps that at rounding level (1.2e-7) while every weight still moves
TRAIN = {"epochs": 2, "updates_per_embedding": 1, "max_steps": None, "adam_epsilon": 1e-4}


def ds_config(tmp: Path, stage: int) -> Path:
    """The shipped ds_zero{stage}.json; for stage 3 with every parameter partitioned (by default
    DeepSpeed keeps parameters under 1e5 elements whole, and all of the tiny U-Net's are)."""
    config = json.loads((REPO / "accelerate_configs" / f"ds_zero{stage}.json").read_text())
    if stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp / f"ds_zero{stage}.json"
    path.write_text(json.dumps(config))
    return path


def launch(config: Path, recipe: Path, *extra: str, ok: bool = True):
    """2-process DeepSpeed on the CPU (ACCELERATE_USE_CPU unset, or accelerate drops DeepSpeed).
    A hang (a forward only the main process makes) fails at the timeout."""
    proc = run([sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed",
                "--deepspeed_config_file", str(config), "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0",
                "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), str(recipe), *extra], timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def unet(model_dir: Path) -> torch.nn.Module:
    import memtrain.testbed  # noqa: F401 (registers the tiny model's codec)
    from memtrain.core.bundle import load_bundle

    return load_bundle(model_dir).unet


def assert_equal_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.allclose(a[k], b[k], rtol=0, atol=atol), (k, (a[k] - b[k]).abs().max().item())


@pytest.fixture(scope="module")
def audited(tiny_setup, tmp_path_factory) -> dict[int, Path]:
    """2-process ZeRO-2 and ZeRO-3 runs of 2 steps (one per epoch), with the epoch audits and the
    closing audit (main-process crafting, sampling and held-out loss; the full audit on both ranks)."""
    tmp = tmp_path_factory.mktemp("zero3")
    audit_recipe = tmp / "tiny_audit.yaml"
    audit_recipe.write_text(json.dumps({
        "seeds": 1, "utility_prompts": 2, "reference_prompts": 2,
        "attack": {"steps": 2, "lr": 0.01, "noise_samples": 2, "init": "random"},
        "sampler": {"num_inference_steps": 2}}))
    outs = {}
    for stage in (2, 3):
        out = tmp / f"zero{stage}"
        recipe = tiny_recipe(tiny_setup, out, train=TRAIN, checkpointing={"steps": 0},
                             audit={"epoch_end": True, "closing": True, "full_recipe": str(audit_recipe)})
        launch(ds_config(tmp, stage), recipe)
        outs[stage] = out
    return outs


@pytest.mark.slow  # several processes: the slow tier
def test_zero3_saves_whole_weights_equal_to_zero2(tiny_setup, audited):
    from memtrain.train.checkpoints import param_checksum

    z2, z3 = audited[2], audited[3]
    a, b = checksum(z3, 0), checksum(z3, 1)
    assert a["zero_stage"] == 3 and a["world_size"] == 2
    assert a["sha256"] == b["sha256"] and a["sum"] == b["sum"]
    tuned = unet(z3 / "model")
    assert param_checksum(tuned)["sha256"] == a["sha256"]  # the ranks' checksums are of the saved weights
    tuned, base = tuned.state_dict(), unet(tiny_setup / "model").state_dict()
    assert_equal_weights(tuned, unet(z2 / "model").state_dict())
    moved = max((tuned[k] - base[k]).abs().max().item() for k in base)
    assert moved > 1e-3, "the ZeRO-3 run did not change the U-Net"
    # the main-process audits read the trained weights: the held-out loss after training is ZeRO-2's
    r2, r3 = (json.loads((out / "audit" / "report.json").read_text()) for out in (z2, z3))
    after2, after3 = r2["utility"]["heldout_loss_after"], r3["utility"]["heldout_loss_after"]
    assert after3 == pytest.approx(after2, rel=1e-4) and after3 != r3["utility"]["heldout_loss_before"]
    assert (z3 / "audit" / "epochs" / "epoch2.json").is_file()
    assert {"mr_prompt", "mr_attack", "mr_control"} <= set(r3)


@pytest.mark.slow  # several processes: the slow tier
def test_zero3_resume_continues_the_partitioned_run(tiny_setup, audited, tmp_path):
    """Checkpoint after step 1, resume to step 2: the whole copy is refilled from the loaded shards."""
    out = tmp_path / "resumed"
    config = ds_config(tmp_path, 3)
    recipe = tiny_recipe(tiny_setup, out, train=TRAIN, checkpointing={"steps": 1})
    launch(config, recipe, "train.max_steps=1")
    launch(config, recipe, "--resume_from_checkpoint", "latest")
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    assert checksum(out, 0)["sha256"] == checksum(out, 1)["sha256"]
    assert_equal_weights(unet(out / "model").state_dict(), unet(audited[3] / "model").state_dict())


@pytest.mark.slow  # several processes: the slow tier
def test_zero3_refuses_ema_in_one_line(tiny_setup, tmp_path):
    out = tmp_path / "ema"
    recipe = tiny_recipe(tiny_setup, out, train={**TRAIN, "ema": {"use": True}}, checkpointing={"steps": 0})
    proc = launch(ds_config(tmp_path, 3), recipe, ok=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors and "ZeRO-3" in errors[0] and "accelerate_configs/deepspeed_zero2.yaml" in errors[0], proc.stderr[-2000:]
    assert not (out / "model").exists()
