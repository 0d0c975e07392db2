"""The mitigation interface: one small protocol every mitigation implements.

The audit, the attack and the trainer only talk to `Mitigation`: they call `prepare` once
(statistics on memorized/reference prompts), `apply`/`undo` around generation (weight edits),
`encode` (or `tokenizer` + `transform_embeddings` for an adversarial embedding) on the text
path, and `describe` for reports. None of them special-cases a mitigation by name.

Weight edits are kept as index sets plus the original values they overwrote, so `undo`
restores the weights bit for bit (no re-loading, no arithmetic on the weights).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from pathlib import Path
from typing import Callable, ClassVar, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from memtrain.core.config import build
from memtrain.core.errors import MemtrainError
from memtrain.core.registry import Registry
from memtrain.core.text import TextEmbedding, TokenLayout, encode_prompts

# every mitigation by its `name` (get_mitigation, the audit's --mitigations)
MITIGATIONS = Registry("mitigation", key=lambda cls: cls.name, sort_names=True)

# What the attacker can touch: `weights` (has the released weights and runs their own
# sampler), `embedding` (feeds text embeddings through the deployed pipeline), `prompt` (types text).
THREAT_MODELS = ("weights", "embedding", "prompt")


def register_mitigation(cls: type["Mitigation"]) -> type["Mitigation"]:
    """Class decorator: make `cls` reachable by `get_mitigation(cls.name)`."""
    return MITIGATIONS.register(cls)


def available_mitigations() -> list[str]:
    """The registered mitigation names that run with their default settings, sorted (`--mitigation
    all`); those whose settings must name an input first (edited_weights: a model folder) are left out."""
    return [name for name in MITIGATIONS.names() if not MITIGATIONS[name].needs_settings]


def mitigation_class(name: str) -> type["Mitigation"]:
    """The registered class for a name (case and '-' ignored); unknown -> lists the known ones."""
    return MITIGATIONS[name]


def get_mitigation(name: str, **settings) -> "Mitigation":
    """A fresh mitigation by registry name with its typed settings (the class's init fields),
    checked like a recipe section: an unknown key or a wrong type is a MemtrainError naming
    `mitigations.<name>.<key>`. Needs no model, so recipes are validated before one loads."""
    cls = mitigation_class(name)
    return build(cls, dict(settings), prefix=f"mitigations.{cls.name}")


# --- plain-tensor (de)serialisation of small metadata -------------------------------------------

def json_tensor(obj) -> torch.Tensor:
    """JSON as a uint8 tensor, so metadata travels in safetensors files with the masks."""
    return torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)


def tensor_json(tensor: torch.Tensor):
    """The JSON a json_tensor holds."""
    return json.loads(bytes(tensor.to(torch.uint8).tolist()).decode("utf-8"))


# --- the interface ------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class Mitigation:
    """Base class: identity on every path. Subclasses are dataclasses whose init fields are
    their settings (reported by `describe`)."""

    name: ClassVar[str] = ""
    changes: ClassVar[str] = ""  # one sentence: "text-embedding path: ..." / "U-Net weights: ..."
    # Which reading of the method runs, where a setting selects between the paper, its official
    # code and memtrain's own ("official (DCR)", "whole_words", ...); "" when the registry name
    # is the whole story. Subclasses may make it a property of their settings. Reported per row.
    variant: ClassVar[str] = ""
    # True when it acts at generation time (text path, sampler, forward pass), not in the weights:
    # an attacker holding the weights simply runs a sampler without it.
    inference_time: ClassVar[bool] = False
    # False for prompt-string transforms: an attacker feeding embeddings never passes through them.
    sees_embeddings: ClassVar[bool] = True
    # True when it optimizes at generation time by design (Wen et al.): its sampling overhead is
    # reported, not held to the 5% target of the others.
    optimizes_at_generation: ClassVar[bool] = False
    # True when its settings must name an input (a model folder) before it means anything: left
    # out of available_mitigations(), so of `--mitigation all` and of the round trips over all
    needs_settings: ClassVar[bool] = False
    # the accelerator `prepare` spreads its work over (spread_over); None: this process does all
    processes: ClassVar[object] = None

    @classmethod
    def setting_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.init]

    def settings(self) -> dict:
        return {name: getattr(self, name) for name in self.setting_names()}

    # lifecycle ---------------------------------------------------------------------------------
    def spread_over(self, accelerator) -> "Mitigation":
        """Let `prepare` split its per-prompt work over the accelerate processes and gather the
        results, so every process ends up prepared alike (every process must then call
        `prepare`). Mitigations whose preparation is cheap ignore it."""
        self.processes = accelerator
        return self

    def prepare(self, bundle, memorized_prompts: list[str], reference_prompts: list[str],
                seeds: list[int]) -> None:
        """Collect whatever statistics the mitigation needs; no-op by default."""

    def apply(self, bundle) -> None:
        """Edit the bundle in place (weights); no-op for text-path mitigations."""

    def undo(self, bundle) -> None:
        """Restore exactly what `apply` changed."""

    def for_prompts(self, prompts: list[str]) -> "Mitigation":
        """The mitigation restricted to these prompts (per-prompt pruning); prompt-agnostic
        mitigations return themselves."""
        return self

    # threat models -----------------------------------------------------------------------------
    def threat_model_reason(self, threat_model: str) -> str | None:
        """Why `threat_model` does not apply to this mitigation, or None when it does."""
        if threat_model not in THREAT_MODELS:
            raise MemtrainError(f"unknown threat model '{threat_model}': choose one of {', '.join(THREAT_MODELS)}")
        if threat_model == "embedding" and not self.sees_embeddings:
            return (f"'{self.name}' rewrites the prompt string, which an attacker feeding text embeddings never "
                    f"passes through: audit it under 'prompt' (or 'weights')")
        return None

    def bypassed_by(self, threat_model: str) -> bool:
        """True when an attacker of this kind skips the mitigation for free (no attack needed)."""
        return threat_model == "weights" and self.inference_time

    # text path ---------------------------------------------------------------------------------
    def transform_prompts(self, prompts: list[str], tokenizer) -> list[str]:
        """Rewrite prompt strings before `tokenizer` sees them (random-token insertion, ...);
        identity by default. Deterministic per prompt, so a rewrite never depends on the batch."""
        return list(prompts)

    def tokenizer(self, bundle):
        """The tokenizer prompts are encoded with."""
        return bundle.tokenizer

    def transform_embeddings(self, embeddings: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Map (B, L, D) text embeddings to what the U-Net sees. Must stay differentiable: the
        attack backpropagates through it to an adversarial embedding."""
        return embeddings

    def encode(self, bundle, prompts: list[str] | str) -> TextEmbedding:
        """Prompts -> the conditioning the mitigated model sees."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        raw = encode_prompts(bundle, self.transform_prompts(prompts, self.tokenizer(bundle)),
                             tokenizer=self.tokenizer(bundle))
        transformed = self.transform_embeddings(raw.embeddings, raw.layout)
        return TextEmbedding(embeddings=transformed, input_ids=raw.input_ids, layout=raw.layout)

    def unconditional(self, bundle) -> torch.Tensor:
        """The embedding of "" for classifier-free guidance: encoded with this mitigation's
        tokenizer (a pipeline uses one tokenizer for both branches) but not transformed, since
        the text-path mitigations target the prompt's <eot>/<pad> embeddings, not the null
        branch."""
        return encode_prompts(bundle, [""], tokenizer=self.tokenizer(bundle)).embeddings

    def search_space(self, unet) -> dict[str, torch.nn.Module]:
        """The U-Net layers whose weights this mitigation chooses from ({} for text-path ones).
        Zeroing all of them bounds what any selection of the method could remove."""
        return {}

    def unet_forward(self, bundle) -> Callable | None:
        """A replacement U-Net call for `sample(unet_forward=...)`; None keeps the plain call.
        Extension point for mitigations acting inside the forward pass."""
        return None

    def attack_forward(self, bundle) -> Callable | None:
        """The U-Net call the attack's loss goes through (single timesteps, no trajectory): the
        mitigation's `unet_forward` unless that only makes sense inside a sampling trajectory."""
        return self.unet_forward(bundle)

    def guidance_hook(self, bundle, settings) -> Callable | None:
        """A per-step hook for `sample(hook=...)` (memtrain.core.sampling.GuidanceHook) that may
        change the guidance scale per image and step; None keeps the sampler's. A fresh hook per
        call: hooks may keep per-trajectory state."""
        return None

    def text_timesteps(self, num_train_timesteps: int) -> tuple[int, int] | None:
        """The [lo, hi) training timesteps at which the mitigated sampler still uses the text
        condition, when that is fixed in advance (the adaptive attack spends its budget there);
        None when the text is used at every step or when it depends on the trajectory."""
        return None

    def sampling_kwargs(self, bundle, settings) -> dict:
        """The keyword arguments of `sample` that make it the mitigated sampler: the null-branch
        embedding, the U-Net call and the guidance hook. Every caller samples through this."""
        return {"uncond": self.unconditional(bundle), "unet_forward": self.unet_forward(bundle),
                "hook": self.guidance_hook(bundle, settings)}

    # reports and persistence -------------------------------------------------------------------
    def details(self) -> dict:
        """What prepare found (selected neurons, pruned fractions, ...); {} by default."""
        return {}

    def describe(self) -> dict:
        return {"name": self.name, "changes": self.changes, "settings": self.settings(),
                "inference_time": self.inference_time, **self.details()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors (safetensors-compatible) holding what prepare computed."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise MemtrainError(f"mitigation '{self.name}' keeps no state, got {sorted(state)}")

    def save(self, path: str | Path) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"mitigation": self.name, "settings": json.dumps(self.settings())}
        save_file(state, str(path), metadata=meta)

    def load(self, path: str | Path) -> None:
        with safe_open(str(path), framework="pt") as f:
            saved_name = (f.metadata() or {}).get("mitigation")
        if saved_name not in (None, self.name):
            raise MemtrainError(
                f"'{path}' holds the state of mitigation '{saved_name}', not '{self.name}'"
            )
        self.load_state_dict(load_file(str(path)))


@dataclasses.dataclass(eq=False)
class PruningMitigation(Mitigation):
    """A mitigation that zeroes U-Net weight entries chosen in `prepare`.

    Subclasses implement `pruning_targets(unet)` -> [(module name, parameter name, flat index)].
    `apply` saves the overwritten values and `undo` writes them back, bit-identically.
    """

    _saved: list = dataclasses.field(default_factory=list, init=False, repr=False)

    def pruning_targets(self, unet) -> list[tuple[str, str, torch.Tensor]]:
        raise NotImplementedError

    @property
    def is_applied(self) -> bool:
        return bool(self._saved)

    @torch.no_grad()
    def apply(self, bundle) -> None:
        if self._saved:
            raise MemtrainError(f"mitigation '{self.name}' is already applied: undo it first")
        modules = dict(bundle.unet.named_modules())
        for module_name, param_name, flat_index in self.pruning_targets(bundle.unet):
            param = getattr(modules[module_name], param_name)
            flat = param.data.view(-1)  # a view: writes land in the parameter
            index = flat_index.to(device=flat.device, dtype=torch.long)
            self._saved.append((param, index, flat[index].clone()))
            flat[index] = 0

    @torch.no_grad()
    def undo(self, bundle) -> None:
        # reverse order so overlapping edits restore the oldest value last
        for param, index, values in reversed(self._saved):
            param.data.view(-1)[index] = values
        self._saved.clear()

    def restricted_to(self, prompts: list[str], prepared, what: str) -> "PruningMitigation":
        """A copy that prunes only what `prompts` selected (`prepared`: the prompts it has
        selections for, `what` names them in the error), not applied yet."""
        missing = [p for p in prompts if p not in prepared]
        if missing:
            raise MemtrainError(f"{self.name}: no {what} for prompt '{missing[0]}'")
        restricted = copy.copy(self)
        restricted._saved = []
        restricted._active = list(prompts)
        return restricted


@dataclasses.dataclass(eq=False)
class SearchSpaceAblation(PruningMitigation):
    """Every weight of a pruning mitigation's search space set to zero (not registered: a
    diagnostic). If the prompts still replicate with all of it gone, memorization on this model
    does not live there, so no selection inside it can hide the images."""

    name = "search_space_ablation"
    changes = "U-Net weights: every weight of the named layers is set to zero"
    layers: tuple = ()

    def pruning_targets(self, unet):
        modules = dict(unet.named_modules())
        return [(name, "weight", torch.arange(modules[name].weight.numel())) for name in self.layers]

    def num_weights(self, unet) -> int:
        modules = dict(unet.named_modules())
        return sum(modules[name].weight.numel() for name in self.layers)


def search_space_ablation(mitigation: Mitigation, unet) -> SearchSpaceAblation | None:
    """The ablation of `mitigation`'s whole search space, or None when it edits no weights."""
    layers = mitigation.search_space(unet)
    return SearchSpaceAblation(layers=tuple(layers)) if layers else None


@contextlib.contextmanager
def applied(mitigation: Mitigation, bundle) -> Iterator[Mitigation]:
    """`with applied(m, bundle): ...` runs the block on the mitigated bundle, then undoes."""
    mitigation.apply(bundle)
    try:
        yield mitigation
    finally:
        mitigation.undo(bundle)


@register_mitigation
@dataclasses.dataclass(eq=False)
class NoMitigation(Mitigation):
    """The unmitigated model (the audit's baseline row)."""

    name = "none"
    changes = "nothing: the model and its text path are used as loaded"
