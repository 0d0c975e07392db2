"""The removal baselines (ESD, Concept Ablation, SISS) as trainings on a tiny SD1.x-shaped model
(CPU, seconds per run): each changes exactly the U-Net weights it claims (text encoder and VAE
untouched), a run SIGKILLed after a checkpoint resumes to the same weights as an uninterrupted one,
2-process DDP on the CPU keeps the ranks identical, and bad inputs are skipped items or one-line
errors that overwrite nothing."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from memtrain.core.errors import MemtrainError
from memtrain.core.manifest import ManifestItem, write_manifest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "remove.py"
FAST_SAMPLER = {"num_inference_steps": 2, "guidance_scale": 2.0, "scheduler": "ddim"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """A tiny model folder, two memorized pairs of random 16 px images, an anchor file, and for
    SISS two pairs whose image is the model's own generation (seed 1000) of the prompt with 4
    random tokens: among its generations exactly that one replicates (SSCD 1 > 0.99), so a split
    exists on a random model."""
    from factories import tiny_bundle

    from memtrain.core.report import to_pil
    from memtrain.core.sampling import SamplerOverrides, sample
    from memtrain.train.removal.siss import variant_prompt

    root = tmp_path_factory.mktemp("removal")
    bundle = tiny_bundle(root / "tok")
    bundle.save(root / "model")
    rng = np.random.default_rng(0)
    settings = bundle.sampler_settings.with_overrides(SamplerOverrides(**FAST_SAMPLER))
    items, siss_items = [], []
    (root / "images").mkdir()
    for i in range(2):
        prompt = f"a memorized picture number {i}"
        path = root / "images" / f"mem_{i}.png"
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
        items.append(ManifestItem(id=f"mem_{i}", prompt=prompt, image=str(path)))
        own = sample(bundle, [variant_prompt(prompt, bundle.tokenizer, 0, i, 4)], [1000], settings).images[0, 0]
        to_pil(own).save(root / "images" / f"siss_{i}.png")
        siss_items.append(ManifestItem(id=f"mem_{i}", prompt=prompt, image=str(root / "images" / f"siss_{i}.png")))
    write_manifest(root / "memorized.jsonl", items)
    write_manifest(root / "siss_memorized.jsonl", siss_items)
    (root / "anchors.json").write_text(json.dumps({"mem_0": ["a picture, number zero", "a photo numbered zero"],
                                                   "a memorized picture number 1": ["a picture of one"]}))
    return root


CASES = {
    "esd-x": {"method": "esd", "esd": {"train_method": "xattn", "ddim_steps": 3}},
    "esd-u": {"method": "esd", "esd": {"train_method": "noxattn", "ddim_steps": 3}},
    "concept_ablation": {"method": "concept_ablation",
                         "concept_ablation": {"anchor_images": 2, "sampler": FAST_SAMPLER}},
    "siss": {"method": "siss", "train": {"gradient_accumulation_steps": 2},
             "siss": {"generations": 4, "random_tokens": [4], "threshold": 0.99, "sampler": FAST_SAMPLER}},
}


def recipe_dict(root: Path, out: Path, case: str, **sections) -> dict:
    data = {"model": str(root / "model"), "memorized_manifest": str(root / "memorized.jsonl"),
            "output_dir": str(out), "descriptor": "standin", "progress": False,
            "train": {"steps": 4, "learning_rate": 1e-3, "batch": 1},
            "checkpointing": {"steps": 2, "total_limit": 2}}
    for section, values in [*CASES[case].items(), *sections.items()]:
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    if case == "concept_ablation":
        data["concept_ablation"]["anchor_file"] = str(root / "anchors.json")
    if case == "siss":
        data["memorized_manifest"] = str(root / "siss_memorized.jsonl")
    return data


def train(data: dict, *overrides: str):
    from factories import reset_accelerate

    from memtrain.train.removal import removal_recipe_from_dict, train_removal

    reset_accelerate()  # each training in a test starts a new accelerator
    return train_removal(removal_recipe_from_dict(copy.deepcopy(data), list(overrides)))  # overrides edit in place


def state(folder: Path, part: str) -> dict:
    from safetensors.torch import load_file

    files = sorted((Path(folder) / part).glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


def changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("case", list(CASES))
def test_changes_exactly_the_weights_it_claims(setup, tmp_path, case, fresh_accelerate):
    from diffusers import UNet2DConditionModel

    from memtrain.train.removal.concept_ablation import ablation_weights
    from memtrain.train.removal.esd import esd_weights

    run = train(recipe_dict(setup, tmp_path / case, case, train={"steps": 2}))
    assert run.method == CASES[case]["method"] and not run.skipped
    unet = UNet2DConditionModel.from_pretrained(setup / "model" / "unet")
    claimed = {"esd-x": lambda: esd_weights(unet, "xattn"), "esd-u": lambda: esd_weights(unet, "noxattn"),
               "concept_ablation": lambda: ablation_weights(unet, "cross-attn"),
               "siss": lambda: [n for n, _ in unet.named_parameters()]}[case]()
    if case == "esd-x":
        assert claimed and all(".attn2." in n for n in claimed)
    if case == "concept_ablation":
        assert claimed and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in claimed)
    folders = sorted(set(run.model_dirs.values()))
    assert len(folders) == (2 if case == "siss" else 1) and set(run.model_dirs) == {"mem_0", "mem_1"}
    for folder in folders:
        assert changed(state(setup / "model", "unet"), state(folder, "unet")) == set(claimed)
        for part in ("text_encoder", "vae"):
            assert not changed(state(setup / "model", part), state(folder, part)), part
        assert (Path(folder) / "model_index.json").is_file() and (Path(folder) / "scheduler").is_dir()
    summary = json.loads((tmp_path / case / "run_summary.json").read_text())
    assert summary["method"] == run.method and summary["world_size"] == 1 and run.peak_memory_gb > 0
    assert all(job["steps"] == 2 for job in summary["jobs"])


@pytest.mark.parametrize("case", ["esd-x", "concept_ablation", "siss"])
def test_killed_after_a_checkpoint_resumes_to_the_same_weights(setup, tmp_path, case, fresh_accelerate):
    """SIGKILL `memtrain remove` once its first checkpoint is complete (the run has 12 steps per
    job left to go); `--resume` then ends with the uninterrupted run's weights, bit for bit."""
    short = {"train": {"steps": 12}, "checkpointing": {"steps": 1, "total_limit": 2}}
    whole = train(recipe_dict(setup, tmp_path / "whole", case, **short))
    out = tmp_path / "killed"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(setup, out, case, **short)))
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(path)], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not list((out / "checkpoints").rglob("checkpoint-1/memtrain_state.json")) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (out / "run_summary.json").exists()
    resumed = subprocess.run([sys.executable, str(SCRIPT), str(path), "--resume"], cwd=REPO, env=env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert all(job["steps"] == 12 for job in summary["jobs"])
    assert summary["jobs"][0]["steps_this_run"] < 12  # the first job continued from a checkpoint
    assert summary["model_dirs"].keys() == whole.model_dirs.keys() == {"mem_0", "mem_1"}
    for item, folder in whole.model_dirs.items():
        a, b = state(folder, "unet"), state(summary["model_dirs"][item], "unet")
        assert not changed(a, b), f"{item}: resumed weights differ"
        assert changed(state(setup / "model", "unet"), b)


def env(**extra) -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
         "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    e.pop("WORLD_SIZE", None)
    e.pop("ACCELERATE_USE_CPU", None)  # it makes accelerate drop DeepSpeed: the DDP tests pass it
    e.update(extra)
    return e


@pytest.mark.parametrize("case", ["esd-x", "concept_ablation", "siss"])
def test_two_process_ddp_on_cpu_keeps_ranks_identical(setup, tmp_path, case):
    out = tmp_path / case
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(setup, out, case, train={"steps": 2})))
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no",
                           "--dynamo_backend", "no", str(SCRIPT), str(path)],
                          cwd=REPO, env=env(ACCELERATE_USE_CPU="true"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["distributed_type"] == "DistributedType.MULTI_CPU"
    from diffusers import UNet2DConditionModel

    from memtrain.train.checkpoints import param_checksum

    original = param_checksum(UNet2DConditionModel.from_pretrained(setup / "model" / "unet"))["sha256"]
    assert len(summary["jobs"]) == (2 if case == "siss" else 1)
    for job in summary["jobs"]:
        a, b = job["unet_sha256_per_rank"]
        assert a == b != original and job["steps"] == 2


def test_concept_ablation_without_anchors_skips_the_item_or_stops(setup, tmp_path, fresh_accelerate):
    anchors = tmp_path / "only_one.json"
    anchors.write_text(json.dumps({"mem_0": ["a picture, number zero"]}))
    data = recipe_dict(setup, tmp_path / "one", "concept_ablation", train={"steps": 1})
    data["concept_ablation"]["anchor_file"] = str(anchors)
    run = train(data)
    assert set(run.model_dirs) == {"mem_0"} and "no anchor prompt" in run.skipped["mem_1"]
    # every anchor image a replica (threshold below any SSCD): nothing to train, one line
    with pytest.raises(MemtrainError, match="every memorized item was skipped") as err:
        train(recipe_dict(setup, tmp_path / "none", "concept_ablation", concept_ablation={"image_threshold": -2.0}))
    assert "\n" not in str(err.value) and "no valid anchor" in str(err.value)
    assert not (tmp_path / "none" / "model").exists()


def test_siss_without_a_split_reports_the_counts(setup, tmp_path, fresh_accelerate):
    with pytest.raises(MemtrainError, match="every memorized item was skipped") as err:
        train(recipe_dict(setup, tmp_path / "nosplit", "siss", siss={"threshold": 2.0}))
    message = str(err.value)
    assert "\n" not in message and "4 tokens: 0 replicas / 4 non-replicas" in message
    assert not list((tmp_path / "nosplit").glob("*/model"))


def test_steps_below_one_is_one_line(setup, tmp_path):
    from memtrain.train.removal import removal_recipe_from_dict

    with pytest.raises(MemtrainError, match="'train.steps' must be") as err:
        removal_recipe_from_dict(recipe_dict(setup, tmp_path / "x", "esd-x"), ["train.steps=0"])
    assert "\n" not in str(err.value)
    with pytest.raises(MemtrainError, match="'method' must be one of esd, concept_ablation, siss"):
        removal_recipe_from_dict(recipe_dict(setup, tmp_path / "x", "esd-x"), ["method=erase"])


def test_an_existing_output_dir_is_not_overwritten(setup, tmp_path, fresh_accelerate):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("a previous run")
    with pytest.raises(MemtrainError, match="holds a previous run"):
        train(recipe_dict(setup, out, "esd-x", train={"steps": 1}))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_methods_registered_in_the_contracts_order():
    from memtrain.train.removal import REMOVAL_METHODS
    from memtrain.train.removal.recipe import METHOD_DEFAULTS, METHODS

    assert REMOVAL_METHODS.names() == list(METHODS) == list(METHOD_DEFAULTS)


def zero2(path: Path) -> subprocess.CompletedProcess:
    """2-process DeepSpeed ZeRO-2 on the CPU (gloo; ACCELERATE_USE_CPU unset, or accelerate drops DeepSpeed)."""
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed",
                           "--deepspeed_config_file", str(REPO / "accelerate_configs" / "ds_zero2.json"),
                           "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0",
                           "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), str(path)],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # DeepSpeed's start on two processes: the slow tier
@pytest.mark.parametrize("case", ["esd-x", "concept_ablation", "siss"])
def test_deepspeed_zero2_on_cpu(setup, tmp_path, case):
    """ESD and Concept Ablation train under ZeRO-2 with identical ranks; SISS, whose two gradients
    are combined by hand, is refused in one line."""
    out = tmp_path / case
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(setup, out, case, train={"steps": 2})))
    proc = zero2(path)
    if case == "siss":
        assert proc.returncode != 0 and "error: siss combines its two gradients by hand" in proc.stderr
        assert not list(out.glob("*/model"))
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["distributed_type"] == "DistributedType.DEEPSPEED"
    (job,) = summary["jobs"]
    a, b = job["unet_sha256_per_rank"]
    assert a == b and job["steps"] == 2
    assert changed(state(setup / "model", "unet"), state(out / "model", "unet"))


@pytest.mark.parametrize("case", ["esd-x", "siss"])
def test_bf16_on_the_cpu_trains_fp32_master_weights(setup, tmp_path, case, fresh_accelerate):
    """train.mixed_precision=bf16: accelerate's autocast around the trained U-Net (ESD through the
    prepared model, SISS around its own forward); the weights stay and are saved in float32."""
    run = train(recipe_dict(setup, tmp_path / case, case, train={"steps": 1, "mixed_precision": "bf16"}))
    summary = run.summary
    assert (summary["mixed_precision"], summary["unet_dtype"]) == ("bf16", "fp32")
    for folder in set(run.model_dirs.values()):
        weights = state(folder, "unet")
        assert all(v.dtype == torch.float32 for v in weights.values())
        assert changed(state(setup / "model", "unet"), weights)


def test_siss_on_a_v_prediction_model_regresses_velocities(tmp_path, fresh_accelerate):
    """The testbed predicts v: SISS regresses the velocities of the same (image, noise) pairs."""
    from factories import tiny_bundle

    from memtrain.core.report import to_pil
    from memtrain.core.sampling import SamplerOverrides, sample
    from memtrain.train.removal.siss import variant_prompt

    bundle = tiny_bundle(tmp_path / "tok", prediction_type="v_prediction")
    bundle.save(tmp_path / "model")
    prompt = "a memorized picture number 0"
    settings = bundle.sampler_settings.with_overrides(SamplerOverrides(**FAST_SAMPLER))
    own = sample(bundle, [variant_prompt(prompt, bundle.tokenizer, 0, 0, 4)], [1000], settings).images[0, 0]
    to_pil(own).save(tmp_path / "own.png")
    write_manifest(tmp_path / "one.jsonl", [ManifestItem(id="mem_0", prompt=prompt, image=str(tmp_path / "own.png"))])
    data = recipe_dict(tmp_path, tmp_path / "out", "siss", train={"steps": 1}, siss={"min_timestep": 500})
    data["memorized_manifest"] = str(tmp_path / "one.jsonl")
    run = train(data)
    assert run.summary["preparation"]["mem_0"]["tried"] == [{"tokens": 4, "replicas": 1, "non_replicas": 3}]
    assert changed(state(tmp_path / "model", "unet"), state(run.model_dirs["mem_0"], "unet"))


def test_wandb_offline_holds_each_items_losses(setup, tmp_path):
    """report_to: wandb (offline): one run under OUT/wandb with every item's SISS losses."""
    out = tmp_path / "wb"
    path = tmp_path / "wb.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(setup, out, "siss", train={"steps": 1}, report_to="wandb")))
    proc = subprocess.run([sys.executable, str(SCRIPT), str(path)], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "siss: 2 memorized item(s) trained into 2 model folder(s)" in proc.stdout
    (run,) = list((out / "wandb").glob("offline-run-*"))
    data = b"".join(p.read_bytes() for p in run.glob("run-*.wandb"))
    for key in (b"mem_0/loss/x", b"mem_1/loss/a", b"mem_1/neggrad_factor", b"step_in_job"):
        assert key in data, key


def test_concept_ablation_offline_on_surrogate_anchors(setup, tmp_path, fresh_accelerate):
    """anchors: surrogates (no paraphrases offline): memtrain's surrogates with the memorized prompt,
    the noise-based loss; the model-based loss (which needs another anchor prompt) is refused."""
    offline = {"anchors": "surrogates", "loss": "noise", "anchor_file": None,
               "surrogates": {"mitigation": "pad_eot", "per_prompt": 2, "sscd_drop_threshold": 0.99,
                              "descriptor": "standin", "sampler": FAST_SAMPLER}}
    data = recipe_dict(setup, tmp_path / "sur", "concept_ablation", train={"steps": 1}, concept_ablation=offline)
    data["concept_ablation"]["anchor_file"] = None
    run = train(data)
    assert set(run.model_dirs) == {"mem_0", "mem_1"} and not run.skipped
    assert {k: v["anchor_images"] for k, v in run.summary["preparation"].items()} == {"mem_0": 2, "mem_1": 2}
    assert len(list((tmp_path / "sur" / "anchors" / "images").glob("*.png"))) == 4
    data = recipe_dict(setup, tmp_path / "mb", "concept_ablation", train={"steps": 1},
                       concept_ablation={**offline, "loss": "model-based"})
    with pytest.raises(MemtrainError, match="model-based needs paraphrased anchor prompts"):
        train(data)
