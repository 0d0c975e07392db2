"""NeMo's neurons (Hintersdorf et al. 2024, "Finding NeMo"): the value projections it searches,
their activations, blocking them while probing, the initial selection, and the probe that scores
a blocking (memtrain.mitigations.nemo has the algorithm and its reading of the official code)."""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from memtrain.core.errors import MemtrainError
from memtrain.metrics.ms_ssim import ms_ssim
from memtrain.metrics.signals import noise_diff, probe_timestep


# --- layers -------------------------------------------------------------------------------------

def _block_rank(name: str) -> tuple[int, str]:
    # U-Net data flow order: down blocks, mid block, up blocks
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return order.get(name.split(".")[0], 3), name


def value_layers(unet, scope: str = "down_mid", model_name: str = "") -> dict[str, torch.nn.Linear]:
    """The cross-attention value projections NeMo works on, in data-flow order."""
    found = {
        name: module for name, module in unet.named_modules()
        if name.endswith("attn2.to_v") and isinstance(module, torch.nn.Linear)
    }
    if scope == "down_mid":
        found = {n: m for n, m in found.items() if not n.startswith("up_blocks")}
    if not found:
        where = "down/mid blocks" if scope == "down_mid" else "any block"
        raise MemtrainError(
            f"NeMo needs cross-attention value layers (attn2.to_v) in the U-Net's {where}, but "
            f"model '{model_name or type(unet).__name__}' has none: it cannot be pruned by NeMo"
        )
    return dict(sorted(found.items(), key=lambda item: _block_rank(item[0])))


def activation_profile(layers: dict[str, torch.nn.Linear], embeddings: torch.Tensor) -> dict:
    """Per layer (B, C): mean over token positions of |to_v(embedding)|."""
    return {name: layer(embeddings).abs().mean(dim=1).float().cpu()
            for name, layer in layers.items()}


@contextlib.contextmanager
def blocked_neurons(layers: dict[str, torch.nn.Linear], blocked: dict[str, list[int]] | None):
    """Zero the listed output channels of the value projections during the block (hooks, so the
    weights are never touched while searching)."""
    handles = []

    def make_hook(index: torch.Tensor):
        def hook(module, args, output):
            output = output.clone()
            output[..., index.to(output.device)] = 0
            return output
        return hook

    for name, rows in (blocked or {}).items():
        if rows:
            index = torch.tensor(sorted(rows), dtype=torch.long)
            handles.append(layers[name].register_forward_hook(make_hook(index)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- the probe ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Probe:
    """Everything needed to evaluate one prompt's noise_diff under different blockings.
    Samples are indices into `latents`."""

    bundle: object
    layers: dict
    embedding: torch.Tensor  # (1, L, D)
    latents: torch.Tensor  # (S, C, H, W), CPU float32
    timestep: torch.Tensor
    abar: torch.Tensor
    batch_size: int
    data_range: float | None
    evaluations: int = 0
    _scores: dict = dataclasses.field(default_factory=dict)

    def noise_diff(self, blocked: dict[str, list[int]] | None = None,
                   samples: list[int] | None = None) -> torch.Tensor:
        self.evaluations += 1
        return noise_diff(self.bundle, self.embedding, self.latents, self.timestep, self.abar, self.batch_size,
                          samples, context=lambda: blocked_neurons(self.layers, blocked))

    def score(self, reference: torch.Tensor, blocked: dict[str, list[int]],
              samples: list[int]) -> float:
        """The thresholded score: max over samples of MS-SSIM(unblocked, blocked), one call.
        Memoized by the blocked set (dropping one listing of a duplicated neuron blocks the same
        neurons: NeMo evaluates it again, with the same result)."""
        key = (tuple(samples), tuple((n, tuple(sorted(set(r)))) for n, r in blocked.items() if r))
        if key not in self._scores:
            self._scores[key] = float(ms_ssim(reference, self.noise_diff(blocked, samples),
                                              data_range=self.data_range).max())
        return self._scores[key]


def make_probe(bundle, layers, embedding, latents, num_inference_steps, timestep_index,
                batch_size, data_range) -> Probe:
    t, abar = probe_timestep(bundle, num_inference_steps, timestep_index)
    return Probe(bundle, layers, embedding, latents, t, abar, batch_size, data_range)


# --- selection ----------------------------------------------------------------------------------

def candidate_neurons(activation: dict, mean: dict, std: dict, theta: float, k: int) -> dict:
    """NeMo's initial selection per layer, as the official code lists it: the neurons with
    z = |a - mean| / std > theta in ascending order, then the top-k activations in descending
    order (duplicates kept: the refinement's greedy order follows this list)."""
    selected = {}
    for name, act in activation.items():
        z = (act - mean[name]).abs() / std[name].clamp_min(1e-12)
        rows = (z > theta).nonzero().flatten().tolist()
        if k > 0:
            rows += act.abs().topk(min(k, act.numel())).indices.tolist()
        selected[name] = rows
    return selected


def without(blocked: dict, layer: str, neuron: int | None = None) -> dict:
    """`blocked` with a layer emptied, or with the first listing of one neuron dropped."""
    trial = {name: list(rows) for name, rows in blocked.items()}
    if neuron is None:
        trial[layer] = []
    else:
        trial[layer].remove(neuron)
    return trial
