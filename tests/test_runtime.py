"""One device / precision / memory setting for every command: the options' checks, memory plans
measured on the meta device (SD v1.4 at 512 px against 80 and 24 GB cards), batches that never
exceed the plan (rows counted per model call), out-of-memory halving, and loads that say where
and in what precision they put the model."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights

from factories import tiny_bundle
from memtrain.attack import AttackConfig, DoriAttack
from memtrain.core.bundle import ModelBundle, load_bundle
from memtrain.core.errors import MemtrainError
from memtrain.core.memory import USABLE_FRACTION, module_bytes, plan_for_run, plan_memory, row_costs
from memtrain.core.runtime import RuntimeOptions, resolve_dtype, resolve_runtime, run_in_chunks
from memtrain.core.sampling import SamplerSettings, sample
from memtrain.eval.audit import load_audit_recipe
from memtrain.testbed.full_size import sd_modules

REPO = Path(__file__).resolve().parents[1]
GB = 1e9


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "fp17"}, "--dtype 'fp17' is not a precision"),
    ({"device": "tpu"}, "--device 'tpu' is not a device"),
    ({"max_memory": "lots"}, "--max_memory 'lots' is not a memory size"),
    ({"max_memory": "0GB"}, "--max_memory '0GB' is not a memory size"),
])
def test_bad_options_are_one_line_errors(kwargs, message):
    with pytest.raises(MemtrainError, match=message) as err:
        RuntimeOptions(**kwargs)
    assert "\n" not in str(err.value)


def test_cpu_defaults_to_fp32_and_honours_an_explicit_half_precision():
    assert resolve_runtime(RuntimeOptions(device="cpu")).dtype == torch.float32
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        runtime = resolve_runtime(RuntimeOptions(device="cpu", dtype=name, max_memory="3GB"))
        assert runtime.dtype == dtype and runtime.budget_bytes == 3 * 10**9
        assert runtime.to_dict()["dtype"] == name and runtime.to_dict()["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_that_is_not_there_is_refused_unless_only_planning():
    with pytest.raises(MemtrainError, match="no CUDA device is visible"):
        resolve_runtime(RuntimeOptions(device="cuda"))
    planned = resolve_runtime(RuntimeOptions(device="cuda", plan=True, max_memory="80GB"))
    assert planned.device.type == "cuda" and planned.dtype == torch.float16
    with pytest.raises(MemtrainError, match="needs --max_memory"):
        resolve_runtime(RuntimeOptions(device="cuda", plan=True))


def test_bf16_on_a_cuda_device_without_it_names_fp16(monkeypatch):
    """A pre-Ampere card (V100, T4): bf16 is refused in one line, auto picks fp16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(MemtrainError, match="Tesla V100 has no bf16 support; use --dtype fp16"):
        resolve_dtype("bf16", torch.device("cuda", 0))
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.float16


# ----------------------------------------------------------------------------- plans


@pytest.fixture(scope="module")
def sd14_meta() -> ModelBundle:
    """SD v1.4's U-Net, text tower and VAE at 512 px on the meta device (shapes, no memory)."""
    with init_empty_weights():
        unet, text, vae = sd_modules("sd14", resolution=512)
    return ModelBundle(unet.to("meta"), text.to("meta"), None, vae.to("meta"), None)


def _audit_stages(batch_size: int = 16) -> dict[str, int]:
    recipe = load_audit_recipe(REPO / "recipes" / "audit_sd14.yaml")
    return {"generation": batch_size, "vae_decode": batch_size, "vae_encode": recipe.chunk_targets,
            "attack": recipe.attack.max_batch}


def test_sd14_audit_plan_fits_80gb_as_recipe_asks_and_24gb_with_smaller_attack_chunks(sd14_meta):
    stages = _audit_stages()
    big = plan_memory(sd14_meta, torch.float16, int(80 * GB), stages)
    assert big.batch("attack") == stages["attack"] == 64  # the recipe's chunk fits an 80 GB card in fp16
    assert big.peak_gb <= 80 * USABLE_FRACTION
    small = plan_memory(sd14_meta, torch.float16, int(24 * GB), stages)
    assert 1 <= small.batch("attack") < 64 and small.peak_gb <= 24 * USABLE_FRACTION
    # the attack's rows dominate: one row with gradients costs more than one without (x2 for guidance)
    costs = row_costs(sd14_meta, torch.float16, {"attack": 1, "generation": 1})
    assert costs["attack"] > costs["generation"]
    # fp32 costs about twice fp16 per row, and weights too
    fp32 = row_costs(sd14_meta, torch.float32, {"attack": 1})["attack"]
    assert 1.6 < fp32 / costs["attack"] < 2.4
    assert module_bytes(sd14_meta.unet, torch.float16) == 2 * 859_520_964


def test_budget_too_small_for_one_row_names_the_smallest_that_fits(sd14_meta):
    with pytest.raises(MemtrainError, match=r"too small for one row .* smallest budget that fits is "
                                            r"--max_memory [0-9.]+GB, or use --dtype fp16/bf16") as err:
        plan_memory(sd14_meta, torch.float32, int(4 * GB), _audit_stages())
    needed = float(str(err.value).split("--max_memory ")[-1].split("GB")[0])
    plan_memory(sd14_meta, torch.float32, int(needed * GB), _audit_stages())  # that budget does fit


@pytest.fixture(scope="module")
def sd14_config_folder(tmp_path_factory) -> Path:
    """SD v1.4's configs at 512 px in diffusers layout, without weights: what --plan reads."""
    root = tmp_path_factory.mktemp("plan") / "sd14"
    with init_empty_weights():
        unet, text, vae = sd_modules("sd14", resolution=512)
    unet.save_config(root / "unet")
    vae.save_config(root / "vae")
    text.config.save_pretrained(root / "text_encoder")
    (root / "model_index.json").write_text("{}")
    return root


@pytest.mark.parametrize("budget, attack_batch", [("80GB", 64), ("24GB", None)])
def test_audit_plan_command_prints_and_writes_nothing(sd14_config_folder, tmp_path, budget, attack_batch):
    out = tmp_path / "audit"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "audit.py"), "--model", str(sd14_config_folder),
                           "--mitigation", "none", "--plan", "--dtype", "fp16", "--max_memory", budget,
                           "--output_dir", str(out)], capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
    assert {"generation", "vae_decode", "vae_encode", "attack"} <= set(lines)
    assert f"budget {float(budget[:-2]):.1f} GB" in proc.stdout and "fp16, 512 px" in proc.stdout
    peak = float(proc.stdout.split("estimated peak: ")[1].split()[0])
    assert peak <= float(budget[:-2])
    if attack_batch is not None:
        assert int(lines["attack"][1]) == attack_batch
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- batches that fit


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tok")


class RowCounter:
    """Wraps a module method and records the batch size of every call."""

    def __init__(self, module, name: str):
        self.rows: list[int] = []
        original = getattr(module, name)

        def counted(x, *args, **kwargs):
            self.rows.append(int(x.shape[0]))
            return original(x, *args, **kwargs)

        setattr(module, name, counted)


def _plan_for_rows(bundle, runtime, stage: str, wanted: int, rows: int) -> int:
    """Plan one stage with a budget that fits `rows` of its rows; returns the planned batch."""
    weights = sum(module_bytes(m, bundle.dtype) for m in (bundle.unet, bundle.text_encoder, bundle.vae))
    cost = row_costs(bundle, bundle.dtype, {stage: 1})[stage]
    runtime.budget_bytes = int((weights + (rows + 0.5) * cost) / USABLE_FRACTION)
    limits = dict(bundle.batch_limits)
    batch = plan_for_run(bundle, runtime, {stage: wanted}).batch(stage)
    bundle.batch_limits = {**limits, **bundle.batch_limits}
    return batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_model_call_exceeds_the_planned_batch(tokenizer_dir, dtype):
    bundle = tiny_bundle(tokenizer_dir).to(dtype=dtype)
    runtime = resolve_runtime(RuntimeOptions(device="cpu", dtype={torch.float32: "fp32"}.get(dtype, "bf16")))
    wanted = {"generation": 16, "vae_decode": 16, "vae_encode": 16, "attack": 64}
    plan = {stage: _plan_for_rows(bundle, runtime, stage, n, rows=3) for stage, n in wanted.items()}
    assert plan == {"generation": 3, "vae_decode": 3, "vae_encode": 3, "attack": 3}
    assert bundle.batch_limits == {"vae_decode": 3, "vae_encode": 3} and bundle.runtime is runtime
    unet_rows = RowCounter(bundle.unet, "forward")
    decode_rows = RowCounter(bundle.vae, "decode_latents")
    encode_rows = RowCounter(bundle.vae, "encode_images")

    settings = SamplerSettings(num_inference_steps=2, batch_size=plan["generation"])
    out = sample(bundle, ["a cat", "a dog", "a bird"], seeds=[0, 1, 2], settings=settings)
    assert out.images.shape[:2] == (3, 3) and torch.isfinite(out.images).all()
    assert unet_rows.rows and max(unet_rows.rows) <= 2 * plan["generation"]  # x2: guidance
    assert max(decode_rows.rows) <= plan["vae_decode"] and sum(decode_rows.rows) == 9

    latents = bundle.encode_images(torch.zeros(9, 3, 16, 16))
    assert latents.shape[0] == 9 and max(encode_rows.rows) <= plan["vae_encode"]

    unet_rows.rows.clear()
    config = AttackConfig(steps=1, noise_samples=4, max_batch=plan["attack"], init="random")
    DoriAttack(bundle, latents[:3].float(), ["a", "b", "c"], config).run()
    assert max(unet_rows.rows) <= plan["attack"] and sum(unet_rows.rows) == 12
    assert runtime.to_dict()["batch_sizes"] == {"generation": 3, "vae_decode": 3, "vae_encode": 3}


def test_out_of_memory_halves_the_chunk_once_and_says_so(tokenizer_dir, caplog):
    calls = []

    def work(start: int, stop: int) -> int:
        calls.append(stop - start)
        if stop - start > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated by a too-large chunk)")
        return stop - start

    runtime = resolve_runtime(RuntimeOptions(device="cpu"))
    with caplog.at_level(logging.WARNING):
        assert sum(run_in_chunks(10, 4, work, "vae_decode", runtime)) == 10
    assert calls[0] == 4 and max(calls[1:]) == 2
    assert "retrying with batch 2" in caplog.text and runtime.notes
    with pytest.raises(MemtrainError, match="out of memory in stage 'attack' .* lower --max_memory"):
        run_in_chunks(10, 8, lambda a, b: work(a, b) if b - a > 4 else work(a, a + 3), "attack")

    # sampling: a chunk that does not fit is split in two and gives the same images
    bundle = tiny_bundle(tokenizer_dir)
    settings = SamplerSettings(num_inference_steps=2, batch_size=4)
    reference = sample(bundle, ["a cat", "a dog"], seeds=[0, 1], settings=settings).images

    def small_only(x, t, y):
        if x.shape[0] > 4:  # guidance doubles the rows
            raise torch.OutOfMemoryError("simulated")
        return bundle.unet(x, t, encoder_hidden_states=y).sample

    halved = sample(bundle, ["a cat", "a dog"], seeds=[0, 1], settings=settings, unet_forward=small_only).images
    assert torch.allclose(halved, reference, atol=1e-5)


def test_every_load_names_device_and_dtype(sd_shaped_dir, caplog):
    with caplog.at_level(logging.INFO, logger="memtrain.core.bundle"):
        bundle = load_bundle(sd_shaped_dir, device="cpu", dtype=torch.bfloat16)
    assert bundle.dtype == torch.bfloat16 and bundle.vae.dtype == torch.bfloat16
    assert f"loaded {sd_shaped_dir} on cpu in bf16" in caplog.text
