"""Speed and memory at full size, measured in one run on one model and one set of settings:

- generation: memtrain's sampler (prompts x seeds in batches) against diffusers'
  StableDiffusionPipeline called per prompt with the same weights, scheduler, steps, guidance,
  resolution and seeds (`ratio:` = pipeline seconds / memtrain seconds; > 1 means faster);
- the Dori attack: targets/s, and one step's achieved FLOP/s (torch's FlopCounterMode) against a
  large matmul on the same device (bf16 on a GPU, fp32 on the CPU);
- adversarial fine-tuning: seconds per image of full steps (forward, backward, optimizer) with
  the recipe's settings, and the process's peak memory (RSS on the CPU, CUDA max allocated on a
  GPU) once they ran.

Runs alternate and keep their best time (shared machines drift).
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from memtrain.attack import AttackConfig, attack
from memtrain.bench.attack_sampling import attack_step_cost, bench_targets, timed
from memtrain.bench.finetune import time_steps
from memtrain.core.bundle import quiet_diffusers
from memtrain.core.sampling import SamplerSettings, sample
from memtrain.train.recipe import Recipe, load_recipe
from memtrain.train.trainer import AdvFinetuner

# the fine-tuning part's recipe: the SD recipe at one surrogate per prompt, made cheaply; the
# setup's attack is cut to one step (the timed steps use a fixed embedding, the attack is timed
# on its own above): at the recipe's 50 x 8 it alone took over 15 min at 256 px on 2 cores
SMALL = ["train.epochs=1", "train.surrogate_batch_size=1", "surrogates.mitigation=pad_mask",
         "surrogates.mitigation_settings={}", "surrogates.per_prompt=1",
         "surrogates.sampler.num_inference_steps=2", "attack.steps=1", "attack.noise_samples=1", "report_to=none",
         "checkpointing.steps=0"]


def finetune_recipe(recipe: str, model: str, manifest: str, output_dir: str, overrides: list[str]) -> Recipe:
    """`recipe` on `model` and `manifest` (utility data: the manifest's held_out.jsonl) at SMALL."""
    utility = str(Path(manifest).with_name("held_out.jsonl"))
    return load_recipe(recipe, [f"model={model}", f"memorized_manifest={manifest}", "utility.format=manifest",
                                f"utility.path={utility}", f"output_dir={output_dir}", *SMALL, *overrides])


def precision_overrides(dtype: str) -> list[str]:
    """Recipe overrides that fine-tune in `dtype` (fp32/fp16/bf16): the recipe's `dtype` for the
    frozen parts, `train.mixed_precision` for the trained U-Net (fp32 master weights, its math in
    half precision; `no` for fp32). sd14.yaml's own fp16 is a GPU setting."""
    return [f"dtype={dtype}", f"train.mixed_precision={'no' if dtype == 'fp32' else dtype}"]


def reference_pipeline(bundle, settings: SamplerSettings) -> StableDiffusionPipeline:
    """diffusers' pipeline on the bundle's own modules (no copy of the weights)."""
    with quiet_diffusers():
        pipe = StableDiffusionPipeline(vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer,
                                       unet=bundle.unet, scheduler=bundle.make_scheduler(settings.scheduler),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_generation(bundle, prompts: list[str], seeds: list[int], settings: SamplerSettings, repeats: int = 2) -> dict:
    """Images/s of memtrain's sampler and of diffusers' pipeline on the same jobs."""
    pipe, side = reference_pipeline(bundle, settings), bundle.pixel_resolution

    def run_pipeline(steps: int) -> None:
        with quiet_diffusers():
            for prompt in prompts:
                pipe(prompt, height=side, width=side, num_inference_steps=steps,
                     guidance_scale=settings.guidance_scale, num_images_per_prompt=len(seeds),
                     generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt")

    ours = lambda: sample(bundle, prompts, seeds, settings)  # noqa: E731
    sample(bundle, prompts[:1], seeds[:1], dataclasses.replace(settings, num_inference_steps=1))  # warm-up
    run_pipeline(1)
    times: dict[str, list[float]] = {"memtrain": [], "pipeline": []}
    for _ in range(repeats):
        times["memtrain"].append(timed(ours, bundle.device))
        times["pipeline"].append(timed(lambda: run_pipeline(settings.num_inference_steps), bundle.device))
    n = len(prompts) * len(seeds)
    best = {k: min(v) for k, v in times.items()}
    return {"images": n, "memtrain_images_per_s": n / best["memtrain"], "pipeline_images_per_s": n / best["pipeline"],
            "ratio": best["pipeline"] / best["memtrain"], "sampler": settings.to_dict(), "resolution": side}


def reference_matmul_flops_per_s(device: torch.device, n: int = 4096, repeats: int = 5) -> tuple[float, str]:
    """A large matmul's FLOP/s on `device`: bf16 on a GPU, fp32 on the CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    seconds = statistics.median(timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n**3 / seconds, f"{n}x{n} {str(dtype).removeprefix('torch.')}"


def bench_full_attack(bundle, manifest: str | None, n_targets: int, config: AttackConfig,
                      matmul_size: int = 4096) -> dict:
    """Targets/s of the batched attack and one step's FLOP/s against the device's matmul."""
    latents, prompts, _ = bench_targets(bundle, n_targets, manifest)
    attack(bundle, latents[:1], prompts[:1], dataclasses.replace(config, steps=1))  # warm-up
    seconds = timed(lambda: attack(bundle, latents, prompts, config), bundle.device)
    flops, step_s = attack_step_cost(bundle, latents, prompts, config, repeats=1)
    matmul, matmul_kind = reference_matmul_flops_per_s(bundle.device, matmul_size)
    return {"targets": n_targets, "steps": config.steps, "noise_samples": config.noise_samples,
            "targets_per_s": n_targets / seconds, "step_tflops_per_s": flops / step_s / 1e12,
            "matmul_tflops_per_s": matmul / 1e12, "matmul": matmul_kind, "fraction_of_matmul": flops / step_s / matmul}


def peak_memory_gb(device: torch.device) -> float:
    """The process's peak memory so far: CUDA max allocated on a GPU, else peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_full_finetune(trainer: AdvFinetuner, steps: int, warmup: int = 1) -> dict:
    """Seconds per image of adversarial fine-tuning steps, and the peak memory after them."""
    trainer.setup()
    trainer.prepare_model()
    rate = time_steps(trainer, concat=True, steps=steps, warmup=warmup)
    device = trainer.acc.device
    return {"steps": steps, "seconds_per_image": 1 / rate, "peak_memory_gb": peak_memory_gb(device),
            "finetune": trainer.recipe.train.finetune, "mixed_precision": trainer.acc.mixed_precision,
            "gradient_checkpointing": trainer.recipe.train.gradient_checkpointing}


def format_full_size(model: str, device: str, gen: dict, att: dict, ft: dict | None) -> str:
    """The benchmark's lines; `ratio:` is the generation ratio."""
    s = gen["sampler"]
    lines = [
        f"model: {model} ({gen['resolution']} px), device {device}, torch threads {torch.get_num_threads()}",
        f"generation ({gen['images']} images, {s['scheduler']} {s['num_inference_steps']} steps, guidance "
        f"{s['guidance_scale']}): memtrain {gen['memtrain_images_per_s']:.3f} images/s, diffusers pipeline "
        f"{gen['pipeline_images_per_s']:.3f} images/s",
        f"attack ({att['targets']} targets x {att['steps']} steps x {att['noise_samples']} noise samples): "
        f"{att['targets_per_s']:.4f} targets/s; one step {att['step_tflops_per_s']:.3f} TFLOP/s = "
        f"{100 * att['fraction_of_matmul']:.0f}% of a {att['matmul']} matmul ({att['matmul_tflops_per_s']:.3f} TFLOP/s)",
    ]
    if ft is not None:
        lines.append(f"adversarial fine-tuning ({ft['finetune']}, {ft['steps']} steps, mixed precision "
                     f"{ft['mixed_precision']}, gradient checkpointing {ft['gradient_checkpointing']}): "
                     f"{ft['seconds_per_image']:.2f} s/image, peak memory {ft['peak_memory_gb']:.1f} GB")
    lines.append(f"ratio: {gen['ratio']:.2f}")
    return "\n".join(lines)
