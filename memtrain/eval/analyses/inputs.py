"""What every analysis works on (model, prompts with their training images, seeds, sampler,
copy descriptor) and the two things they share: per-step records of a sampling run and plots."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from memtrain.core.diffusion import images_to_latents
from memtrain.core.manifest import ManifestItem, load_image
from memtrain.core.sampling import SampleOutput, SamplerSettings, sample
from memtrain.core.text import TextEmbedding
from memtrain.metrics import sscd_orig

GROUPS = ("memorized", "non_memorized")
COLORS = {"memorized": "tab:red", "non_memorized": "tab:blue"}


@dataclass
class AnalysisInputs:
    """One model and the two prompt groups the analyses compare."""

    bundle: object
    settings: SamplerSettings
    seeds: list[int]
    items: dict[str, list[ManifestItem]]  # group -> manifest items (memorized, non_memorized)
    descriptor: object | None  # copy descriptor (SSCD), None: scores not computed
    model_label: str
    _latents: dict = field(default_factory=dict, repr=False)

    def prompts(self, group: str) -> list[str]:
        return [it.prompt for it in self.items[group]]

    def has_images(self, group: str) -> bool:
        return bool(self.items[group]) and all(it.image for it in self.items[group])

    def images(self, group: str) -> list:
        return [load_image(it) for it in self.items[group]]

    def latents(self, group: str) -> torch.Tensor | None:
        """(N, C, h, w) training latents of a group's images (None when an item has no image)."""
        if not self.has_images(group):
            return None
        if group not in self._latents:
            self._latents[group] = images_to_latents(self.bundle, self.images(group)).float().cpu()
        return self._latents[group]

    def sscd_orig(self, group: str, generated: torch.Tensor) -> np.ndarray | None:
        """(N, S) SSCD of generated images (N, S, 3, H, W) against the group's training images."""
        if self.descriptor is None or not self.has_images(group):
            return None
        n, s = generated.shape[:2]
        gen = self.descriptor.embed(generated.flatten(0, 1)).reshape(n, s, -1)
        return sscd_orig(gen, self.descriptor.embed(self.images(group)))

    def title(self, what: str, settings: SamplerSettings | None = None) -> str:
        s = settings or self.settings
        return (f"{what}\n{self.model_label} | {s.scheduler} {s.num_inference_steps} steps, "
                f"guidance {s.guidance_scale:g}, {len(self.seeds)} seeds")


@dataclass
class StepRecord:
    """Per sampling step (K steps) of N inputs x S seeds: x_t and both noise predictions."""

    timesteps: list[int]
    x_t: torch.Tensor  # (K, N, S, C, h, w)
    eps_cond: torch.Tensor
    eps_uncond: torch.Tensor
    output: SampleOutput  # final images and latents


def record_steps(bundle, cond: TextEmbedding | torch.Tensor | Sequence[str], seeds: Sequence[int],
                 settings: SamplerSettings,
                 scale: Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], object] | None = None
                 ) -> StepRecord:
    """Run the sampler and keep x_t, eps_cond and eps_uncond of every step. `scale` is the
    sampler's guidance hook (e.g. `lambda *a: 0.0` for zero guidance); None: normal guidance."""
    chunks: list[list[tuple]] = []

    def hook(step, t, x, eps_c, eps_u):
        if step == 0:
            chunks.append([])
        chunks[-1].append((int(t), x.float().cpu(), eps_c.float().cpu(), eps_u.float().cpu()))
        return scale(step, t, x, eps_c, eps_u) if scale is not None else None

    out = sample(bundle, cond, list(seeds), settings, hook=hook)
    n, s = out.latents.shape[:2]
    steps = len(chunks[0])

    def stacked(k: int) -> torch.Tensor:  # chunks follow the sampler's (input, seed) job order
        per_step = [torch.cat([c[step][k] for c in chunks]) for step in range(steps)]
        return torch.stack(per_step).reshape(steps, n, s, *per_step[0].shape[1:])

    return StepRecord([t for t, *_ in chunks[0]], stacked(1), stacked(2), stacked(3), out)


# --- plots --------------------------------------------------------------------------------------

def pyplot():
    """matplotlib.pyplot on the Agg backend (no display on the machines that run the analyses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def band(ax, x: Sequence[float], values: np.ndarray, label: str, color: str, **kwargs) -> None:
    """Mean line and a 10th-90th percentile band of `values` (n, len(x)) on one axis (a
    percentile band stays inside the data, so it works on log axes too)."""
    values = np.asarray(values, float)
    low, high = np.percentile(values, [10, 90], axis=0)
    ax.plot(x, values.mean(axis=0), color=color, label=f"{label}: mean, 10-90% band (n={values.shape[0]})", **kwargs)
    ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
