"""The audit's settings: the command line's (AuditConfig) and the per-model recipe (AuditRecipe,
YAML through memtrain.core.config), both checked before any model loads."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from memtrain.attack import PROMPT_ATTACKS, AttackConfig, GCGSettings
from memtrain.core.bundle import ModelDefaults
from memtrain.core.cli import option, section
from memtrain.core.command_line import CommandLine, merge
from memtrain.core.config import apply_overrides, build, packaged_recipe, read_yaml
from memtrain.core.errors import MemtrainError
from memtrain.core.journal import file_digests
from memtrain.core.memory import folder_plan
from memtrain.core.options import MetricOptions, ModelOptions, OutputOptions
from memtrain.core.sampling import SamplerOverrides, SamplerSettings
from memtrain.eval.audit.verdict import VerdictRule
from memtrain.metrics import MR_THRESHOLD
from memtrain.mitigations import THREAT_MODELS, Mitigation, available_mitigations, get_mitigation, mitigation_class

MODEL_RECIPE = "audit_sd14.yaml"  # a checkpoint that brings no recipe of its own: paper 004's defaults
SEARCH_SPACE_CHECKS = ("ineffective", "always", "never")
# The control's attack streams are named CONTROL_STREAM + held-out index, so they never share
# noise with a target's stream whatever the number of targets.
CONTROL_STREAM = 1_000_000
FULL_BUDGET = "full"
# What a named budget may set: how much work the audit does, never what it measures.
BUDGET_KEYS = ("seeds", "max_targets", "control_targets", "reference_prompts", "utility_prompts",
               "robustness_budgets", "search_space_check")


@dataclass
class AuditRecipe:
    """Per-model audit settings (recipes/audit_*.yaml)."""

    seeds: int = 10  # generations per input (seeds 0..N-1)
    threshold: float = MR_THRESHOLD  # SSCD_Orig above this in any seed = replicated
    max_targets: int | None = None  # the first N memorized targets (None: all)
    control_targets: int | None = None  # held-out images in the control (None: as many as targets)
    reference_prompts: int | None = 64  # non-memorized prompts for NeMo's statistics etc.
    utility_prompts: int | None = 16  # FID/KID prompts (None: the whole utility manifest)
    chunk_targets: int = 16  # targets per work unit (one batched attack each); fixed => same figures for any world size
    prune_per_prompt: bool = False  # prune per memorized prompt (NeMo's protocol) instead of their union
    # Re-measure the prompts with a pruning mitigation's whole search space zeroed: is memorization
    # outside the layers it prunes, or did its selection miss it? "ineffective" (only for that
    # verdict), "always" or "never".
    search_space_check: str = "ineffective"
    attack: AttackConfig = section(AttackConfig, "the Dori attack")
    # The attack under the `prompt` threat model (same loss and budget as `attack`): pez (PEZ-style
    # projected gradients) or gcg (UnlearnDiffAtk's objective with GCG token swaps, settings in `gcg`).
    prompt_attack: str = option("pez", "the attack under the prompt threat model: pez or gcg")
    gcg: GCGSettings = section(GCGSettings, "GCG's search per step (prompt_attack gcg)")
    # Against a mitigation that uses the text only at known timesteps (guidance_static), spend the
    # attack's budget on those timesteps (the adaptive variant); reports say which variant ran.
    adaptive_attack: bool = True
    # Robustness curve: MR under attack (and of the control) after each of these attack budgets
    # (steps), from the one attack run; [] skips it. Paper 004: NeMo is back at MR 0.73 after 1 step.
    robustness_budgets: list = field(default_factory=list)
    sampler: SamplerOverrides = section(SamplerOverrides, "changes to the model's sampler", flat=True)
    mitigation_settings: dict = field(default_factory=dict)  # name -> that mitigation's typed settings
    verdict: VerdictRule = field(default_factory=VerdictRule)
    grid_items: int = 8  # targets shown in the grids
    grid_cell: int = 96
    # The chosen budget's keys replace the recipe's and the command line's keys replace both
    # (`budget_base`): `--budget full` is the one flag between a quick first audit and the paper's.
    budget: str = option(FULL_BUDGET, "how much work: a name from the recipe's `budgets` (the testbed's: quick), "
                                      "or full (the recipe's own seeds, targets and robustness curve)")
    budgets: dict = field(default_factory=dict, metadata={
        "help": "named budgets: name -> the recipe keys it sets (seeds, max_targets, ...)"})

    def __post_init__(self) -> None:
        if FULL_BUDGET in self.budgets:
            raise MemtrainError(f"recipe key 'budgets.{FULL_BUDGET}': '{FULL_BUDGET}' is the recipe's own values; "
                                "name the budget otherwise")
        if self.budget != FULL_BUDGET and self.budget not in self.budgets:
            known = ", ".join([FULL_BUDGET, *self.budgets])
            raise MemtrainError(f"unknown budget '{self.budget}': choose one of {known}")
        for name, keys in self.budgets.items():
            if not isinstance(keys, dict):
                raise MemtrainError(f"recipe key 'budgets.{name}' must map recipe keys to values, got {keys!r}")
            bad = sorted(set(keys) - set(BUDGET_KEYS))
            if bad:
                raise MemtrainError(f"recipe key 'budgets.{name}': not a budget key: {', '.join(bad)} "
                                    f"(a budget may set {', '.join(BUDGET_KEYS)})")
        positive = {"seeds": self.seeds, "chunk_targets": self.chunk_targets, "grid_cell": self.grid_cell}
        optional = {"max_targets": self.max_targets, "control_targets": self.control_targets,
                    "reference_prompts": self.reference_prompts, "utility_prompts": self.utility_prompts}
        for key, value in {**positive, **{k: v for k, v in optional.items() if v is not None}}.items():
            if value < 1:
                raise MemtrainError(f"recipe key '{key}' must be >= 1, got {value}")
        if not 0 < self.threshold <= 1:
            raise MemtrainError(f"recipe key 'threshold' must be in (0, 1], got {self.threshold}")
        if self.search_space_check not in SEARCH_SPACE_CHECKS:
            raise MemtrainError(f"recipe key 'search_space_check' must be one of {', '.join(SEARCH_SPACE_CHECKS)}, "
                                f"got {self.search_space_check!r}")
        for budget in self.robustness_budgets:
            if not isinstance(budget, int) or budget < 1:
                raise MemtrainError(f"recipe key 'robustness_budgets': every attack budget must be an integer >= 1, "
                                    f"got {budget!r}")
        if self.grid_items < 0:
            raise MemtrainError(f"recipe key 'grid_items' must be >= 0, got {self.grid_items}")
        if self.prompt_attack not in PROMPT_ATTACKS:
            raise MemtrainError(f"recipe key 'prompt_attack': unknown attack '{self.prompt_attack}': choose one of "
                                f"{', '.join(PROMPT_ATTACKS)}")
        if self.attack.init == "alternate":
            raise MemtrainError("recipe key 'attack.init': 'alternate' is the fine-tuner's schedule; "
                                "an audit starts from prompt, random or other_prompt")
        for name, settings in self.mitigation_settings.items():
            try:
                mitigation_class(name)
            except MemtrainError as err:
                raise MemtrainError(f"recipe key 'mitigation_settings.{name}': {err}") from None
            if not isinstance(settings, dict):
                raise MemtrainError(f"recipe key 'mitigation_settings.{name}' must be a mapping of settings")
            get_mitigation(name, **settings)  # typed: a wrong key or type fails here, no model needed

    def mitigation(self, name: str) -> Mitigation:
        """A fresh mitigation with this recipe's settings for it."""
        key = mitigation_class(name).name
        return get_mitigation(key, **self.mitigation_settings.get(key, {}))


def load_audit_recipe(path: str | Path, overrides: Sequence[str] = ()) -> AuditRecipe:
    """YAML -> AuditRecipe; unknown keys and wrong types are one-line errors naming the key."""
    return build(AuditRecipe, apply_overrides(read_yaml(path), list(overrides)))


@dataclass(kw_only=True)
class AuditConfig(ModelOptions, OutputOptions, MetricOptions, AuditRecipe):
    """What to audit. The audit's whole config: the shared model/output/metric options, these
    fields, and the per-model settings (AuditRecipe) whose defaults come from the model's recipe
    (`audit_config`)."""

    mitigations: list[str] = option(dataclasses.MISSING, "mitigations to audit (none, nemo, wanda, pad_eot, "
                                    "pad_mask, guidance_static, rta, ..., or all)", "--mitigation")
    threat_models: list[str] | None = option(None, "weights, embedding, prompt (default: every one that applies "
                                                   "to each mitigation)", "--threat_model")
    manifest: str | None = option(None, "memorized targets (id, prompt, image); default: the model's memorized set")
    control_manifest: str | None = option(None, "held-out images for the false-positive control; default: the "
                                                "model's held_out set")
    reference_manifest: str | None = option(None, "non-memorized prompts (NeMo statistics); default: the model's "
                                                  "unique set")
    utility_manifest: str | None = option(None, "prompts + images for FID/KID; default: the model's utility set")
    project: str | None = option("memtrain-audit", "tracker project name")
    recipe_path: str | None = dataclasses.field(default=None, init=False, repr=False)  # where the settings came from

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.mitigations:
            raise MemtrainError("name at least one mitigation (--mitigation none nemo ...)")
        for threat in self.threat_models or ():
            if threat not in THREAT_MODELS:
                raise MemtrainError(f"unknown --threat_model '{threat}': choose one of {', '.join(THREAT_MODELS)}")
        build_mitigations(self.mitigations, self)  # unknown names fail here, listing the known ones

    def check_files(self) -> None:
        """What the config names on disk: the output folder and the manifests (before any model loads)."""
        self.check_output(self.manifest, self.control_manifest, self.reference_manifest, self.utility_manifest)


def model_recipe(defaults: ModelDefaults, recipe: str | Path | None = None) -> Path:
    """The per-model settings file: `recipe` if given, else the model's own, else paper 004's."""
    if recipe is not None:
        return Path(recipe)
    if defaults.audit_recipe:
        return Path(defaults.audit_recipe)
    return packaged_recipe(MODEL_RECIPE)


def budget_base(settings: dict, make) -> AuditConfig:
    """make(base) -> config, built over the recipe's `settings` and again over them with the chosen
    budget's keys when that budget is not the full one (so the caller's own keys still win)."""
    config = make(copy.deepcopy(settings))  # merge() writes into its first argument
    if config.budget != FULL_BUDGET:
        config = make(merge(copy.deepcopy(settings), config.budgets[config.budget]))
    return config


def budget_text(recipe: AuditRecipe, n_targets: int | None = None) -> str:
    """One line: which budget runs, what it amounts to, and how to get the full one."""
    targets = n_targets if n_targets is not None else (recipe.max_targets or "all")
    curve = f"robustness curve at {recipe.robustness_budgets}" if recipe.robustness_budgets else "no robustness curve"
    text = (f"budget '{recipe.budget}': {targets} targets x {recipe.seeds} seeds, attack {recipe.attack.steps} steps "
            f"x {recipe.attack.noise_samples} noise samples, {curve}")
    if recipe.budget != FULL_BUDGET:
        text += f" (the recipe's full budget: --budget {FULL_BUDGET})"
    return text


def audit_config(defaults: ModelDefaults, values: dict, recipe: str | Path | None = None) -> AuditConfig:
    """The typed way to configure an audit: `values` (config keys, nested as mappings) over the
    model's recipe (`recipe` replaces it) and its chosen budget."""
    path = model_recipe(defaults, recipe)
    config = budget_base(read_yaml(path), lambda base: build(AuditConfig, merge(base, values)))
    config.recipe_path = str(path)
    return config


def config_for_model(line: CommandLine, defaults: ModelDefaults) -> AuditConfig:
    """A command line's config over the model's recipe (a RECIPE.yaml on the line replaces it) and
    its chosen budget."""
    path = model_recipe(defaults, line.recipe)
    line = dataclasses.replace(line, recipe=None)
    config = budget_base(read_yaml(path), lambda base: line.config(AuditConfig, base=base))
    config.recipe_path = str(path)
    return config


def build_mitigations(names: Sequence[str], recipe: AuditRecipe) -> list[Mitigation]:
    """Fresh mitigations with the recipe's settings ("all": every registered one, `none` first);
    an unknown or repeated name is an error."""
    if any(str(n).lower() == "all" for n in names):
        names = ["none"] + [n for n in available_mitigations() if n != "none"]
    seen, out = set(), []
    for name in names:
        m = recipe.mitigation(name)
        if m.name in seen:
            raise MemtrainError(f"mitigation '{m.name}' is named twice")
        seen.add(m.name)
        out.append(m)
    return out


def fingerprint(cfg: AuditConfig, recipe: AuditRecipe, inputs, checksum: str) -> dict:
    """What a resumed audit must share with the interrupted one: the command line (but how it is
    run and shown), the recipe, the model's weights and the bytes of every manifest and image."""
    run_only = ("resume", "overwrite", "progress", "report_to", "project")
    images = [it.image for it in inputs.targets + inputs.control]
    # the budget only sizes batches (round-off, not figures): a resume may run on another card
    run_only += ("max_memory", "plan", "timeout_minutes")
    command = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in run_only and k not in recipe_keys()}
    return {"command": command,
            "recipe": recipe_doc(recipe), "weights": checksum,
            "manifests": file_digests(list(inputs.manifests.values())), "images": file_digests(images)}


def settings_doc(cfg: AuditConfig, recipe: AuditRecipe, inputs, ctx, notes: list[str],
                 seconds: float) -> dict:
    """report.json's `settings`: what ran, on what, with which recipe, and how long it took."""
    return {
        "mitigations": list(cfg.mitigations), "manifests": inputs.manifests,
        "threat_models": list(cfg.threat_models or THREAT_MODELS), "adaptive_attack": recipe.adaptive_attack,
        "n_targets": len(inputs.targets), "n_control": len(inputs.control),
        "n_reference_prompts": len(inputs.reference_prompts), "seeds": ctx.seeds, "threshold": recipe.threshold,
        "sampler": ctx.settings.to_dict(), "attack": dataclasses.asdict(ctx.attack),
        "control_attack_streams": f"seed {ctx.attack.seed}, indices {CONTROL_STREAM} + held-out index",
        "verdict_rule": dataclasses.asdict(recipe.verdict), "recipe_path": inputs.recipe_path,
        "recipe": recipe_doc(recipe), "budget": budget_text(recipe, len(inputs.targets)),
        "metric_is_standin": ctx.descriptor.name.startswith("standin"),
        "device": str(ctx.bundle.device), "dtype": str(ctx.bundle.dtype).replace("torch.", ""), "seconds": round(seconds, 1), "notes": notes,
        "output_dir": str(inputs.output_dir.absolute()),
    }


def audit_stages(settings, recipe: AuditRecipe) -> dict[str, int]:
    """What each of the audit's model stages asks for: sampling batches (and their decode), the
    targets of one chunk through the VAE, the attack's rows per forward."""
    return {"generation": settings.batch_size, "vae_decode": settings.batch_size,
            "vae_encode": recipe.chunk_targets, "attack": recipe.attack.max_batch}


def audit_plan(cfg: AuditConfig, defaults: ModelDefaults) -> dict:
    """`--plan`: the batch sizes and estimated peaks for this model, dtype and budget, from the
    model folder's configs on the meta device (no weights read, nothing written)."""
    settings = SamplerSettings.for_model(defaults.model_dir).with_overrides(cfg.sampler)
    return folder_plan(defaults.model_dir, cfg.runtime, audit_stages(settings, cfg))


def recipe_keys() -> tuple[str, ...]:
    """The per-model settings' keys (AuditRecipe's fields)."""
    return tuple(f.name for f in dataclasses.fields(AuditRecipe))


def recipe_doc(config: AuditRecipe) -> dict:
    """The per-model settings of a config, as report.json's `settings.recipe` lists them."""
    return {key: dataclasses.asdict(config)[key] for key in recipe_keys()}
