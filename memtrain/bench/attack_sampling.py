"""Benchmarks measured in one run: the Dori attack batched vs one target at a time with its
achieved FLOP/s, and batched vs one-at-a-time sampling.

The FLOPs of one attack step are counted with torch's FlopCounterMode (matmuls, convolutions
and attention of the U-Net forward and backward) and divided by the step's wall time; a large
fp32 matmul on the same device and thread count gives the attainable reference.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from memtrain.attack import AttackConfig, DoriAttack, attack, attack_loop
from memtrain.core.diffusion import frozen, images_to_latents
from memtrain.core.errors import MemtrainError
from memtrain.core.manifest import load_image, read_manifest
from memtrain.core.sampling import SamplerSettings, check_seeds, sample
from memtrain.metrics import get_descriptor, inception_features, inception_placement

FALLBACK_PROMPTS = ["a photo of a cat", "a red house by the sea", "a bowl of fruit", "a mountain lake"]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call, the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call, counted by torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_flops_per_s(n: int = 2048, device: torch.device | str = "cpu", repeats: int = 5) -> float:
    """Achieved FLOP/s of an n x n fp32 matmul (2 n^3 FLOPs), median of `repeats`."""
    device = torch.device(device)
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    a @ b  # warm-up: first-call allocations and kernel selection
    seconds = statistics.median(timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n**3 / seconds


def attack_step_cost(bundle, latents: torch.Tensor, prompts: list[str], config: AttackConfig,
                     repeats: int = 3) -> tuple[int, float]:
    """(FLOPs, median seconds) of one batched attack step over all targets."""
    state = DoriAttack(bundle, latents, prompts, config)
    with frozen(bundle.unet):
        state.step()  # warm-up outside both measurements
        flops = count_flops(state.step)
        seconds = statistics.median(timed(state.step, bundle.device) for _ in range(repeats))
    return flops, seconds


def bench_attack(bundle, latents: torch.Tensor, prompts: list[str], config: AttackConfig,
                 repeats: int = 1) -> dict:
    """Targets/s of `attack` vs `attack_loop` under one config, plus FLOP/s figures.

    With repeats > 1 the two runs alternate and each keeps its fastest time: on a shared
    machine the least-disturbed run is the closest to the code's own cost."""
    device = bundle.device
    attack(bundle, latents[:1], prompts[:1], dataclasses.replace(config, steps=1))  # warm-up
    batched, looped = [], []
    for _ in range(max(1, repeats)):
        batched.append(timed(lambda: attack(bundle, latents, prompts, config), device))
        looped.append(timed(lambda: attack_loop(bundle, latents, prompts, config), device))
    batched_s, loop_s = min(batched), min(looped)
    step_flops, step_s = attack_step_cost(bundle, latents, prompts, config)
    total_flops = step_flops * config.steps  # the loop does the same rows, just unbatched
    n = latents.shape[0]
    return {
        "targets": n, "steps": config.steps, "noise_samples": config.noise_samples,
        "max_batch": config.max_batch, "repeats": max(1, repeats), "threads": torch.get_num_threads(), "device": str(device),
        "batched_seconds": batched_s, "loop_seconds": loop_s,
        "batched_targets_per_s": n / batched_s, "loop_targets_per_s": n / loop_s,
        "batched_flops_per_s": total_flops / batched_s, "loop_flops_per_s": total_flops / loop_s,
        "step_flops": step_flops, "step_seconds": step_s, "step_flops_per_s": step_flops / step_s,
        "matmul_flops_per_s": matmul_flops_per_s(device=device),
        "speedup": loop_s / batched_s,
    }


def format_attack_bench(r: dict, model: str) -> str:
    """The attack benchmark's lines; the last is `speedup: X.XX`."""
    g = 1e9
    rows = [
        f"model: {model}",
        f"{r['targets']} targets x {r['steps']} steps x {r['noise_samples']} noise samples, "
        f"max_batch {r['max_batch']}, best of {r['repeats']}, device {r['device']}, torch threads {r['threads']}",
        f"{'run':<15}{'seconds':>10}{'targets/s':>12}{'GFLOP/s':>10}",
        f"{'batched':<15}{r['batched_seconds']:>10.2f}{r['batched_targets_per_s']:>12.3f}"
        f"{r['batched_flops_per_s'] / g:>10.2f}",
        f"{'one at a time':<15}{r['loop_seconds']:>10.2f}{r['loop_targets_per_s']:>12.3f}"
        f"{r['loop_flops_per_s'] / g:>10.2f}",
        f"attack step (U-Net fwd+bwd, {r['targets'] * r['noise_samples']} rows): "
        f"{r['step_flops'] / g:.3f} GFLOP in {r['step_seconds'] * 1e3:.1f} ms = "
        f"{r['step_flops_per_s'] / g:.2f} GFLOP/s",
        f"matmul 2048x2048 fp32: {r['matmul_flops_per_s'] / g:.2f} GFLOP/s; attack step reaches "
        f"{100 * r['step_flops_per_s'] / r['matmul_flops_per_s']:.1f}% of it",
        f"speedup: {r['speedup']:.2f}",
    ]
    return "\n".join(rows)


# --- resolving what to benchmark ----------------------------------------------------------------

def bench_targets(bundle, n: int, manifest: str | None = None) -> tuple[torch.Tensor, list[str], str]:
    """n (latent, prompt) targets cycling `manifest` (the model's memorized set by default);
    random latents with generic prompts when there is none (timing only)."""
    path = Path(manifest) if manifest else None
    if path is not None and not path.is_file():
        raise MemtrainError(f"manifest '{manifest}' not found")
    if path is not None:
        items = read_manifest(path, require_images=True)
        if not items:
            raise MemtrainError(f"manifest '{path}' has no items with images")
        items = [items[k % len(items)] for k in range(n)]
        latents = images_to_latents(bundle, [load_image(it) for it in items])
        return latents, [it.prompt for it in items], str(path)
    shape = (n, bundle.latent_channels, bundle.sample_size, bundle.sample_size)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    prompts = [FALLBACK_PROMPTS[k % len(FALLBACK_PROMPTS)] for k in range(n)]
    return latents, prompts, "random latents (no manifest)"


# --- sampling ------------------------------------------------------------------------------------

def bench_sampling(bundle, prompts: Sequence[str], seeds: Sequence[int], settings: SamplerSettings,
                   batch_size: int = 16) -> dict:
    """Images per second of plain CFG sampling: all (prompt, seed) jobs in batches of
    batch_size vs one prompt-seed image at a time, measured in the same run."""
    prompts, seeds = list(prompts), check_seeds(seeds)
    n_images = len(prompts) * len(seeds)
    one = dataclasses.replace(settings, batch_size=1)
    sample(bundle, prompts[:1], seeds[:1], one)  # warm-up
    batched = timed(lambda: sample(bundle, prompts, seeds, dataclasses.replace(settings, batch_size=batch_size)),
                    bundle.device)
    single = timed(lambda: [sample(bundle, [p], [s], one) for p in prompts for s in seeds], bundle.device)
    return {"images": n_images, "batch_size": batch_size, "batched_seconds": batched, "single_seconds": single,
            "batched_images_per_s": n_images / batched, "single_images_per_s": n_images / single,
            "speedup": single / batched, "sampler": settings.to_dict(), "threads": torch.get_num_threads()}


def bench_prompts(manifest: str | None, n_prompts: int, n_seeds: int, batch: int) -> list[str]:
    """n_prompts prompts cycling the manifest's (generic ones without a manifest)."""
    if n_prompts < 1 or n_seeds < 1 or batch < 1:
        raise MemtrainError("--prompts, --seeds and --batch must be >= 1")
    texts = [it.prompt for it in read_manifest(manifest)] if manifest else list(FALLBACK_PROMPTS)
    return (texts * (n_prompts // len(texts) + 1))[:n_prompts]


def format_sampling_bench(r: dict, model: str, n_prompts: int, n_seeds: int) -> str:
    """The sampling benchmark's lines; the last is `speedup: X.XX`."""
    return "\n".join([
        f"model: {model}",
        f"sampler: {r['sampler']['scheduler']} {r['sampler']['num_inference_steps']} steps, guidance "
        f"{r['sampler']['guidance_scale']}; {r['images']} images ({n_prompts} prompts x {n_seeds} seeds); "
        f"torch threads {r['threads']}",
        f"batched (batch {r['batch_size']}): {r['batched_images_per_s']:.2f} images/s ({r['batched_seconds']:.2f} s)",
        f"one at a time: {r['single_images_per_s']:.2f} images/s ({r['single_seconds']:.2f} s)",
        f"speedup: {r['speedup']:.2f}",
    ])


def bench_mitigation_overhead(bundle, prompts: Sequence[str], seeds: Sequence[int], settings: SamplerSettings,
                              mitigations: Sequence, repeats: int = 3) -> dict[str, float]:
    """Seconds of mitigated over plain sampling (text encoding included in both) per mitigation,
    medians of `repeats` interleaved runs (plain, mitigated, plain, ...), all in this one run."""
    seeds = check_seeds(seeds)

    def plain():
        sample(bundle, list(prompts), seeds, settings)

    ratios = {}
    for m in mitigations:
        def mitigated(m=m):
            sample(bundle, m.encode(bundle, list(prompts)), seeds, settings, **m.sampling_kwargs(bundle, settings))

        mitigated()  # warm-up (vocabulary caches, scheduler construction)
        pairs = [(timed(plain, bundle.device), timed(mitigated, bundle.device)) for _ in range(repeats)]
        ratios[m.name] = statistics.median(b / a for a, b in pairs)
    return ratios


def bench_metrics(device: torch.device, images: int = 32, resolution: int = 512) -> dict:
    """Images per second of the copy descriptor (SSCD) and of Inception (FID/KID) on `device`, and
    where each ran: what an audit's scoring costs beside its generation. The first call of each
    (loading the model) is left out of the timing."""
    batch = torch.rand(images, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    descriptor = get_descriptor(None, device=device)
    descriptor.embed(batch[:2])
    inception_features(batch[:2], device=device)
    sscd_s = timed(lambda: descriptor.embed(batch), device)
    inception_s = timed(lambda: inception_features(batch, device=device), device)
    return {"images": images, "resolution": resolution,
            "sscd": {"placement": descriptor.placement, "images_per_s": images / sscd_s},
            "inception": {"placement": inception_placement(device), "images_per_s": images / inception_s}}
