"""Wanda as ConceptPrune applies it to memorization (Chavhan et al. 2024; paper 004 App. H).

Layers: the second linear layer of every transformer block's feed-forward network (`ff.net.2`
in diffusers' BasicTransformerBlock; all 16 of SD1.x's, down, mid and up). Our reading of
ruchikachavhan/concept-prune, re-implemented here:

* activations (neuron_receivers/wanda_receiver.py, hook_fn): the input X of ff.net.2 (the GEGLU
  output) at every U-Net call of the pipeline, i.e. both halves of the CFG batch; each token's
  feature vector is L2-normalized first ("to avoid inf values"); per (timestep, layer) the
  column norms ||X_j|| are accumulated over all tokens, prompts and calls (utils/base_utils.py,
  ColumnNormCalculator: sqrt of summed squares).
* the two prompt sets (utils/prompts.py, target "memorize"): the memorized prompts, and the null
  string "" once per memorized prompt (same seed), so both sets hold equally many tokens.
* scores (wanda/wanda.py): S = |W_ij| * ||X_j|| for both sets; per output row i, the top
  int(sparsity * in_features) columns by the memorized score, kept only where the memorized
  score beats the null-string score (|W| >= 0, so: where ||X_j|| is larger for the memorized
  prompts).
* time (wanda/save_union_over_time.py with --timesteps 10 --select_ratio 0.0, as in the
  memorization scripts): the per-timestep masks of the first 10 denoising steps are OR-ed; the
  masked weights are set to zero. So the pruned fraction is <= sparsity per timestep but may
  exceed it after the union (aggregate="union", the default and what paper 004 ran).
* aggregate="pooled" (our variant): column norms pooled over the 10 steps first, then per row
  the top-k among the columns where the memorized norm beats the null norm, so the pruned
  fraction is exactly int(sparsity * in) / in whenever enough columns qualify.

Scheduler: `scheduler: pndm` runs SD v1's own PNDM (PLMS steps, 50), as ConceptPrune's pipelines
do, so the first 10 U-Net calls are at t = 981, 961, 961, 941, ..., 821 (PLMS repeats 961); the
SD recipes set it. The default stays "ddim" (t = 981, 961, 941, ..., 801), the papers' sampler.
Seeds come from `prepare` (ConceptPrune: one seed, 0). docs/fidelity.md, "Wanda (ConceptPrune)".
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F

from memtrain.core.errors import MemtrainError
from memtrain.mitigations.base import (
    PruningMitigation, json_tensor, register_mitigation, tensor_json,
)
from memtrain.core.sampling import initial_noise, scheduler_step, step_generators
from memtrain.core.text import encode_prompts

AGGREGATES = ("union", "pooled")
SCOPES = ("all", "per_prompt")


def ffn_output_layers(unet, model_name: str = "") -> dict[str, torch.nn.Linear]:
    """Every transformer block's `ff.net.2` (the FFN's second linear layer), sorted by name as
    ConceptPrune orders them."""
    found = {
        name: module for name, module in unet.named_modules()
        if name.endswith("ff.net.2") and isinstance(module, torch.nn.Linear)
    }
    if not found:
        raise MemtrainError(
            f"Wanda needs transformer feed-forward layers (ff.net.2) in the U-Net, but model "
            f"'{model_name or type(unet).__name__}' has none: it cannot be pruned by Wanda"
        )
    return dict(sorted(found.items()))


@contextlib.contextmanager
def _recording(layers: dict, store: dict, state: dict, normalize: bool, include_uncond: bool):
    """Pre-hooks adding each call's squared column norms of X into store[layer][step] (C,).

    The store's tensors live on the layers' device: a host copy in the hook would wait for the
    device at every hooked layer of every U-Net call; the caller reads the sums once at the end."""
    handles = []

    def make_hook(name: str):
        def hook(module, args):
            x = args[0].detach().float()  # (2B, tokens, C): [uncond half; cond half]
            if normalize:
                x = F.normalize(x, dim=-1)
            sq = (x * x).sum(dim=1)  # (2B, C)
            uncond, cond = sq.chunk(2)
            per_job = cond + uncond if include_uncond else cond
            store[name][state["step"]] += per_job.sum(dim=0)
        return hook

    for name, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(make_hook(name)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def wanda_mask(weight_abs: torch.Tensor, norms: torch.Tensor, null_norms: torch.Tensor,
               sparsity: float, aggregate: str) -> torch.Tensor:
    """Bool mask (out, in) of the weights to prune from (T, in) column norms of the memorized
    prompts and of the null string."""
    k = int(sparsity * weight_abs.shape[1])
    mask = torch.zeros_like(weight_abs, dtype=torch.bool)
    if k == 0:
        return mask
    if aggregate == "pooled":
        norms, null_norms = norms.norm(dim=0, keepdim=True), null_norms.norm(dim=0, keepdim=True)
    for step in range(norms.shape[0]):
        score = weight_abs * norms[step]
        beats_null = score > weight_abs * null_norms[step]
        if aggregate == "pooled":
            # rank only the qualifying columns so every row gets its k (when k qualify)
            ranked = score.masked_fill(~beats_null, -1.0)
        else:
            ranked = score
        top = torch.zeros_like(mask).scatter_(1, ranked.topk(k, dim=1).indices, True)
        mask |= top & beats_null
    return mask


@register_mitigation
@dataclasses.dataclass(eq=False)
class Wanda(PruningMitigation):
    """Prune the top-scoring feed-forward output weights for the memorized prompts (ConceptPrune's Wanda)."""

    name = "wanda"
    changes = ("U-Net weights: the top-scoring weights (|W| * ||X||, memorized prompts beating "
               "the null string) of every transformer block's second feed-forward layer "
               "(ff.net.2) are set to zero")

    sparsity: float = 0.01
    timesteps: int = 10
    aggregate: str = "union"  # "union" (ConceptPrune) | "pooled" (exact fraction)
    scope: str = "all"  # "all": one mask from all prompts | "per_prompt": one mask per prompt
    num_seeds: int = 1
    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    scheduler: str = "ddim"
    normalize_tokens: bool = True
    include_uncond: bool = True
    batch_size: int = 8

    _masks: dict = dataclasses.field(default_factory=dict, init=False, repr=False)
    _shapes: dict = dataclasses.field(default_factory=dict, init=False, repr=False)
    _active: list | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 < float(self.sparsity) <= 1.0:
            raise MemtrainError(f"wanda: sparsity must be in (0, 1], got {self.sparsity}")
        if self.aggregate not in AGGREGATES:
            raise MemtrainError(f"wanda: aggregate must be one of {', '.join(AGGREGATES)}")
        if self.scope not in SCOPES:
            raise MemtrainError(f"wanda: scope must be one of {', '.join(SCOPES)}")
        if int(self.timesteps) < 1:
            raise MemtrainError(f"wanda: timesteps must be >= 1, got {self.timesteps}")

    @property
    def variant(self) -> str:  # type: ignore[override]
        """"ConceptPrune (PNDM timesteps)" when selection and timesteps are ConceptPrune's."""
        if self.aggregate == "union" and self.scheduler.lower() == "pndm":
            return "ConceptPrune (PNDM timesteps)"
        return f"{self.aggregate} over the first {self.timesteps} {self.scheduler} steps"

    # prepare -----------------------------------------------------------------------------------
    def prepare(self, bundle, memorized_prompts, reference_prompts, seeds) -> None:
        layers = ffn_output_layers(bundle.unet, bundle.source)
        seeds = [int(s) for s in seeds][: int(self.num_seeds)]
        if not seeds:
            raise MemtrainError("wanda: pass at least one seed")
        if not memorized_prompts:
            raise MemtrainError("wanda: no memorized prompts to prune for")
        self._shapes = {name: tuple(layer.weight.shape) for name, layer in layers.items()}
        null = self._column_sq_norms(bundle, layers, [""], seeds)  # one null run per prompt
        groups = ({"*": list(memorized_prompts)} if self.scope == "all"
                  else {p: [p] for p in memorized_prompts})
        for key, prompts in groups.items():
            target = self._column_sq_norms(bundle, layers, prompts, seeds)
            self._masks[key] = self._selection(layers, target, null, len(prompts))

    def _selection(self, layers, target: dict, null: dict, n_inputs: int) -> dict[str, torch.Tensor]:
        return {
            name: wanda_mask(
                layer.weight.detach().abs().float().cpu(), target[name].sqrt(),
                (null[name] * n_inputs).sqrt(), float(self.sparsity), self.aggregate,
            ).flatten().nonzero().flatten()
            for name, layer in layers.items()
        }

    def select_for_embedding(self, bundle, embedding: torch.Tensor, seeds: list[int]) -> dict[str, torch.Tensor]:
        """The weights (flat indices per layer) Wanda selects for one text embedding (1, L, D),
        e.g. an adversarial one, against the null string; the prepared masks are untouched."""
        layers = ffn_output_layers(bundle.unet, bundle.source)
        seeds = [int(s) for s in seeds][: int(self.num_seeds)]
        null = self._column_sq_norms(bundle, layers, [""], seeds)
        target = self._column_sq_norms(bundle, layers, embedding.reshape(1, *embedding.shape[-2:]), seeds)
        return self._selection(layers, target, null, 1)

    @torch.no_grad()
    def _column_sq_norms(self, bundle, layers, prompts: list[str] | torch.Tensor, seeds: list[int]) -> dict:
        """Per layer (T, C): summed squared column norms of ff.net.2's input over the first T
        denoising steps of every (prompt, seed) run (prompts: strings or embeddings (N, L, D))."""
        steps = int(self.timesteps)
        store = {name: torch.zeros(steps, layer.in_features, device=layer.weight.device)
                 for name, layer in layers.items()}
        state = {"step": 0}
        cond = prompts if isinstance(prompts, torch.Tensor) else encode_prompts(bundle, prompts).embeddings
        cond = cond.to(bundle.device, bundle.dtype)
        uncond = encode_prompts(bundle, [""]).embeddings.to(bundle.device, bundle.dtype)
        jobs = [(i, s) for i in range(len(prompts)) for s in seeds]
        with _recording(layers, store, state, self.normalize_tokens, self.include_uncond):
            for start in range(0, len(jobs), self.batch_size):
                chunk = jobs[start:start + self.batch_size]
                y = cond[torch.tensor([i for i, _ in chunk], device=cond.device)]
                self._first_steps(bundle, y, uncond, [s for _, s in chunk], steps, state)
        return {name: sums.cpu() for name, sums in store.items()}  # one host copy per layer

    def _first_steps(self, bundle, y, uncond, seeds, steps, state) -> None:
        """The sampler's CFG loop, stopped after `steps` U-Net calls."""
        shape = (bundle.latent_channels, bundle.sample_size, bundle.sample_size)
        scheduler = bundle.make_scheduler(self.scheduler)
        scheduler.set_timesteps(int(self.num_inference_steps), device=bundle.device)
        x = torch.stack([initial_noise(s, shape) for s in seeds]).to(bundle.device, bundle.dtype)
        x = x * scheduler.init_noise_sigma
        generators = step_generators(seeds)
        context = torch.cat([uncond.expand(len(seeds), -1, -1), y])
        for step, t in enumerate(scheduler.timesteps[:steps]):
            state["step"] = step
            x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
            out = bundle.unet(x_in, t, encoder_hidden_states=context).sample
            out_uncond, out_cond = out.chunk(2)
            guided = out_uncond + self.guidance_scale * (out_cond - out_uncond)
            x = scheduler_step(scheduler, guided, t, x, generators)

    # pruning -----------------------------------------------------------------------------------
    def masks(self) -> dict[str, torch.Tensor]:
        """Flat indices into each layer's weight, the union over the active prompt groups."""
        keys = list(self._masks) if self._active is None else self._active
        union: dict[str, torch.Tensor] = {}
        for key in keys:
            for name, index in self._masks[key].items():
                union[name] = index if name not in union else torch.cat([union[name], index])
        return {name: torch.unique(index) for name, index in union.items()}

    def search_space(self, unet) -> dict[str, torch.nn.Module]:
        return ffn_output_layers(unet)

    def pruning_targets(self, unet):
        modules = dict(unet.named_modules())
        targets = []
        for name, index in self.masks().items():
            module = modules.get(name)
            if module is None or tuple(module.weight.shape) != self._shapes.get(name):
                raise MemtrainError(
                    f"wanda: the masks do not fit this model (layer '{name}'): were they "
                    "prepared on another model?"
                )
            if len(index):
                targets.append((name, "weight", index))
        return targets

    def for_prompts(self, prompts: list[str]) -> "Wanda":
        if self.scope == "all":
            return self  # one mask for all prompts: it cannot be split per prompt
        return self.restricted_to(prompts, self._masks, "mask was computed")

    # reports and persistence -------------------------------------------------------------------
    def details(self) -> dict:
        masks = self.masks()
        total = sum(out * inp for out, inp in self._shapes.values())
        pruned = {name: len(index) / (self._shapes[name][0] * self._shapes[name][1])
                  for name, index in masks.items()}
        return {
            "layers": list(self._shapes),
            "pruned_fraction": (sum(len(i) for i in masks.values()) / total) if total else 0.0,
            "pruned_fraction_per_layer": pruned,
            "selection": ("per-timestep top-k per output row where the memorized score beats "
                          "the null string, OR-ed over the first timesteps"
                          if self.aggregate == "union" else
                          "column norms pooled over the first timesteps, then top-k per output "
                          "row among the columns where the memorized score beats the null string"),
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        keys = list(self._masks)
        state = {f"mask.{g}.{name}": index for g, key in enumerate(keys)
                 for name, index in self._masks[key].items()}
        state["meta"] = json_tensor({"groups": keys, "shapes": self._shapes,
                                     "active": self._active})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        meta = tensor_json(state["meta"])
        self._shapes = {name: tuple(shape) for name, shape in meta["shapes"].items()}
        self._active = meta.get("active")
        self._masks = {key: {} for key in meta["groups"]}
        for name, index in state.items():
            if name.startswith("mask."):
                group, layer = name[len("mask."):].split(".", 1)
                self._masks[meta["groups"][int(group)]][layer] = index.long()
