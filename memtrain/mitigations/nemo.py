"""NeMo (Hintersdorf et al. 2024, "Finding NeMo"): localize and prune memorization neurons.

The memorization signal (noise differences, MS-SSIM) is memtrain.metrics.signals and
memtrain.metrics.ms_ssim, shared with the detectors; statistics files: nemo_stats.py.

Neurons are the output channels of the cross-attention value projections (`attn2.to_v`), by
default in the down and mid blocks (the 7 layers NeMo uses on SD1.x; `layers="all"` adds the
up blocks). Our reading of the reference code (ml-research/localizing_memorization_in_diffusion_
models @ f952ede, docs/fidelity.md), re-implemented here:

* activation statistics (1_compute_activations_statistics.py): a neuron's activation for a
  prompt is mean_tokens |to_v(text embedding)| (to_v reads only the text); per neuron, mean and
  unbiased std over non-memorized reference prompts. `statistics: FILE` also reads NeMo's
  published torch.save file.
* memorization signal (utils/activation_detection.py, compute_noise_diff): one U-Net call on
  the initial noise x_T, conditional branch only (guidance 0), noise_diff = eps_pred - x_T,
  min-max scaled per sample and channel, at the *second* scheduled timestep without stepping
  x_T (`timestep_index=1`). `noise="official"`: the samples are one batch of randn from seed 1
  (the official draw); `"per_seed"`: one generator per audit seed.
* detection (calculate_max_pairwise_ssim): per sample, the max MS-SSIM (kernel 11, betas
  0.33 x 3) of its noise_diff against every other sample's, all pairs in one call;
  `ssim_range="batch"` is torchmetrics' data_range=None (the call's range, per scale), as the
  official code runs it; `"fixed"` uses 1.0. Samples above tau_mem are the ones looked at.
  tau_mem 0.428 (0.288 "strong") is the published threshold, but the script that calibrated it
  (2_compute_pairwise_ssim.py) ran guidance 7 with the CFG halves' labels swapped, i.e. scored
  7 eps_uncond - 6 eps_text, while detection runs guidance 0: `tau_mem="auto"` (mean + std of
  the pairwise scores on reference prompts, guidance 0) will not reproduce 0.428 on SD v1.4.
* the thresholded "memorization score" during selection and refinement: max over the
  looked-at samples of MS-SSIM(noise_diff unblocked, noise_diff with neurons blocked), same
  sample, one call. Blocking must push it to <= tau_mem.
* initial selection: neurons with z = |a - mean| / std > theta (ascending), then the top-k
  activations per layer (descending; duplicates kept, as the code builds its lists); start
  theta 5, k 0; while the score is above tau: theta -= 0.25 (down to 1), k += 1. If theta
  reaches 1 first, the refinement threshold becomes the score reached.
* refinement (neuron_refinement): layers in reverse order, re-enable a whole layer if the score
  stays below the threshold without it; then per listed neuron, in list order, drop its first
  listing if the score stays below (a duplicated neuron stays blocked until its last listing
  goes). Greedy, so each accepted re-enabling stays and the order matters.
* pruning: the selected value-projection output rows are zeroed (the code's hook scales those
  outputs by 0: the same thing), per prompt or for the union over prompts.

Bounded compute: `num_seeds` samples and at most `refinement_budget` score evaluations per
prompt in refinement (None: unlimited, as NeMo; neurons left untested stay pruned).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from memtrain.core.errors import MemtrainError
from memtrain.core import progress
from memtrain.core.run import gather_in_order, shard, shard_chunks
from memtrain.mitigations.base import (
    PruningMitigation, json_tensor, register_mitigation, tensor_json,
)
from memtrain.core.text import encode_prompts
from memtrain.metrics.ms_ssim import max_pairwise_ssim, pairwise_ms_ssim
from memtrain.metrics.signals import (
    NOISE_MODES, SSIM_RANGES, detection_latents, nemo_memorization_score, prompt_noise_diffs,
)
from memtrain.mitigations.nemo_neurons import (
    Probe, activation_profile, candidate_neurons, make_probe, value_layers, without,
)
from memtrain.mitigations.nemo_stats import load_statistics, save_statistics

TAU_MEM = 0.428
TAU_MEM_STRONG = 0.288
LAYER_SCOPES = ("down_mid", "all")


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
    refinement_budget: int | None = 500  # None: unlimited, as NeMo refines
    layers: str = "down_mid"
    batch_size: int = 16
    # per-neuron activation statistics: memtrain's safetensors cache or NeMo's published
    # torch.save file (mean_list, std_list); loaded when it exists, else computed once from the
    # reference prompts and written there (a .pt/.pth name in NeMo's format)
    statistics: str | None = None
    # the detection draw: "official" = one randn batch from seed 1 (NeMo's code), "per_seed" =
    # one generator per audit seed (the audit's own initial noise)
    noise: str = "official"
    # MS-SSIM's data range: "batch" = torchmetrics' data_range=None (the call's range, per
    # scale; NeMo's call), "fixed" = 1.0
    ssim_range: str = "batch"

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
        if self.noise not in NOISE_MODES:
            raise MemtrainError(f"nemo: noise must be one of {', '.join(NOISE_MODES)}, got '{self.noise}'")
        if self.ssim_range not in SSIM_RANGES:
            raise MemtrainError(f"nemo: ssim_range must be one of {', '.join(SSIM_RANGES)}, "
                                f"got '{self.ssim_range}'")

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
                "(audit: --reference_manifest M; computed once and cached when mitigation_settings.nemo.statistics "
                "names a file) or set mitigation_settings.nemo.statistics to a saved statistics file"
                + (f" ('{cached}' does not exist)" if cached is not None else "")
            )
        self._tau_used = self._threshold(bundle, layers, list(reference_prompts), seeds)
        # each prompt is localized on its own, so sharding them changes nothing but the time
        local, mine = [], shard(memorized_prompts, self.processes)
        for done, (i, p) in enumerate(mine, 1):
            local.append((i, self._localize(bundle, layers, p, seeds)))
            progress.note(f"nemo: localized {done}/{len(mine)} prompts")
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
        mine = shard(reference_prompts, self.processes)
        for done, (index, prompt) in enumerate(mine, 1):
            diffs = self._probe(bundle, layers, prompt, seeds).noise_diff()
            local.append((index, pairwise_ms_ssim(diffs, SSIM_RANGES[self.ssim_range])[1].cpu()))
            progress.note(f"nemo: tau_mem from {done}/{len(mine)} reference prompts")
        scores = torch.cat(gather_in_order(local, self.processes))
        sign = 1.0 if self.tau_mem == "auto" else -1.0
        return float(scores.mean() + sign * scores.std())

    def _probe(self, bundle, layers, prompt: str | torch.Tensor, seeds) -> Probe:
        embedding = encode_prompts(bundle, [prompt]).embeddings if isinstance(prompt, str) else prompt
        shape = (bundle.latent_channels, bundle.sample_size, bundle.sample_size)
        latents = detection_latents(self.noise, list(seeds), shape)
        return make_probe(bundle, layers, embedding, latents, self.num_inference_steps,
                           self.timestep_index, self.batch_size, SSIM_RANGES[self.ssim_range])

    def _signal_settings(self, bundle) -> dict:
        value_layers(bundle.unet, self.layers, bundle.source)  # a U-Net NeMo cannot read fails here
        return dict(noise=self.noise, num_inference_steps=self.num_inference_steps,
                    timestep_index=self.timestep_index, batch_size=self.batch_size)

    def noise_diffs(self, bundle, prompt: str, seeds: list[int]) -> torch.Tensor:
        """(S, C, H, W) NeMo's min-max scaled noise differences of one prompt, unblocked
        (memtrain.metrics.signals.prompt_noise_diffs with this instance's settings)."""
        return prompt_noise_diffs(bundle, prompt, list(seeds), **self._signal_settings(bundle))

    def memorization_score(self, bundle, prompt: str, seeds: list[int]) -> float:
        """NeMo's detection score of one prompt (memtrain.metrics.signals.nemo_memorization_score
        with this instance's settings)."""
        return nemo_memorization_score(bundle, prompt, list(seeds), ssim_range=self.ssim_range,
                                       **self._signal_settings(bundle))

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
        pairwise = max_pairwise_ssim(unblocked, probe.data_range)
        samples = [i for i, score in enumerate(pairwise.tolist()) if score > tau]
        # the audit seeds looked at; with the official draw, indices into its batch
        labels = list(seeds) if self.noise == "per_seed" else list(range(len(seeds)))
        record = {"memorization_score": float(pairwise.max()), "memorized": bool(samples),
                  "seeds_looked_at": [labels[i] for i in samples], "initial": {}, "refined": {},
                  "initial_score": None, "refined_score": None, "evaluations": 1,
                  "budget_exhausted": False}
        if not samples:
            return record
        reference = unblocked[samples]
        embedding = probe.embedding.to(bundle.device, bundle.dtype)
        activation = {n: a[0] for n, a in activation_profile(layers, embedding).items()}
        initial, score, threshold = self._initial_selection(probe, reference, samples, activation)
        refined, exhausted = self._refine(probe, reference, samples, initial, threshold)
        record.update(
            # initial: as NeMo lists it (order, duplicates); refined: the pruned set, sorted
            initial=_nonempty(initial), initial_score=score,
            refined={layer: sorted(set(rows)) for layer, rows in _nonempty(refined).items()},
            refined_score=probe.score(reference, refined, samples),
            refinement_threshold=threshold, evaluations=probe.evaluations,
            budget_exhausted=exhausted,
        )
        return record

    def _initial_selection(self, probe, reference, seeds, activation):
        tau, theta, k = self._tau_used, float(self.initial_theta), int(self.initial_k)
        max_k = max(a.numel() for a in activation.values())
        while True:
            blocked = candidate_neurons(activation, self._mean, self._std, theta, k)
            score = probe.score(reference, blocked, seeds)
            if score > tau:
                if theta > self.min_theta:
                    theta = max(theta - self.theta_step, self.min_theta)
                k += 1
            # checked after every try, as in 3_detect_memorized_neurons.py: at the floor (or a
            # start at it) the refinement threshold becomes the score reached
            if theta <= self.min_theta or k >= max_k:
                return blocked, score, score
            if score <= tau:
                return blocked, score, tau

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
                trial = without(blocked, layer)
                if probe.score(reference, trial, seeds) < threshold:
                    blocked = trial
        for layer in reversed(list(blocked)):  # 2) single neurons
            for neuron in list(blocked[layer]):
                if spent():
                    return blocked, True
                trial = without(blocked, layer, neuron)
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
        return self.restricted_to(prompts, self._records, "neurons were localized")

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


def _nonempty(blocked: dict) -> dict:
    return {layer: list(rows) for layer, rows in blocked.items() if rows}
