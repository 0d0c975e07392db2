"""Classifier-free-guided sampling on diffusers schedulers, from prompts or embeddings.

Per-(input, seed) initial noise comes from its own generator, so an image depends only on its
input and seed, never on batch composition or process count. A per-step hook sees
(step, t, x_t, eps_cond, eps_uncond) and may return a new guidance scale for that step:
papers 002 and 003 switch or invert guidance this way.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from memtrain.core.progress import note as progress_note
from memtrain.core.cli import option
from memtrain.core.errors import MemtrainError
from memtrain.core.runtime import is_out_of_memory, release_cached_memory
from memtrain.core.text import TextEmbedding, encode_prompts

log = logging.getLogger(__name__)

# hook(step_index, t, x_t, eps_cond, eps_uncond) -> None (keep) | float | tensor (B,) guidance
GuidanceHook = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], object]


SAMPLER_FILE = "memtrain.json"  # optional, beside model_index.json: the model's default sampler


@dataclass
class SamplerSettings:
    """How images are generated: the papers' default (DDIM, 50 steps, guidance 7.5) unless the
    model folder's memtrain.json says otherwise. The one sampler vocabulary of every command."""

    scheduler: str = "ddim"
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    batch_size: int = 16

    @classmethod
    def for_model(cls, model_dir: str | Path | None) -> "SamplerSettings":
        """The defaults a model folder declares in memtrain.json, else the papers'."""
        path = Path(model_dir) / SAMPLER_FILE if model_dir else None
        if path is not None and path.is_file():
            return cls(**json.loads(path.read_text()).get("sampler", {}))
        return cls()

    def with_overrides(self, overrides: "SamplerOverrides | None") -> "SamplerSettings":
        """These settings with every non-None field of `overrides` in place of its own."""
        if overrides is None:
            return self
        return dataclasses.replace(self, **{k: v for k, v in asdict(overrides).items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SamplerOverrides:
    """A recipe's or command line's changes to a model's sampler; None keeps the model's own."""

    scheduler: str | None = option(None, "override the model's scheduler (ddim, ddpm, dpm, pndm)")
    num_inference_steps: int | None = option(None, "override the model's number of sampling steps", "--steps")
    guidance_scale: float | None = option(None, "override the model's guidance scale")
    batch_size: int | None = option(None, "images per sampling batch")

    def __post_init__(self) -> None:
        for key in ("num_inference_steps", "batch_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise MemtrainError(f"sampler {key} must be >= 1, got {value}")


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """Seeds as ints; an empty list is a one-line error."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise MemtrainError("seed list is empty: pass at least one seed (e.g. --seeds 10)")
    return seeds


@dataclass
class SampleOutput:
    """Images (and final latents, optional trajectories) of len(cond) x len(seeds) generations."""

    images: torch.Tensor  # (N, S, 3, H, W) in [0, 1], float32 on CPU
    latents: torch.Tensor  # (N, S, C, h, w) final latents
    timesteps: list[int] = field(default_factory=list)
    trajectory_xt: list[torch.Tensor] = field(default_factory=list)  # per step (N, S, C, h, w)
    trajectory_x0: list[torch.Tensor] = field(default_factory=list)


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Deterministic N(0, I) noise for one image, generated on CPU so every device agrees."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=generator)


def step_generators(seeds) -> list[torch.Generator]:
    """One CPU generator per image for the noise that stochastic schedulers (DDPM, SDE solvers)
    add at each step, so that noise, like the initial noise, depends only on the image's seed and
    not on which batch the image falls in. Offset from the initial-noise stream."""
    return [torch.Generator(device="cpu").manual_seed(int(seed) + 7_919_000_000) for seed in seeds]


def scheduler_step(scheduler, output: torch.Tensor, t, x: torch.Tensor, generators: list[torch.Generator]):
    """scheduler.step with per-image generators where the scheduler draws noise."""
    if "generator" in inspect.signature(scheduler.step).parameters:
        return scheduler.step(output, t, x, generator=generators).prev_sample
    return scheduler.step(output, t, x).prev_sample


def eps_from_output(scheduler, output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
    """The model's prediction expressed as noise, whatever its prediction_type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return output
    abar = scheduler.alphas_cumprod.to(x_t.device)[int(t)].to(x_t.dtype)
    if kind == "v_prediction":
        return abar.sqrt() * output + (1 - abar).sqrt() * x_t
    if kind == "sample":
        return (x_t - abar.sqrt() * output) / (1 - abar).sqrt()
    raise MemtrainError(f"unsupported prediction_type '{kind}'")


def _x0_from_eps(scheduler, eps: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
    abar = scheduler.alphas_cumprod.to(x_t.device)[int(t)].to(x_t.dtype)
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt().clamp_min(1e-8)


def unconditional_embedding(bundle, tokenizer=None) -> torch.Tensor:
    """The text embedding of the empty prompt "" (the unconditional CFG branch)."""
    return encode_prompts(bundle, [""], tokenizer=tokenizer).embeddings


@torch.no_grad()
def sample(
    bundle,
    cond: TextEmbedding | torch.Tensor | Sequence[str],
    seeds: Sequence[int],
    settings: SamplerSettings | None = None,
    uncond: torch.Tensor | None = None,
    hook: GuidanceHook | None = None,
    return_trajectory: bool = False,
    unet_forward: Callable | None = None,
    progress: bool = False,
) -> SampleOutput:
    """Generate len(cond) x len(seeds) images with classifier-free guidance.

    `cond` is a list of prompts, a TextEmbedding, or raw embeddings (N, L, D), e.g. an
    adversarial embedding. `settings` defaults to the papers' sampler (SamplerSettings()).
    `uncond` defaults to the embedding of "". `unet_forward` replaces the plain U-Net call
    (mitigations that act inside the forward pass use it). Errors: empty seeds, steps < 1,
    an unknown scheduler name.
    """
    settings = settings or SamplerSettings()
    guidance_scale, num_inference_steps = settings.guidance_scale, settings.num_inference_steps
    scheduler, batch_size = settings.scheduler, settings.batch_size
    seeds = check_seeds(seeds)
    if num_inference_steps < 1:
        raise MemtrainError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if isinstance(cond, (list, tuple)):
        cond = encode_prompts(bundle, list(cond))
    embeddings = cond.embeddings if isinstance(cond, TextEmbedding) else cond
    device, dtype = bundle.device, bundle.dtype
    embeddings = embeddings.to(device=device, dtype=dtype)
    if uncond is None:
        uncond = unconditional_embedding(bundle)
    uncond = uncond.to(device=device, dtype=dtype)
    forward = unet_forward or (lambda x, t, y: bundle.unet(x, t, encoder_hidden_states=y).sample)

    n_inputs, n_seeds = embeddings.shape[0], len(seeds)
    shape = (bundle.latent_channels, bundle.sample_size, bundle.sample_size)
    jobs = [(i, s) for i in range(n_inputs) for s in range(n_seeds)]
    latents_out = torch.empty(n_inputs, n_seeds, *shape)
    images_out = None
    traj_xt: list[torch.Tensor] = []
    traj_x0: list[torch.Tensor] = []
    timesteps_used: list[int] = []

    runtime = getattr(bundle, "runtime", None)

    def run_chunk(chunk: list[tuple[int, int]]):
        idx = torch.tensor([i for i, _ in chunk])
        x = torch.stack([initial_noise(seeds[s], shape) for _, s in chunk]).to(device, dtype)
        generators = step_generators([seeds[s] for _, s in chunk])
        y_cond = embeddings[idx.to(device)]
        y_uncond = uncond.expand(len(chunk), -1, -1)
        sched = bundle.make_scheduler(scheduler)
        sched.set_timesteps(num_inference_steps, device=device)
        x = x * sched.init_noise_sigma
        chunk_xt, chunk_x0 = [], []
        for step, t in enumerate(sched.timesteps):
            x_in = sched.scale_model_input(torch.cat([x, x]), t)
            out = forward(x_in, t, torch.cat([y_uncond, y_cond]))
            out_uncond, out_cond = out.chunk(2)
            eps_uncond = eps_from_output(sched, out_uncond, x, t)
            eps_cond = eps_from_output(sched, out_cond, x, t)
            scale = guidance_scale
            if hook is not None:
                new_scale = hook(step, int(t), x, eps_cond, eps_uncond)
                if new_scale is not None:
                    scale = new_scale
            scale_t = torch.as_tensor(scale, device=device, dtype=dtype).reshape(-1, 1, 1, 1)
            # Guidance is linear, so combining raw outputs equals combining their eps forms.
            guided = out_uncond + scale_t * (out_cond - out_uncond)
            if return_trajectory:
                eps = eps_uncond + scale_t * (eps_cond - eps_uncond)
                chunk_xt.append(x.float().cpu())
                chunk_x0.append(_x0_from_eps(sched, eps, x, t).float().cpu())
            x = scheduler_step(sched, guided, t, x, generators)
        images = (bundle.decode_latents(x).float().cpu() / 2 + 0.5).clamp(0, 1)
        return [int(t) for t in sched.timesteps], x.float().cpu(), images, chunk_xt, chunk_x0

    # Images depend only on their input and seed, so a chunk that runs out of memory is split
    # in two (once per run) and the halves give the same images.
    pending = [jobs[s : s + batch_size] for s in range(0, len(jobs), batch_size)]
    halved, sampled = False, 0
    bar = tqdm(total=len(jobs), disable=not progress, desc="sampling")
    while pending:
        chunk = pending.pop(0)
        try:
            used, x, images, chunk_xt, chunk_x0 = run_chunk(chunk)
        except Exception as err:
            if not is_out_of_memory(err) or halved or len(chunk) == 1:
                if is_out_of_memory(err):
                    raise MemtrainError(f"out of memory while sampling {len(chunk)} images at once: lower "
                                        "--max_memory (or the sampler's batch_size)") from None
                raise
            release_cached_memory()
            halved, half = True, len(chunk) // 2
            log.warning("out of memory while sampling %d images: retrying in batches of %d", len(chunk), half)
            if runtime is not None:
                runtime.notes.append(f"generation: out of memory, batch halved to {half}")
            pending = [c[s : s + half] for c in [chunk] + pending for s in range(0, len(c), half)]
            continue
        if runtime is not None:
            runtime.record("generation", len(chunk))
        bar.update(len(chunk))
        sampled += len(chunk)
        progress_note(f"sampled {sampled}/{len(jobs)} images")
        if not timesteps_used:
            timesteps_used = used
        if images_out is None:
            images_out = torch.empty(n_inputs, n_seeds, *images.shape[1:])
        for k, (i, s) in enumerate(chunk):
            latents_out[i, s] = x[k]
            images_out[i, s] = images[k]
        if return_trajectory:
            for step in range(len(chunk_xt)):
                if len(traj_xt) <= step:
                    traj_xt.append(torch.empty(n_inputs, n_seeds, *shape))
                    traj_x0.append(torch.empty(n_inputs, n_seeds, *shape))
                for k, (i, s) in enumerate(chunk):
                    traj_xt[step][i, s] = chunk_xt[step][k]
                    traj_x0[step][i, s] = chunk_x0[step][k]
    bar.close()
    return SampleOutput(images_out, latents_out, timesteps_used, traj_xt, traj_x0)
