"""Detection benchmark: the detectors that come with the mitigation papers, scored on
memorized against non-memorized prompts. AUC, TPR at 1% FPR, seconds per prompt; ROC plot.

Per prompt, over the seeds (the sampler's settings, the prompt's own initial noise per seed):

- `wen` (Wen et al. 2024): ||eps(x_t, y_c) - eps(x_t, y_null)|| at the first sampling step,
  mean over seeds (on a zero-terminal-SNR model the first step with abar_t > 0: at abar_T = 0 the
  noise prediction is x_T whatever the prompt; x_t is then the noise x_T scaled for that step).
- `nemo` (NeMo): max over seeds of the MS-SSIM of first-step noise differences across seeds.
- `transition_point` (paper 003): under zero guidance, the fraction of sampling steps before the
  first local minimum of d_t = ||eps_c - eps_null||^2 (the trajectory's time in the attraction
  basin), mean over seeds; a trajectory without a local minimum scores 0 (paper 003: transition
  points do not exist for non-memorized samples).
- `overestimation` (paper 002 App. H): with normal guidance, delta_t of the fit
  x_t = w0 x0_hat + wT x_T, mean over the first quarter of the steps and over seeds.

Higher scores mean "memorized" for every detector. TPR at 1% FPR: the fraction of memorized
prompts scoring above every non-memorized one that the 1% budget does not allow past (with fewer
than 100 non-memorized prompts: above all of them); the report states the number of negatives.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch

from memtrain.core import progress
from memtrain.core.errors import MemtrainError
from memtrain.core.registry import Registry
from memtrain.core.sampling import SamplerSettings, eps_from_output, initial_noise, sample
from memtrain.core.text import encode_prompts
from memtrain.metrics.signals import first_local_minimum, guidance_magnitude, nemo_memorization_score, step_delta
from memtrain.mitigations.attention import cross_attention_probabilities

Detector = Callable[[object, str, list[int], SamplerSettings], float]


@torch.no_grad()
def wen_magnitude(bundle, prompt: str, seeds: list[int], settings: SamplerSettings) -> float:
    scheduler = bundle.make_scheduler(settings.scheduler)
    scheduler.set_timesteps(settings.num_inference_steps, device=bundle.device)
    # zero terminal SNR (abar_T = 0, the testbed, rescaled-beta SD 2.x): there eps(x_T) = x_T for every
    # prompt, so the first step whose prediction can depend on the text is the one measured
    t = next((t for t in scheduler.timesteps if float(scheduler.alphas_cumprod[int(t)]) > 0), scheduler.timesteps[0])
    shape = (bundle.latent_channels, bundle.sample_size, bundle.sample_size)
    x = torch.stack([initial_noise(s, shape) for s in seeds]).to(bundle.device, bundle.dtype) * scheduler.init_noise_sigma
    cond = encode_prompts(bundle, [prompt, ""]).embeddings
    y = torch.cat([cond[1:2].expand(len(seeds), -1, -1), cond[0:1].expand(len(seeds), -1, -1)])
    out = bundle.unet(scheduler.scale_model_input(torch.cat([x, x]), t), t, encoder_hidden_states=y).sample
    eps_u, eps_c = (eps_from_output(scheduler, o, x, t) for o in out.chunk(2))
    return float(guidance_magnitude(eps_c, eps_u).sqrt().mean())


def wen_step_magnitudes(bundle, prompt: str, seeds: list[int], settings: SamplerSettings) -> torch.Tensor:
    """(steps, seeds): ||eps_c - eps_u|| per image at every step of a normally guided run."""
    def magnitude(step, t, x, eps_c, eps_u, state):
        return guidance_magnitude(eps_c, eps_u).sqrt().cpu(), None

    return torch.cat([torch.stack(b) for b in _trajectories(bundle, prompt, seeds, settings, magnitude)], dim=1)


def wen_all_steps(bundle, prompt: str, seeds: list[int], settings: SamplerSettings) -> float:
    """Mean over the sampling steps and seeds of wen_step_magnitudes."""
    return float(wen_step_magnitudes(bundle, prompt, seeds, settings).mean())


ENTROPY_LAYER = 3  # MemAttn's detector reads the 4th cross-attention layer of the forward pass


@torch.no_grad()
def ren_entropy(bundle, prompt: str, seeds: list[int], settings: SamplerSettings) -> float:
    """Entropy of the first step's mean cross-attention distribution of layer ENTROPY_LAYER."""
    scheduler = bundle.make_scheduler(settings.scheduler)
    scheduler.set_timesteps(settings.num_inference_steps, device=bundle.device)
    t = scheduler.timesteps[0]
    shape = (bundle.latent_channels, bundle.sample_size, bundle.sample_size)
    x = torch.stack([initial_noise(s, shape) for s in seeds]).to(bundle.device, bundle.dtype) * scheduler.init_noise_sigma
    cond = encode_prompts(bundle, [prompt]).embeddings.expand(len(seeds), -1, -1)
    # the conditional branch alone: a row's attention does not depend on the rest of the batch
    layers = cross_attention_probabilities(bundle.unet, scheduler.scale_model_input(x, t), t, cond)
    if len(layers) <= ENTROPY_LAYER:
        raise MemtrainError(f"ren_entropy: the U-Net has {len(layers)} cross-attention layers, it reads layer "
                            f"{ENTROPY_LAYER} (0-based)")
    p = layers[ENTROPY_LAYER].float()
    return float(-(p * p.clamp_min(1e-30).log()).sum(dim=1).mean())


def nemo_score(bundle, prompt: str, seeds: list[int], settings: SamplerSettings) -> float:
    """NeMo's detection score with its default settings (memtrain.metrics.signals)."""
    return nemo_memorization_score(bundle, prompt, seeds)


def _trajectories(bundle, prompt: str, seeds: list[int], settings: SamplerSettings, hook) -> list[list]:
    """Run the sampler with `hook(step, t, x, eps_c, eps_u, state) -> (value, scale)`; the values
    per sampling batch and step (a batch restarts at step 0 with a fresh state)."""
    batches: list[list] = []
    state: dict = {}

    def wrapped(step, t, x, eps_c, eps_u):
        if step == 0:
            batches.append([])
            state.clear()
        value, scale = hook(step, t, x, eps_c, eps_u, state)
        batches[-1].append(value)
        return scale

    sample(bundle, [prompt], seeds, settings, hook=wrapped)
    return batches


def transition_fraction(bundle, prompt: str, seeds: list[int], settings: SamplerSettings) -> float:
    def zero_guidance(step, t, x, eps_c, eps_u, state):
        return guidance_magnitude(eps_c, eps_u).cpu(), 0.0

    fractions = []
    for batch in _trajectories(bundle, prompt, seeds, settings, zero_guidance):
        for column in torch.stack(batch).T:  # (steps,) of one seed
            point = first_local_minimum(column.tolist())
            fractions.append(point / len(column) if point is not None else 0.0)
    return float(np.mean(fractions))


def overestimation_delta(bundle, prompt: str, seeds: list[int], settings: SamplerSettings) -> float:
    abar_all = bundle.make_scheduler(settings.scheduler).alphas_cumprod
    scale = float(settings.guidance_scale)

    def record(step, t, x, eps_c, eps_u, state):
        if step == 0:
            state["x_T"] = x.clone()
        return step_delta(x, state["x_T"], eps_c, eps_u, scale, float(abar_all[int(t)])).cpu(), None

    per_seed = []
    for batch in _trajectories(bundle, prompt, seeds, settings, record):
        early = max(1, len(batch) // 4)
        per_seed.append(torch.stack(batch[:early]).mean(dim=0))
    return float(torch.cat(per_seed).mean())


# every detector by name, in the reports' order; a name is taken as written
DETECTORS = Registry("detector", canonical=str)
for _name, _detector in (("wen", wen_magnitude), ("nemo", nemo_score), ("transition_point", transition_fraction),
                         ("overestimation", overestimation_delta), ("wen_all_steps", wen_all_steps),
                         ("ren_entropy", ren_entropy)):
    DETECTORS.add(_name, _detector)


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC curve: P(score of a memorized prompt > a non-memorized one), ties 1/2."""
    pos, neg = np.asarray(positive, float)[:, None], np.asarray(negative, float)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def tpr_at_fpr(positive: Sequence[float], negative: Sequence[float], fpr: float = 0.01) -> float:
    """TPR at the threshold that lets at most floor(fpr * n_neg) non-memorized prompts through."""
    neg = np.sort(np.asarray(negative, float))[::-1]
    allowed = int(np.floor(fpr * len(neg)))
    threshold = neg[allowed] if allowed < len(neg) else -np.inf
    return float(np.mean(np.asarray(positive, float) > threshold))


def roc_points(positive: Sequence[float], negative: Sequence[float]) -> tuple[list[float], list[float]]:
    """(FPR, TPR) at every threshold, from (0, 0) to (1, 1)."""
    thresholds = sorted(set(positive) | set(negative), reverse=True)
    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    fpr = [0.0] + [float(np.mean(neg >= th)) for th in thresholds]
    tpr = [0.0] + [float(np.mean(pos >= th)) for th in thresholds]
    return fpr, tpr


def score_prompts(bundle, detector: str, prompts: Sequence[str], seeds: list[int],
                  settings: SamplerSettings, bar: progress.Stage | None = None) -> tuple[list[float], float]:
    """Each prompt's score under one detector and the seconds per prompt (`bar`: a progress stage
    advanced per prompt)."""
    start, scores = time.perf_counter(), []
    for prompt in prompts:
        scores.append(DETECTORS[detector](bundle, prompt, list(seeds), settings))
        if bar is not None:
            bar.advance()
    return scores, (time.perf_counter() - start) / max(1, len(prompts))
