"""Memorization signals read off a model's noise predictions: what the mitigations act on and the
detectors score (memtrain.eval.detect). Pure functions of tensors, or of a bundle and a prompt.

- `guidance_magnitude` (paper 003 Alg. 1; Wen et al. 2024 take its square root): per image
  d_t = ||eps_cond - eps_uncond||^2; `first_local_minimum`: paper 003's transition point.
- `decomposition_delta`, `step_delta` (paper 002 App. H): the overestimation delta_t of the fit
  x_t = w0 x0_hat + wT x_T.
- NeMo's probe (Hintersdorf et al. 2024, "Finding NeMo"; memtrain.mitigations.nemo has the
  reading of the official code): `detection_latents` (the noise it probes), `probe_timestep`,
  `noise_diff` (one conditional U-Net call on x_T, the min-max scaled eps_pred - x_T) and
  `nemo_memorization_score` (max over samples of the pairwise MS-SSIM of those differences).
"""

from __future__ import annotations

import contextlib

import torch

from memtrain.core.errors import MemtrainError
from memtrain.core.sampling import initial_noise
from memtrain.core.text import encode_prompts
from memtrain.metrics.ms_ssim import max_pairwise_ssim

# --- guidance magnitude and transition point (paper 003) ----------------------------------------

def guidance_magnitude(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """(B,) d_t = ||eps_cond - eps_uncond||^2 per image (paper 003 Alg. 1, line 4)."""
    return (eps_cond.float() - eps_uncond.float()).flatten(1).pow(2).sum(dim=1)


def first_local_minimum(values) -> int | None:
    """Index of the first strict local minimum of a sequence (paper 003's transition point), or None."""
    v = [float(x) for x in values]
    return next((k for k in range(1, len(v) - 1) if v[k - 1] > v[k] < v[k + 1]), None)


# --- overestimation delta (paper 002) -----------------------------------------------------------

def decomposition_weights(x_t: torch.Tensor, x0: torch.Tensor, x_T: torch.Tensor) -> torch.Tensor:
    """(B, 2) least-squares (w0, wT) of x_t = w0 x0 + wT x_T per image (paper 002 Sec. 3.4)."""
    design = torch.stack([x0.double().flatten(1), x_T.double().flatten(1)], dim=2)  # (B, n, 2)
    return torch.linalg.lstsq(design, x_t.double().flatten(1).unsqueeze(2)).solution[:, :, 0]


def decomposition_delta(x_t: torch.Tensor, x0_hat: torch.Tensor, x_T: torch.Tensor, abar: float) -> torch.Tensor:
    """(B,) paper 002's delta_t: fit x_t = w0 x0_hat + wT x_T per image by least squares and
    return (w0 - sqrt(abar)) - (wT - sqrt(1 - abar))."""
    weights = decomposition_weights(x_t, x0_hat, x_T)
    abar = float(abar)
    return ((weights[:, 0] - abar ** 0.5) - (weights[:, 1] - (1 - abar) ** 0.5)).float()


def step_delta(x_t: torch.Tensor, x_T: torch.Tensor, eps_cond: torch.Tensor, eps_uncond: torch.Tensor,
               scale: float, abar: float) -> torch.Tensor:
    """(B,) delta_t at one sampling step, x0_hat predicted from the guided noise at `scale`."""
    eps = eps_uncond.float() + scale * (eps_cond.float() - eps_uncond.float())
    x0_hat = (x_t.float() - (1 - abar) ** 0.5 * eps) / max(abar, 1e-8) ** 0.5
    return decomposition_delta(x_t, x0_hat, x_T, abar)


# --- NeMo's first-step noise difference ---------------------------------------------------------

OFFICIAL_NOISE_SEED = 1  # NeMo's scripts' default --seed: one generator for the whole batch
NOISE_MODES = ("official", "per_seed")
SSIM_RANGES = {"batch": None, "fixed": 1.0}  # -> ms_ssim's data_range


def detection_latents(mode: str, seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """The (S, C, H, W) initial noise NeMo probes: "official" draws all S samples in one
    randn call from a generator seeded 1 (the seeds only give the count); "per_seed" draws each
    from its own seed (memtrain's sampler noise, so it matches the audit's images)."""
    if mode == "official":
        generator = torch.Generator().manual_seed(OFFICIAL_NOISE_SEED)
        return torch.randn((len(seeds), *shape), generator=generator)
    return torch.stack([initial_noise(s, shape) for s in seeds])


def prediction_signal(kind: str, output: torch.Tensor, x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """NeMo's noise_diff = eps_pred - x_T, up to a positive per-timestep factor (which the
    min-max scaling removes). For epsilon models exactly the difference; for v/sample models
    c(a) x - x0_hat, which equals (eps_pred - x_T) * sqrt((1-a)/a) and stays defined at zero
    terminal SNR (a = 0, where eps_pred == x_T carries no information but x0_hat does)."""
    if kind == "epsilon":
        return output - x
    a = abar.to(x.dtype)
    if kind == "v_prediction":
        x0 = a.sqrt() * x - (1 - a).sqrt() * output
    elif kind == "sample":
        x0 = output
    else:
        raise MemtrainError(f"NeMo: unsupported prediction_type '{kind}'")
    c = (1 - (1 - a).sqrt()) / a.sqrt() if float(a) > 0 else torch.zeros_like(a)
    return c * x - x0


def minmax(diff: torch.Tensor) -> torch.Tensor:
    """Scale each sample's channels to [0, 1] (NeMo's per-sample, per-channel min-max)."""
    low = diff.amin(dim=(2, 3), keepdim=True)
    high = diff.amax(dim=(2, 3), keepdim=True)
    return (diff - low) / (high - low).clamp_min(1e-12)


def probe_timestep(bundle, num_inference_steps: int, timestep_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, abar_t) of the DDIM schedule's `timestep_index`-th step (clamped to the last one)."""
    scheduler = bundle.make_scheduler("ddim")
    scheduler.set_timesteps(num_inference_steps)
    index = min(timestep_index, len(scheduler.timesteps) - 1)
    t = scheduler.timesteps[index]
    return t, scheduler.alphas_cumprod[int(t)].float()


@torch.no_grad()
def noise_diff(bundle, embedding: torch.Tensor, latents: torch.Tensor, timestep: torch.Tensor,
               abar: torch.Tensor, batch_size: int, samples: list[int] | None = None,
               context=contextlib.nullcontext) -> torch.Tensor:
    """(S', C, H, W) min-max scaled noise differences of the `samples` (indices into `latents`,
    default all) for one text embedding (1, L, D): conditional branch only, x_T not stepped.
    `context()` is entered around the U-Net calls (NeMo blocks neurons there)."""
    samples = list(range(len(latents))) if samples is None else samples
    scheduler = bundle.make_scheduler("ddim")
    out = []
    with context():
        for start in range(0, len(samples), batch_size):
            x = latents[samples[start:start + batch_size]]
            x = (x * scheduler.init_noise_sigma).to(bundle.device, bundle.dtype)
            x_in = scheduler.scale_model_input(x, timestep)
            y = embedding.expand(len(x), -1, -1).to(bundle.device, bundle.dtype)
            pred = bundle.unet(x_in, timestep, encoder_hidden_states=y).sample
            out.append(minmax(prediction_signal(bundle.prediction_type, pred.float(), x.float(), abar).cpu()))
    return torch.cat(out)


@torch.no_grad()
def prompt_noise_diffs(bundle, prompt: str, seeds: list[int], noise: str = "official",
                       num_inference_steps: int = 50, timestep_index: int = 1,
                       batch_size: int = 16) -> torch.Tensor:
    """(S, C, H, W) NeMo's min-max scaled noise differences of one prompt, unblocked (S =
    len(seeds); with noise="official" the seeds only give the count)."""
    embedding = encode_prompts(bundle, [prompt]).embeddings
    shape = (bundle.latent_channels, bundle.sample_size, bundle.sample_size)
    latents = detection_latents(noise, list(seeds), shape)
    t, abar = probe_timestep(bundle, num_inference_steps, timestep_index)
    return noise_diff(bundle, embedding, latents, t, abar, batch_size)


@torch.no_grad()
def nemo_memorization_score(bundle, prompt: str, seeds: list[int], noise: str = "official",
                            num_inference_steps: int = 50, timestep_index: int = 1,
                            batch_size: int = 16, ssim_range: str = "batch") -> float:
    """NeMo's detection score of one prompt: the max over samples of the MS-SSIM between its
    first-step noise difference and the other samples' (high: every sample goes the same way)."""
    diffs = prompt_noise_diffs(bundle, prompt, seeds, noise, num_inference_steps, timestep_index, batch_size)
    return float(max_pairwise_ssim(diffs, SSIM_RANGES[ssim_range]).max())
