"""Adversarial fine-tuning end to end on a tiny SD1.x-shaped model (CPU, seconds per run):
2-process DDP keeps ranks identical, a SIGKILLed run resumed from `latest` ends bit-identical
to an uninterrupted one, W&B offline holds losses and grids, bad inputs are one-line errors."""

from __future__ import annotations

import json
import re
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from memtrain.core.errors import MemtrainError
from memtrain.core.manifest import ManifestItem, write_manifest
from report_schema import assert_documented

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "adv_finetune.py"


def _images(folder: Path, prefix: str, n: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{prefix}_{i}.png"
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory) -> Path:
    """A tiny model folder plus memorized/utility/held_out manifests of random 16 px images."""
    import sys as _sys

    _sys.path.insert(0, str(REPO / "tests"))
    from factories import tiny_bundle

    root = tmp_path_factory.mktemp("adv_ft")
    tiny_bundle(root / "tok").save(root / "model")
    for name, n, seed in (("memorized", 2, 0), ("utility", 4, 1), ("held_out", 2, 2)):
        paths = _images(root / "images", name, n, seed)
        write_manifest(root / "manifests" / f"{name}.jsonl",
                       [ManifestItem(id=f"{name}_{i}", prompt=f"a {name} picture number {i}", image=str(p))
                        for i, p in enumerate(paths)])
    return root


def tiny_recipe(root: Path, out: Path, **sections) -> Path:
    recipe = {
        "model": str(root / "model"), "memorized_manifest": str(root / "manifests" / "memorized.jsonl"),
        "output_dir": str(out),
        "utility": {"format": "manifest", "path": str(root / "manifests" / "utility.jsonl")},
        "train": {"epochs": 2, "updates_per_embedding": 3, "surrogate_batch_size": 2, "learning_rate": 1e-3,
                  "max_steps": 6},
        "attack": {"steps": 2, "noise_samples": 2, "lr": 0.01},
        # the real SSCD; random 16 px noise images all look alike to it (0.6-0.7), and nothing
        # memorizes here, so the copy filter only has to keep the surrogates
        "surrogates": {"mitigation": "pad_eot", "per_prompt": 2, "sscd_drop_threshold": 0.99,
                       "sampler": {"num_inference_steps": 2, "guidance_scale": 2.0}},
        "checkpointing": {"steps": 2, "total_limit": 2},
        "audit": {"epoch_end": False, "closing": False, "seeds": 1, "max_items": 2, "kid": False,
                  "sampler": {"num_inference_steps": 2}},
        "debug_rank_checksums": True,
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(section, {}).update(values)
        else:
            recipe[section] = values
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def env(**extra) -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
         "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    e.pop("WORLD_SIZE", None)
    e.pop("ACCELERATE_USE_CPU", None)  # it makes accelerate drop DeepSpeed silently: tests that want it pass it
    e.update(extra)
    return e


def run(args: list[str], timeout: int = 300, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)


def single(recipe: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run([sys.executable, str(SCRIPT), str(recipe), *extra], timeout=timeout)


def checksum(out: Path, rank: int = 0) -> dict:
    return json.loads((out / "debug" / f"rank{rank}_checksum.json").read_text())


@pytest.mark.slow  # several processes: the slow tier
def test_ddp_two_processes_on_cpu_keep_ranks_identical(tiny_setup, tmp_path):
    out = tmp_path / "ddp"
    recipe = tiny_recipe(tiny_setup, out, train={"max_steps": 3}, checkpointing={"steps": 0})
    proc = run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
                str(SCRIPT), str(recipe)], timeout=420, ACCELERATE_USE_CPU="true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = checksum(out, 0), checksum(out, 1)
    assert a["world_size"] == b["world_size"] == 2 and a["distributed_type"] == "DistributedType.MULTI_CPU"
    assert a["sha256"] == b["sha256"] and a["sum"] == b["sum"]
    assert (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.slow  # several processes: the slow tier
def test_deepspeed_zero2_two_processes_on_cpu_keep_ranks_identical(tiny_setup, tmp_path):
    """ZeRO-2 over gloo (the trainer passes InitProcessGroupKwargs(backend="gloo") on CPU)."""
    out = tmp_path / "zero2"
    recipe = tiny_recipe(tiny_setup, out, train={"max_steps": 3}, checkpointing={"steps": 0})
    proc = run([sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed",
                "--deepspeed_config_file", str(REPO / "accelerate_configs" / "ds_zero2.json"),
                "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
                str(SCRIPT), str(recipe)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = checksum(out, 0), checksum(out, 1)
    assert a["world_size"] == b["world_size"] == 2
    assert a["distributed_type"] == "DistributedType.DEEPSPEED" and a["zero_stage"] == 2
    assert a["sha256"] == b["sha256"] and a["sum"] == b["sum"]
    from memtrain.core.bundle import load_bundle
    from memtrain.train.checkpoints import param_checksum

    before = param_checksum(load_bundle(tiny_setup / "model").unet)
    assert a["sha256"] != before["sha256"], "ZeRO-2 run did not change the U-Net"


def zero2(recipe: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """2-process DeepSpeed ZeRO-2 on the CPU (gloo; ACCELERATE_USE_CPU unset, or accelerate drops DeepSpeed)."""
    return run([sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed",
                "--deepspeed_config_file", str(REPO / "accelerate_configs" / "ds_zero2.json"),
                "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
                str(SCRIPT), str(recipe), *extra], timeout=timeout)


@pytest.mark.slow  # several processes: the slow tier
def test_deepspeed_zero2_bf16_trains_and_resumes(tiny_setup, tmp_path):
    """ZeRO-2 with train.mixed_precision=bf16 (DeepSpeed casts the U-Net, accelerate adds
    no autocast: the trainer casts the inputs) trains 2 steps, then resumes from checkpoint-2 to 4."""
    out = tmp_path / "zero2_bf16"
    recipe = tiny_recipe(tiny_setup, out, train={"max_steps": 2, "mixed_precision": "bf16"},
                         checkpointing={"steps": 2})
    first = zero2(recipe)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    resumed = zero2(recipe, "train.max_steps=4", "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "checkpoint-2" in resumed.stderr
    a, b = checksum(out, 0), checksum(out, 1)
    assert a["world_size"] == b["world_size"] == 2
    assert a["distributed_type"] == "DistributedType.DEEPSPEED" and a["zero_stage"] == 2
    assert a["sha256"] == b["sha256"]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["global_step"] == 4 and summary["world_size"] == 2
    assert (summary["mixed_precision"], summary["unet_dtype"]) == ("bf16", "bf16")
    assert (out / "checkpoints" / "checkpoint-4").is_dir()
    from memtrain.core.bundle import load_bundle
    from memtrain.train.checkpoints import param_checksum

    tuned = load_bundle(out / "model")
    assert param_checksum(tuned.unet)["sha256"] != param_checksum(load_bundle(tiny_setup / "model").unet)["sha256"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_setup, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "full"
    proc = single(tiny_recipe(tiny_setup, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_checkpoints_are_complete_and_limited(uninterrupted):
    names = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert names == ["checkpoint-4", "checkpoint-6"]  # total_limit 2, no temp folders left
    state = json.loads((uninterrupted / "checkpoints" / "checkpoint-4" / "memtrain_state.json").read_text())
    assert (state["epoch"], state["group"], state["update"]) == (0, 1, 1)  # mid-image: y_adv saved
    assert (uninterrupted / "checkpoints" / "checkpoint-4" / "adv_rank0.pt").is_file()


@pytest.mark.slow  # several processes: the slow tier
def test_sigkill_then_resume_latest_is_bit_identical(tiny_setup, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    recipe = tiny_recipe(tiny_setup, out)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(recipe)], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "checkpoints" / "checkpoint-2" / "memtrain_state.json"
    deadline = time.time() + 300
    while not first.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "model").exists()
    resumed = single(recipe, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert checksum(out)["sha256"] == checksum(uninterrupted)["sha256"]
    unet = Path("model/unet/diffusion_pytorch_model.safetensors")
    assert (out / unet).read_bytes() == (uninterrupted / unet).read_bytes()


@pytest.mark.parametrize("harm", ["truncate", "flip", "delete"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(uninterrupted, tmp_path, harm, caplog):
    """A checkpoint whose files no longer match the digests saved in it is named and skipped."""
    from memtrain.train.checkpoints import resolve_resume

    root = tmp_path / "checkpoints"
    shutil.copytree(uninterrupted / "checkpoints", root)
    assert resolve_resume("latest", root).name == "checkpoint-6"
    newest = max((p for p in (root / "checkpoint-6").rglob("*") if p.is_file() and p.suffix != ".json"),
                 key=lambda p: p.stat().st_size)
    data = newest.read_bytes()
    if harm == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif harm == "flip":
        newest.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        newest.unlink()
    with caplog.at_level("WARNING"):
        assert resolve_resume("latest", root).name == "checkpoint-4"
    assert "checkpoint-6 is damaged" in caplog.text and newest.name in caplog.text
    with pytest.raises(MemtrainError, match="checkpoint-6 is damaged"):
        resolve_resume(str(root / "checkpoint-6"), root)


def test_resume_with_changed_recipe_names_the_key(tiny_setup, uninterrupted, tmp_path):
    recipe = tiny_recipe(tiny_setup, uninterrupted, train={"learning_rate": 5e-4})
    proc = single(recipe, "--resume_from_checkpoint", "latest")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot resume") and "train.learning_rate" in last


def test_a_taken_output_dir_needs_resume_or_overwrite(tiny_setup, tmp_path):
    """A second run into a finished run's folder is refused in one line and changes nothing;
    with --overwrite it replaces the run once the new one completes (no set-aside copy left)."""
    out = tmp_path / "run"
    first = single(tiny_recipe(tiny_setup, out))
    assert first.returncode == 0, first.stderr[-2000:]
    before = checksum(out)
    again = single(tiny_recipe(tiny_setup, out, train={"learning_rate": 1e-2}))
    last = again.stderr.strip().splitlines()[-1]
    assert again.returncode == 2 and last.startswith("error:") and "--resume" in last and "--overwrite" in last
    assert checksum(out) == before
    replaced = single(tiny_recipe(tiny_setup, out, train={"learning_rate": 1e-2}), "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert checksum(out) != before and sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.yaml"]


def test_resume_from_missing_path_is_an_error(tiny_setup, tmp_path):
    proc = single(tiny_recipe(tiny_setup, tmp_path / "x"), "--resume_from_checkpoint", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "not a memtrain checkpoint" in proc.stderr


def test_wandb_offline_holds_losses_and_grids(tiny_setup, tmp_path):
    out = tmp_path / "wb"
    audit_recipe = tmp_path / "tiny_audit.yaml"  # the closing full audit, kept tiny
    audit_recipe.write_text(yaml.safe_dump({
        "seeds": 1, "utility_prompts": 2, "reference_prompts": 2,
        "attack": {"steps": 2, "lr": 0.01, "noise_samples": 2, "init": "random"},
        "sampler": {"num_inference_steps": 2}}))
    recipe = tiny_recipe(tiny_setup, out, report_to="wandb", train={"epochs": 1, "max_steps": None},
                         audit={"epoch_end": True, "closing": True, "full_recipe": str(audit_recipe)},
                         checkpointing={"steps": 0})
    proc = single(recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    data = b"".join(p.read_bytes() for p in runs[0].glob("run-*.wandb"))
    for key in (b"loss/adv", b"loss/dm", b"loss/attack", b"throughput/samples_per_s", b"audit/attack/mr"):
        assert key in data, key
    assert list((runs[0] / "files" / "media" / "images").rglob("*.png"))
    report = json.loads((out / "audit" / "report.json").read_text())
    assert set(report["utility"]) == {"heldout_loss_before", "heldout_loss_after", "heldout_loss_ratio",
                                      "kid_before", "kid_after"}
    # the full closing audit: prompts, attack and the held-out control through memtrain.eval.audit
    assert {"mr_prompt", "mr_attack", "mr_control"} <= set(report)
    full = json.loads((out / "audit" / "full" / "report.json").read_text())
    assert full["results"][0]["mr_attack"] == report["mr_attack"]
    assert_documented("audit/report.json (scripts/adv_finetune.py)", report)  # docs/reports.md
    assert_documented("report.json (scripts/audit.py)", full)
    assert isinstance(report["utility"]["heldout_loss_after"], float)
    assert report["utility"]["kid_after"]["status"] == "not computed"


def test_no_usable_surrogates_is_one_line(tiny_setup, tmp_path):
    recipe = tiny_recipe(tiny_setup, tmp_path / "nosur", surrogates={"sscd_drop_threshold": -2.0})
    proc = single(recipe)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no usable surrogates")


def test_bad_recipe_key_is_one_line(tiny_setup, tmp_path):
    proc = single(tiny_recipe(tiny_setup, tmp_path / "bad"), "train.epoch=1")
    assert proc.returncode == 2 and "unknown recipe key 'train.epoch'" in proc.stderr


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_setup, tmp_path, monkeypatch):
    import torch
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from memtrain.core.errors import MemtrainError
    from memtrain.train.recipe import load_recipe
    from memtrain.train.trainer import AdvFinetuner

    out = tmp_path / "nan"
    recipe = load_recipe(tiny_recipe(tiny_setup, out))
    calls = {"n": 0}
    original = AdvFinetuner.losses

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        adv, dm = original(self, *args, **kwargs)
        return (adv * float("nan"), dm) if calls["n"] == 3 else (adv, dm)

    monkeypatch.setattr(AdvFinetuner, "losses", poisoned)
    try:
        with pytest.raises(MemtrainError, match=r"non-finite training loss .* at optimizer step 3.*checkpoint-2"):
            AdvFinetuner(recipe).train()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert not (out / "model").exists()
    torch.set_num_threads(1)


def test_disk_full_while_saving_keeps_latest_intact(tiny_setup, tmp_path, monkeypatch):
    """ENOSPC in the middle of the second checkpoint: the partial folder goes, checkpoint-2 stays
    `latest`, and the error says so in one line."""
    import errno

    import accelerate
    import torch
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from memtrain.core.errors import MemtrainError
    from memtrain.train.recipe import load_recipe
    from memtrain.train.trainer import AdvFinetuner, checkpoint_dirs, resolve_resume

    out = tmp_path / "full_disk"
    recipe = load_recipe(tiny_recipe(tiny_setup, out))
    original = accelerate.Accelerator.save_state
    calls = {"n": 0}

    def filling_disk(self, output_dir=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # write part of a file, then the disk is full
            (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 1024)
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", filling_disk)
    try:
        with pytest.raises(MemtrainError) as err:
            AdvFinetuner(recipe).train()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
        torch.set_num_threads(1)
    message = str(err.value)
    assert "\n" not in message
    assert "saving checkpoint-4 failed (No space left on device)" in message
    assert "'latest' is still checkpoint-2" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert resolve_resume("latest", out / "checkpoints") == checkpoint_dirs(out / "checkpoints")[-1]
    assert not (out / "model").exists()


def test_lora_run_saves_loadable_weights_that_change_only_lora_targets(tiny_setup, tmp_path):
    import torch

    from memtrain.core.bundle import LORA_WEIGHTS, fuse_lora_weights, load_bundle

    out = tmp_path / "lora"
    recipe = tiny_recipe(tiny_setup, out, train={"max_steps": 3, "finetune": "lora"}, checkpointing={"steps": 0})
    proc = single(recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "model").iterdir()) == [LORA_WEIGHTS]
    base = load_bundle(tiny_setup / "model")
    tuned = load_bundle(tiny_setup / "model")
    fuse_lora_weights(tuned, out / "model")  # diffusers' load_lora_adapter, then fused
    before, after = base.unet.state_dict(), tuned.unet.state_dict()
    assert set(before) == set(after)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "the LoRA run changed nothing"
    targets = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")
    assert all(k.endswith(targets) for k in changed), [k for k in changed if not k.endswith(targets)]


def test_fusing_missing_lora_weights_is_one_line(tiny_setup, tmp_path):
    from memtrain.core.errors import MemtrainError
    from memtrain.core.bundle import fuse_lora_weights, load_bundle

    with pytest.raises(MemtrainError, match="LoRA weights .* not found"):
        fuse_lora_weights(load_bundle(tiny_setup / "model"), tmp_path)


@pytest.mark.parametrize("case", ["missing_utility", "memorized_without_images", "wrong_type"])
def test_bad_data_is_one_line_and_writes_no_model(tiny_setup, tmp_path, case):
    out = tmp_path / case
    if case == "missing_utility":
        recipe, extra, expect = tiny_recipe(tiny_setup, out, utility={"path": str(tmp_path / "nowhere.jsonl")}), (), "nowhere.jsonl"
    elif case == "memorized_without_images":
        manifest = tmp_path / "no_images.jsonl"
        write_manifest(manifest, [ManifestItem(id="m0", prompt="a picture", image=str(tmp_path / "gone.png"))])
        recipe, extra, expect = tiny_recipe(tiny_setup, out, memorized_manifest=str(manifest)), (), "gone.png"
    else:
        recipe, extra, expect = tiny_recipe(tiny_setup, out), ("train.epochs=two",), "train.epochs"
    proc = single(recipe, *extra)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expect in last
    assert not (out / "model").exists()


def test_bench_finetune_prints_the_ratio(tiny_setup, tmp_path):
    recipe = tiny_recipe(tiny_setup, tmp_path / "bench")
    proc = run([sys.executable, str(REPO / "scripts" / "bench_finetune.py"), str(recipe), "--steps", "1",
                "--warmup", "0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"concatenated / separate: \d+\.\d\dx", proc.stdout)
    # today's trainer against the sped-up one, checkpointing on for both (the tiny recipe has it off)
    assert "train.gradient_checkpointing=true for both runs" in proc.stdout
    assert re.search(r"speedups off: +\d+\.\d s\n  speedups on: +\d+\.\d s\nspeedup \d+\.\d\dx", proc.stdout)


def test_craft_runs_the_attack_without_gradient_checkpointing(tiny_setup, tmp_path, fresh_accelerate):
    """With train.gradient_checkpointing, `craft` turns it off for the attack (grads w.r.t. the
    embedding only) and back on after; y_adv equals the one crafted with it on (speedups=False),
    which recomputes every checkpointed block's forward."""
    import torch

    from memtrain.train.recipe import load_recipe
    from memtrain.train.trainer import AdvFinetuner

    recipe = load_recipe(tiny_recipe(tiny_setup, tmp_path / "ckpt", train={"gradient_checkpointing": True},
                                     attack={"steps": 3}))
    trainer = AdvFinetuner(recipe)
    assert trainer.speedups
    trainer.setup()
    trainer.prepare_model()
    unet = trainer.bundle.unet
    assert unet.is_gradient_checkpointing
    seen, block_calls = [], []
    unet.register_forward_pre_hook(lambda m, args: seen.append(m.is_gradient_checkpointing))
    unet.up_blocks[-1].resnets[0].register_forward_pre_hook(lambda m, args: block_calls.append(1))
    runs = {}
    for speedups in (True, False):
        trainer.speedups = speedups
        seen.clear(), block_calls.clear()
        runs[speedups] = trainer.craft(0, 0)
        assert seen and set(seen) == {not speedups}
        assert unet.is_gradient_checkpointing and unet.training  # restored for the training steps
        runs[speedups] += (len(block_calls) / len(seen),)
    # checkpointing on: a block after the first cross-attention (its input depends on y) runs twice
    assert runs[True][2] == 1 and runs[False][2] == 2
    assert torch.equal(runs[True][0], runs[False][0]) and runs[True][1] == runs[False][1]


def test_half_precision_on_the_cpu_is_honoured(tiny_setup, tmp_path, fresh_accelerate):
    """An explicit bf16 is honoured on the CPU too: accelerate's bf16 autocast for the
    trained U-Net (fp32 master weights), recipe `dtype` for the frozen text tower and VAE."""
    import torch

    from memtrain.train.recipe import load_recipe
    from memtrain.train.trainer import AdvFinetuner

    recipe = load_recipe(str(tiny_recipe(tiny_setup, tmp_path / "half")), ["train.mixed_precision=bf16",
                                                                          "dtype=bf16", "report_to=none"])
    trainer = AdvFinetuner(recipe)
    trainer.setup()
    assert trainer.acc.mixed_precision == "bf16" and trainer.acc.native_amp
    assert trainer.runtime.dtype == trainer.frozen_dtype == torch.bfloat16
    assert {p.dtype for p in trainer.bundle.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.bundle.unet.parameters()} == {torch.float32}  # master weights


def test_fp16_on_the_cpu_is_one_line_naming_bf16(tiny_setup, tmp_path):
    """accelerate runs no fp16 autocast on the CPU: fp16 there would silently train fp32."""
    proc = single(tiny_recipe(tiny_setup, tmp_path / "fp16"), "train.mixed_precision=fp16")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: mixed_precision fp16") and "bf16" in last


def test_bf16_single_process_trains_and_saves_a_loadable_model(tiny_setup, tmp_path, fresh_accelerate):
    """train.mixed_precision=bf16 under plain accelerate on the CPU, frozen parts in bf16: finite
    losses, the U-Net changes, the saved model loads (frozen parts saved as they came)."""
    import math

    import torch

    from memtrain.core.bundle import load_bundle
    from memtrain.train.checkpoints import param_checksum
    from memtrain.train.recipe import load_recipe
    from memtrain.train.trainer import AdvFinetuner

    out = tmp_path / "bf16"
    recipe = load_recipe(tiny_recipe(tiny_setup, out, train={"max_steps": 3, "mixed_precision": "bf16"},
                                     dtype="bf16", checkpointing={"steps": 0}))
    trainer = AdvFinetuner(recipe)
    seen = []
    original = trainer.losses

    def recording(*args, **kwargs):
        adv, dm = original(*args, **kwargs)
        seen.append((adv.item(), dm.item()))
        return adv, dm

    trainer.losses = recording
    model_dir = trainer.train()
    assert len(seen) == 3 and all(math.isfinite(v) for pair in seen for v in pair), seen
    summary = json.loads((out / "run_summary.json").read_text())
    assert_documented("run_summary.json (scripts/adv_finetune.py)", summary)  # docs/reports.md
    assert (summary["mixed_precision"], summary["unet_dtype"], summary["frozen_dtype"]) == ("bf16", "fp32", "bf16")
    assert summary["runtime"]["dtype"] == "bf16" and summary["runtime"]["batch_sizes"]["finetune"] == 4
    assert summary["runtime"]["batch_sizes"]["vae_encode"] >= 1
    tuned, base = load_bundle(model_dir), load_bundle(tiny_setup / "model")
    assert all(torch.isfinite(p).all() for p in tuned.unet.parameters())
    assert param_checksum(tuned.unet)["sha256"] != param_checksum(base.unet)["sha256"]
    for name in ("text_encoder", "vae"):  # untouched and not round-tripped through bf16
        a, b = getattr(tuned, name).state_dict(), getattr(base, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), name


def test_heldout_loss_runs_in_planned_chunks(tiny_setup, tmp_path, fresh_accelerate):
    """With a small max_memory the held-out loss never puts more U-Net rows through one call than
    the plan allows, and gives the value of one unchunked call."""
    import torch

    from memtrain.core.bundle import load_bundle
    from memtrain.core.memory import USABLE_FRACTION, module_bytes, row_costs
    from memtrain.train import checks
    from memtrain.train.recipe import load_recipe
    from memtrain.train.trainer import AdvFinetuner

    b = load_bundle(tiny_setup / "model")  # a budget that fits the weights and 3 held-out rows
    weights = sum(module_bytes(m, torch.float32) for m in (b.unet, b.text_encoder, b.vae))
    one_row = row_costs(b, torch.float32, {"unet_loss": 1})["unet_loss"]
    budget = (weights + 3.5 * one_row) / USABLE_FRACTION
    recipe = load_recipe(tiny_recipe(tiny_setup, tmp_path / "chunks", audit={"heldout_noise_samples": 4},
                                     max_memory=f"{budget / 1e6:.6f}MB"))
    trainer = AdvFinetuner(recipe)
    trainer.setup()
    rows = 2 * 4  # 2 held-out items x 4 noise samples
    planned = trainer.planned_batch("unet_loss", rows)
    assert planned == 3
    calls = []
    original = trainer.bundle.unet.forward

    def counting(sample, *args, **kwargs):
        calls.append(len(sample))
        return original(sample, *args, **kwargs)

    trainer.bundle.unet.forward = counting
    chunked = checks.heldout_loss(trainer.check_context())
    assert max(calls) <= planned and sum(calls) == rows and len(calls) == 3, calls
    assert trainer.runtime.batch_sizes["unet_loss"] <= planned
    trainer.runtime.budget_bytes = 10**12  # every row in one call
    calls.clear()
    assert checks.heldout_loss(trainer.check_context()) == pytest.approx(chunked, rel=1e-5) and calls == [rows]
