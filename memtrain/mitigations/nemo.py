"""NeMo (Hintersdorf et al. 2024, "Finding NeMo"): localize and prune memorization neurons.

Longer than 400 lines on purpose: detection, initial selection, refinement and the MS-SSIM
score are one algorithm, read best in one file.

Neurons are the output channels of the cross-attention value projections (`attn2.to_v`), by
default in the down and mid blocks (the 7 layers NeMo uses on SD1.x; `layers="all"` adds the
up blocks). Our reading of the reference code (ml-research/localizing_memorization_in_diffusion_
models), re-implemented here:

* activation statistics (1_compute_activations_statistics.py): a neuron's activation for a
  prompt is mean_tokens |to_v(text embedding)| (to_v reads only the text); per neuron, mean and
  std over non-memorized reference prompts.
* memorization signal (utils/activation_detection.py, compute_noise_diff): one U-Net call on
  the initial noise x_T, conditional branch only (guidance 0), noise_diff = eps_pred - x_T,
  min-max scaled per sample and channel. The code evaluates it at the *second* scheduled
  timestep without stepping x_T (`timestep_index=1`).
* detection (3_detect_memorized_neurons.py, calculate_max_pairwise_ssim): per seed, the max
  MS-SSIM (kernel 11, betas 0.33 x 3) of its noise_diff against every other seed's; seeds
  above tau_mem (0.428 = mean + std on 50k LAION prompts; 0.288 "strong" = mean - std) are the
  ones looked at, no such seed = not memorized.
* the thresholded "memorization score" during selection and refinement is different: max over
  the looked-at seeds of MS-SSIM(noise_diff unblocked, noise_diff with neurons blocked), same
  seed. Blocking must push it to <= tau_mem.
* initial selection: neurons with z = |a - mean| / std > theta plus the top-k activations per
  layer; start theta 5, k 0; while the score is above tau: theta -= 0.25 (down to 1), k += 1.
  If theta reaches 1 first, the refinement threshold becomes the score reached.
* refinement (neuron_refinement): layers in reverse order, re-enable a whole layer if the score
  stays below the threshold without it; then per remaining neuron, re-enable it if the score
  stays below. Greedy, so each accepted re-enabling stays.
* pruning: the selected value-projection output rows are zeroed (the code's hook scales those
  outputs by 0: the same thing), per prompt or for the union over prompts.

Bounded compute: `num_seeds` seeds and at most `refinement_budget` score evaluations per prompt
in refinement (neurons left untested stay pruned: the conservative side).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from memtrain.core.errors import MemtrainError
from memtrain.core.run import gather_in_order, shard, shard_chunks
from memtrain.mitigations.base import (
    PruningMitigation, json_tensor, register_mitigation, tensor_json,
)
from memtrain.core.sampling import initial_noise
from memtrain.core.text import encode_prompts

TAU_MEM = 0.428
TAU_MEM_STRONG = 0.288
LAYER_SCOPES = ("down_mid", "all")


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


# --- SSIM ---------------------------------------------------------------------------------------

def _gaussian_kernel(size: int, sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def _ssim_and_cs(x: torch.Tensor, y: torch.Tensor, size: int, sigma: float,
                 data_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean SSIM and contrast-structure term, reflect-padded then cropped."""
    n, channels = x.shape[:2]
    pad = (size - 1) // 2
    kernel = _gaussian_kernel(size, sigma, channels, x)
    stack = torch.cat([x, y, x * x, y * y, x * y])
    if pad:
        stack = F.pad(stack, [pad] * 4, mode="reflect")
    mu_x, mu_y, xx, yy, xy = F.conv2d(stack, kernel, groups=channels).split(n)
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    ssim = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs
    if pad:
        ssim, cs = ssim[..., pad:-pad, pad:-pad], cs[..., pad:-pad, pad:-pad]
    return ssim.flatten(1).mean(1), cs.flatten(1).mean(1)


def ms_ssim_settings(height: int, width: int, kernel_size: int = 11,
                     scales: int = 3) -> tuple[int, int]:
    """(kernel, scales) that fit the image: NeMo's MS-SSIM (11, 3) on 64x64 SD latents; fewer
    scales, then a smaller odd kernel, for small latents."""
    side = min(height, width)
    # the reflect-pad-then-crop scheme needs at least `kernel_size` pixels at every scale
    while scales > 1 and side // 2 ** (scales - 1) < kernel_size:
        scales -= 1
    if side < kernel_size:
        kernel_size = max(1, side if side % 2 else side - 1)
    return kernel_size, scales


def ms_ssim(x: torch.Tensor, y: torch.Tensor, kernel_size: int = 11, sigma: float = 1.5,
            betas: tuple[float, ...] = (0.33, 0.33, 0.33), data_range: float = 1.0) -> torch.Tensor:
    """Multi-scale SSIM per sample (N,), as torchmetrics computes it with normalize='relu':
    prod_s relu(cs_s)^beta_s with relu(ssim) at the coarsest scale. Scales that do not fit the
    image are dropped and the remaining betas rescaled to the same total."""
    kernel_size, scales = ms_ssim_settings(x.shape[-2], x.shape[-1], kernel_size, len(betas))
    weights = torch.tensor(betas[:scales], dtype=x.dtype, device=x.device)
    weights = weights * (sum(betas) / weights.sum())
    x, y = x.float(), y.float()
    terms = []
    for scale in range(scales):
        ssim, cs = _ssim_and_cs(x, y, kernel_size, sigma, data_range)
        terms.append((ssim if scale == scales - 1 else cs).clamp_min(0))
        if scale < scales - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return torch.prod(torch.stack(terms) ** weights.float().view(-1, 1), dim=0)


def max_pairwise_ssim(diffs: torch.Tensor) -> torch.Tensor:
    """(S,) for each seed, the max MS-SSIM of its noise_diff against every other seed's."""
    count = diffs.shape[0]
    pairs = torch.combinations(torch.arange(count), r=2)
    scores = ms_ssim(diffs[pairs[:, 0]], diffs[pairs[:, 1]])
    best = torch.full((count,), -math.inf)
    for (i, j), score in zip(pairs.tolist(), scores.cpu().tolist()):
        best[i], best[j] = max(best[i], score), max(best[j], score)
    return best


# --- the memorization signal --------------------------------------------------------------------

def _signal(kind: str, output: torch.Tensor, x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
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


def _minmax(diff: torch.Tensor) -> torch.Tensor:
    low = diff.amin(dim=(2, 3), keepdim=True)
    high = diff.amax(dim=(2, 3), keepdim=True)
    return (diff - low) / (high - low).clamp_min(1e-12)


@dataclasses.dataclass
class _Probe:
    """Everything needed to evaluate one prompt's noise_diff under different blockings."""

    bundle: object
    layers: dict
    embedding: torch.Tensor  # (1, L, D)
    seeds: list[int]
    timestep: torch.Tensor
    abar: torch.Tensor
    batch_size: int
    evaluations: int = 0

    @torch.no_grad()
    def noise_diff(self, blocked: dict[str, list[int]] | None = None,
                   seeds: list[int] | None = None) -> torch.Tensor:
        bundle = self.bundle
        seeds = self.seeds if seeds is None else seeds
        shape = (bundle.latent_channels, bundle.sample_size, bundle.sample_size)
        scheduler = bundle.make_scheduler("ddim")
        out = []
        self.evaluations += 1
        with blocked_neurons(self.layers, blocked):
            for start in range(0, len(seeds), self.batch_size):
                chunk = seeds[start:start + self.batch_size]
                x = torch.stack([initial_noise(s, shape) for s in chunk])
                x = (x * scheduler.init_noise_sigma).to(bundle.device, bundle.dtype)
                x_in = scheduler.scale_model_input(x, self.timestep)
                y = self.embedding.expand(len(chunk), -1, -1).to(bundle.device, bundle.dtype)
                pred = bundle.unet(x_in, self.timestep, encoder_hidden_states=y).sample
                kind = bundle.prediction_type
                out.append(_minmax(_signal(kind, pred.float(), x.float(), self.abar).cpu()))
        return torch.cat(out)

    def score(self, reference: torch.Tensor, blocked: dict[str, list[int]],
              seeds: list[int]) -> float:
        """The thresholded score: max over seeds of MS-SSIM(unblocked, blocked)."""
        return float(ms_ssim(reference, self.noise_diff(blocked, seeds)).max())


def _make_probe(bundle, layers, embedding, seeds, num_inference_steps, timestep_index,
                batch_size) -> _Probe:
    scheduler = bundle.make_scheduler("ddim")
    scheduler.set_timesteps(num_inference_steps)
    index = min(timestep_index, len(scheduler.timesteps) - 1)
    t = scheduler.timesteps[index]
    abar = scheduler.alphas_cumprod[int(t)].float()
    return _Probe(bundle, layers, embedding, list(seeds), t, abar, batch_size)


# --- selection ----------------------------------------------------------------------------------

def _candidates(activation: dict, mean: dict, std: dict, theta: float, k: int) -> dict:
    """Initial selection: OOD neurons (z > theta) plus the top-k activations, per layer."""
    selected = {}
    for name, act in activation.items():
        z = (act - mean[name]).abs() / std[name].clamp_min(1e-12)
        rows = set((z > theta).nonzero().flatten().tolist())
        if k > 0:
            rows |= set(act.topk(min(k, act.numel())).indices.tolist())
        selected[name] = sorted(rows)
    return selected


def _without(blocked: dict, layer: str, neuron: int | None = None) -> dict:
    trial = {name: list(rows) for name, rows in blocked.items()}
    trial[layer] = [] if neuron is None else [r for r in trial[layer] if r != neuron]
    return trial


@register_mitigation
@dataclasses.dataclass(eq=False)
class NeMo(PruningMitigation):
    """Prune the cross-attention value neurons that drive memorization (settings: the init fields)."""

    name = "nemo"
    changes = ("U-Net weights: the output rows of cross-attention value projections (attn2.to_v) "
               "found to drive memorization are set to zero")

    tau_mem: float | str = TAU_MEM  # float, "auto" (ref. mean + std) or "auto_strong" (mean - std)
    num_seeds: int = 10
    num_inference_steps: int = 50
    timestep_index: int = 1
    initial_theta: float = 5.0
    min_theta: float = 1.0
    theta_step: float = 0.25
    initial_k: int = 0
    refinement_budget: int | None = 500
    layers: str = "down_mid"
    batch_size: int = 16
    # a safetensors file of per-neuron activation statistics (mean.<layer>, std.<layer>): loaded
    # when it exists, else computed once from the reference prompts and written there
    statistics: str | None = None

    _mean: dict = dataclasses.field(default_factory=dict, init=False, repr=False)
    _std: dict = dataclasses.field(default_factory=dict, init=False, repr=False)
    _records: dict = dataclasses.field(default_factory=dict, init=False, repr=False)
    _active: list | None = dataclasses.field(default=None, init=False, repr=False)
    _tau_used: float | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.tau_mem, str) and self.tau_mem not in ("auto", "auto_strong"):
            raise MemtrainError(
                f"nemo: tau_mem must be a number, 'auto' or 'auto_strong', got '{self.tau_mem}'"
            )
        if self.layers not in LAYER_SCOPES:
            raise MemtrainError(f"nemo: layers must be one of {', '.join(LAYER_SCOPES)}")
        if int(self.num_seeds) < 2:
            raise MemtrainError("nemo: num_seeds must be >= 2 (the score compares seeds)")

    # prepare -----------------------------------------------------------------------------------
    def prepare(self, bundle, memorized_prompts, reference_prompts, seeds) -> None:
        layers = value_layers(bundle.unet, self.layers, bundle.source)
        seeds = [int(s) for s in seeds][: int(self.num_seeds)]
        if len(seeds) < 2:
            raise MemtrainError("nemo: pass at least 2 seeds (the score compares seeds)")
        cached = Path(self.statistics).expanduser() if self.statistics else None
        if cached is not None and cached.is_file():
            self._mean, self._std = load_statistics(cached, layers)
        elif reference_prompts:
            self._mean, self._std = self._statistics(bundle, layers, list(reference_prompts))
            if cached is not None:
                save_statistics(cached, self._mean, self._std)
        elif not self._mean:
            raise MemtrainError(
                "nemo: needs activation statistics of non-memorized prompts: pass reference prompts "
                "(audit: --reference_manifest M; computed once and cached when mitigations.nemo.statistics "
                "names a file) or set mitigations.nemo.statistics to a saved statistics file"
                + (f" ('{cached}' does not exist)" if cached is not None else "")
            )
        self._tau_used = self._threshold(bundle, layers, list(reference_prompts), seeds)
        # each prompt is localized on its own, so sharding them changes nothing but the time
        local = [(i, self._localize(bundle, layers, p, seeds)) for i, p in shard(memorized_prompts, self.processes)]
        self._records.update(zip(memorized_prompts, gather_in_order(local, self.processes)))

    @torch.no_grad()
    def _statistics(self, bundle, layers, prompts: list[str]) -> tuple[dict, dict]:
        if len(prompts) < 2:
            raise MemtrainError("nemo: needs at least 2 reference prompts for a std")
        local = []  # global chunks of batch_size prompts: the same batches on any number of processes
        for chunk in shard_chunks(prompts, self.batch_size, self.processes):
            emb = encode_prompts(bundle, [p for _, p in chunk]).embeddings
            local.append((chunk[0][0], activation_profile(layers, emb.to(bundle.dtype))))
        chunks = gather_in_order(local, self.processes)
        stacked = {name: torch.cat([c[name] for c in chunks]) for name in layers}
        return ({n: a.mean(dim=0) for n, a in stacked.items()},
                {n: a.std(dim=0) for n, a in stacked.items()})

    def _threshold(self, bundle, layers, reference_prompts, seeds) -> float:
        """tau_mem, or NeMo's recipe (mean +- std of pairwise scores on non-memorized prompts)
        for a model the published 0.428 was not calibrated on."""
        if not isinstance(self.tau_mem, str):
            return float(self.tau_mem)
        if len(reference_prompts) < 2:
            raise MemtrainError("nemo: tau_mem='auto' needs at least 2 reference prompts")
        local = []
        for index, prompt in shard(reference_prompts, self.processes):
            diffs = self._probe(bundle, layers, prompt, seeds).noise_diff()
            pairs = torch.combinations(torch.arange(len(seeds)), r=2)
            local.append((index, ms_ssim(diffs[pairs[:, 0]], diffs[pairs[:, 1]]).cpu()))
        scores = torch.cat(gather_in_order(local, self.processes))
        sign = 1.0 if self.tau_mem == "auto" else -1.0
        return float(scores.mean() + sign * scores.std())

    def _probe(self, bundle, layers, prompt: str | torch.Tensor, seeds) -> _Probe:
        embedding = encode_prompts(bundle, [prompt]).embeddings if isinstance(prompt, str) else prompt
        return _make_probe(bundle, layers, embedding, seeds, self.num_inference_steps,
                           self.timestep_index, self.batch_size)

    @torch.no_grad()
    def memorization_score(self, bundle, prompt: str, seeds: list[int]) -> float:
        """NeMo's detection score of one prompt: the max over seeds of the MS-SSIM between its
        first-step noise difference and the other seeds' (high: every seed goes the same way)."""
        layers = value_layers(bundle.unet, self.layers, bundle.source)
        return float(max_pairwise_ssim(self._probe(bundle, layers, prompt, list(seeds)).noise_diff()).max())

    def localize_embedding(self, bundle, embedding: torch.Tensor, seeds: list[int]) -> dict[str, list[int]]:
        """The neurons NeMo selects for one text embedding (1, L, D), e.g. an adversarial one,
        per layer (empty when it does not score as memorized). Needs `prepare` first (the
        activation statistics and tau_mem); the prepared prompts' selections are untouched."""
        if not self._mean or self._tau_used is None:
            raise MemtrainError("nemo: call prepare() (statistics and tau_mem) before localize_embedding")
        layers = value_layers(bundle.unet, self.layers, bundle.source)
        return self._localize(bundle, layers, embedding.reshape(1, *embedding.shape[-2:]), list(seeds))["refined"]

    @torch.no_grad()
    def _localize(self, bundle, layers, prompt: str | torch.Tensor, seeds: list[int]) -> dict:
        tau = self._tau_used
        probe = self._probe(bundle, layers, prompt, seeds)
        unblocked = probe.noise_diff()
        pairwise = max_pairwise_ssim(unblocked)
        looked_at = [s for s, score in zip(seeds, pairwise.tolist()) if score > tau]
        record = {"memorization_score": float(pairwise.max()), "memorized": bool(looked_at),
                  "seeds_looked_at": looked_at, "initial": {}, "refined": {},
                  "initial_score": None, "refined_score": None, "evaluations": 1,
                  "budget_exhausted": False}
        if not looked_at:
            return record
        keep = torch.tensor([s in looked_at for s in seeds])
        reference = unblocked[keep]
        embedding = probe.embedding.to(bundle.device, bundle.dtype)
        activation = {n: a[0] for n, a in activation_profile(layers, embedding).items()}
        initial, score, threshold = self._initial_selection(probe, reference, looked_at, activation)
        refined, exhausted = self._refine(probe, reference, looked_at, initial, threshold)
        record.update(
            initial=_nonempty(initial), initial_score=score, refined=_nonempty(refined),
            refined_score=probe.score(reference, refined, looked_at),
            refinement_threshold=threshold, evaluations=probe.evaluations,
            budget_exhausted=exhausted,
        )
        return record

    def _initial_selection(self, probe, reference, seeds, activation):
        tau, theta, k = self._tau_used, float(self.initial_theta), int(self.initial_k)
        max_k = max(a.numel() for a in activation.values())
        while True:
            blocked = _candidates(activation, self._mean, self._std, theta, k)
            score = probe.score(reference, blocked, seeds)
            if score <= tau:
                return blocked, score, tau
            if theta > self.min_theta:
                theta = max(theta - self.theta_step, self.min_theta)
            k += 1
            if theta <= self.min_theta or k >= max_k:
                # could not get below tau: refine against the score reached instead
                return blocked, score, score

    def _refine(self, probe, reference, seeds, initial, threshold):
        blocked = {name: list(rows) for name, rows in initial.items()}
        budget = self.refinement_budget
        start = probe.evaluations

        def spent() -> bool:
            return budget is not None and probe.evaluations - start >= budget

        for layer in reversed(list(blocked)):  # 1) whole layers
            if blocked[layer]:
                if spent():
                    return blocked, True
                trial = _without(blocked, layer)
                if probe.score(reference, trial, seeds) < threshold:
                    blocked = trial
        for layer in reversed(list(blocked)):  # 2) single neurons
            for neuron in list(blocked[layer]):
                if spent():
                    return blocked, True
                trial = _without(blocked, layer, neuron)
                if probe.score(reference, trial, seeds) < threshold:
                    blocked = trial
        return blocked, False

    # pruning -----------------------------------------------------------------------------------
    def neurons(self) -> dict[str, list[int]]:
        """The union over the active prompts of their refined neurons, per layer."""
        union: dict[str, set[int]] = {}
        prompts = self._records if self._active is None else self._active
        for prompt in prompts:
            for layer, rows in self._records[prompt]["refined"].items():
                union.setdefault(layer, set()).update(rows)
        return {layer: sorted(rows) for layer, rows in union.items() if rows}

    def search_space(self, unet) -> dict[str, torch.nn.Module]:
        return value_layers(unet, self.layers)

    def pruning_targets(self, unet):
        modules = dict(unet.named_modules())
        targets = []
        for layer, rows in self.neurons().items():
            module = modules.get(layer)
            if not isinstance(module, torch.nn.Linear) or max(rows) >= module.out_features:
                raise MemtrainError(
                    f"nemo: the selected neurons do not fit this model (layer '{layer}'): were "
                    "they prepared on another model?"
                )
            rows_t = torch.tensor(rows, dtype=torch.long)
            cols = torch.arange(module.in_features)
            flat = (rows_t[:, None] * module.in_features + cols).flatten()  # whole rows
            targets.append((layer, "weight", flat))
            if module.bias is not None:
                targets.append((layer, "bias", rows_t))
        return targets

    def for_prompts(self, prompts: list[str]) -> "NeMo":
        missing = [p for p in prompts if p not in self._records]
        if missing:
            raise MemtrainError(f"nemo: no neurons were localized for prompt '{missing[0]}'")
        restricted = copy.copy(self)
        restricted._saved = []
        restricted._active = list(prompts)
        return restricted

    # reports and persistence -------------------------------------------------------------------
    def details(self) -> dict:
        neurons = self.neurons()
        return {
            "tau_mem_used": self._tau_used,
            "layers_searched": list(self._mean),
            "pruned_neurons": {layer: len(rows) for layer, rows in neurons.items()},
            "pruned_total": sum(len(rows) for rows in neurons.values()),
            "prompts": {p: {k: v for k, v in r.items()} for p, r in self._records.items()},
            "pruning": "union over all prompts" if self._active is None else
                       f"union over {len(self._active)} prompt(s)",
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"mean.{n}": t for n, t in self._mean.items()}
        state.update({f"std.{n}": t for n, t in self._std.items()})
        state["meta"] = json_tensor({"records": self._records, "tau_used": self._tau_used,
                                     "active": self._active})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._mean = {k[len("mean."):]: v for k, v in state.items() if k.startswith("mean.")}
        self._std = {k[len("std."):]: v for k, v in state.items() if k.startswith("std.")}
        meta = tensor_json(state["meta"]) if "meta" in state else {}
        self._records = meta.get("records", {})
        self._tau_used = meta.get("tau_used")
        self._active = meta.get("active")


def save_statistics(path: Path, mean: dict, std: dict) -> None:
    """Write NeMo's per-neuron statistics as safetensors (atomically: a killed run leaves none)."""
    tensors = {f"mean.{n}": t.float().contiguous().cpu() for n, t in mean.items()}
    tensors.update({f"std.{n}": t.float().contiguous().cpu() for n, t in std.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def load_statistics(path: Path, layers: dict) -> tuple[dict, dict]:
    """Read statistics written by `save_statistics`; every value layer must be there with its width."""
    try:
        tensors = load_file(str(path))
    except Exception as err:  # not safetensors, truncated
        raise MemtrainError(f"nemo statistics '{path}' cannot be read ({type(err).__name__}): "
                            "delete it to recompute from reference prompts") from None
    mean, std = {}, {}
    for name, layer in layers.items():
        m, s = tensors.get(f"mean.{name}"), tensors.get(f"std.{name}")
        if m is None or s is None or m.shape != (layer.out_features,) or s.shape != m.shape:
            raise MemtrainError(f"nemo statistics '{path}' do not fit this model (layer {name}, "
                                f"{layer.out_features} neurons): compute them for this model from reference prompts")
        mean[name], std[name] = m, s
    return mean, std


def _nonempty(blocked: dict) -> dict:
    return {layer: list(rows) for layer, rows in blocked.items() if rows}
