"""Removal recipes: YAML -> typed dataclasses for the three removal baselines of paper 004
(Sec. 4.4, App. E.2, G.2): ESD (Gandikota et al. 2023), Concept Ablation (Kumari et al. 2023) and
SISS (Alberti et al. 2025), each a section of its own beside the shared training settings.

Training settings left empty (None) take the method's official value (METHOD_DEFAULTS), so
`memtrain remove RECIPE method=esd` runs ESD as its authors' code does unless the recipe says
otherwise; run_summary.json records the values that ran.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from memtrain.core import config
from memtrain.core.cli import option, section
from memtrain.core.errors import MemtrainError
from memtrain.core.manifest import read_manifest
from memtrain.core.options import ModelOptions, OutputOptions
from memtrain.core.sampling import SamplerOverrides
from memtrain.train.recipe import TESTBED, CheckpointSpec, SurrogateSpec, check_taken_output

METHODS = ("esd", "concept_ablation", "siss")


@dataclass
class RemovalTrainSpec:
    """The optimisation; None takes the method's official value (METHOD_DEFAULTS)."""

    steps: int | None = None  # optimizer steps (per memorized image for siss)
    learning_rate: float | None = None
    batch: int | None = None  # rows per micro-step and process
    gradient_accumulation_steps: int | None = None
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float | None = None
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = None  # 0: no clipping
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    max_steps: int | None = None  # stop after this many optimizer steps (tests, debugging); the schedule is unchanged


# The official code's values (docs/fidelity.md): ESD's CompVis train-esd.py (Adam, no clipping),
# Concept Ablation's memorization command (lr scaled by batch x processes x accumulation), SISS's
# delete_sd.yaml.
METHOD_DEFAULTS = {
    "esd": dict(steps=1000, learning_rate=1e-5, batch=1, gradient_accumulation_steps=1, adam_weight_decay=0.0,
                max_grad_norm=0.0),
    "concept_ablation": dict(steps=400, learning_rate=5e-7, batch=2, gradient_accumulation_steps=1,
                             adam_weight_decay=1e-2, max_grad_norm=1.0),
    "siss": dict(steps=35, learning_rate=1e-5, batch=1, gradient_accumulation_steps=16, adam_weight_decay=1e-2,
                 max_grad_norm=1.0),
}


@dataclass
class EsdSpec:
    """ESD: the memorized prompt's noise prediction trained toward negatively guided noise of a
    frozen copy, at x_t partially sampled by the trained model."""

    # xattn (ESD-x): the cross-attention (attn2) weights; noxattn (ESD-u): all but attn2, the
    # time embedding and the output layers; esd-x / esd-u: the same, by the diffusers script's names
    train_method: Literal["xattn", "noxattn", "esd-x", "esd-u"] = "xattn"
    negative_guidance: float = 1.0  # eta
    start_guidance: float = 3.0  # guidance of the partial sampling that reaches x_t
    ddim_steps: int = 50  # DDIM steps of that sampling (t is drawn among them)

    @property
    def method(self) -> str:
        """xattn or noxattn."""
        return {"esd-x": "xattn", "esd-u": "noxattn"}.get(self.train_method, self.train_method)


@dataclass
class ConceptAblationSpec:
    """Concept Ablation: the memorized prompt trained toward anchor images (their prompts'
    prediction, model-based, or their noise) the original model generates from anchor prompts."""

    anchors: Literal["paraphrases", "surrogates"] = "paraphrases"
    # paraphrases: a JSON/YAML file mapping a memorized item id (or its prompt) to anchor prompts
    anchor_file: str | None = None
    anchor_images: int = 1000  # images per memorized item, spread over its anchor prompts
    image_threshold: float = 0.5  # an anchor image with SSCD above this against the memorized image is dropped
    max_replica_rate: float = 0.3  # an anchor prompt whose images replicate more often is dropped
    loss: Literal["model-based", "noise"] = "model-based"
    parameter_group: Literal["cross-attn", "attn", "full-weight"] = "cross-attn"
    prior_preservation: bool = True  # the anchor prompt on its own image, noise target
    prior_loss_weight: float = 1.0
    scale_lr: bool = True  # learning rate x batch x processes x accumulation (x 2 with prior), as --scale_lr
    sampler: SamplerOverrides = field(default_factory=lambda: SamplerOverrides(
        scheduler="dpm", num_inference_steps=25, guidance_scale=6.0))
    surrogates: SurrogateSpec = field(default_factory=SurrogateSpec)  # anchors: surrogates


@dataclass
class SissSpec:
    """SISS (paper 004 App. E.2, Eq. 4): per memorized image, X (non-replicas) and A (replicas)
    among generations of its prompt with random tokens inserted."""

    generations: int = 128  # images per prompt variant
    random_tokens: list[int] = field(default_factory=lambda: [4, 2, 8, 1])  # token counts tried in turn
    threshold: float = 0.7  # SSCD against the memorized image above which a generation is a replica (A)
    lambd: float = 0.5  # mixture weight of A in q_lambda
    scaling_norm: float | None = 750.0  # the NegGrad gradient rescaled to this L2 norm per step (official)
    superfactor: float = 3.0  # s of Eq. 4, used when scaling_norm is null
    min_timestep: int = 999  # t drawn from [min_timestep, T): the official SD script fixes t = 999
    sampler: SamplerOverrides = field(default_factory=SamplerOverrides)  # the generations' sampler


@dataclass(kw_only=True)
class RemovalRecipe(ModelOptions, OutputOptions):
    """A removal recipe: the shared model and output options, the method, the optimisation, and one
    section per method (only the chosen method's is read)."""

    model: str | None = option(TESTBED, "a diffusers SD folder or hub id; testbed: the cached testbed (built if absent)")
    output_dir: str | None = option(None, "where checkpoints, the model(s) and run_summary.json go (required)")
    project: str | None = option("memtrain-remove", "tracker project name")
    memorized_manifest: str | None = option(None, "the memorized pairs to remove (required unless model is the "
                                                  "testbed: then its memorized split)")
    method: str | None = option(None, "the removal method: esd, concept_ablation or siss")
    seed: int = option(0, "the run's seed")
    descriptor: str = option("auto", "copy descriptor of the anchor filter and the SISS split (standin: tests)")
    train: RemovalTrainSpec = section(RemovalTrainSpec, "the optimisation (None: the method's official value)")
    checkpointing: CheckpointSpec = section(CheckpointSpec, "checkpoint frequency")
    esd: EsdSpec = section(EsdSpec, "ESD settings")
    concept_ablation: ConceptAblationSpec = section(ConceptAblationSpec, "Concept Ablation settings")
    siss: SissSpec = section(SissSpec, "SISS settings")
    resume_from_checkpoint: str | None = option(None, "continue from this checkpoint folder, or latest")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_values(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def checkpoint_to_resume(self) -> str | None:
        """resume_from_checkpoint, or latest under --resume."""
        return self.resume_from_checkpoint or ("latest" if self.resume else None)

    @property
    def resolved_train(self) -> RemovalTrainSpec:
        """train with every None replaced by the method's official value."""
        return dataclasses.replace(self.train, **{k: v for k, v in METHOD_DEFAULTS[self.method].items()
                                                  if getattr(self.train, k) is None})

    def check_files(self) -> None:
        """The manifest and anchor file named exist; an output_dir holding a run only with resume
        or overwrite."""
        if self.memorized_manifest:
            read_manifest(self.memorized_manifest)
        anchors = self.concept_ablation.anchor_file
        if self.method == "concept_ablation" and anchors and not Path(anchors).expanduser().is_file():
            raise MemtrainError(f"concept_ablation.anchor_file '{anchors}' does not exist: give a JSON/YAML file "
                                "mapping memorized item ids (or prompts) to anchor prompts")
        check_taken_output(self.output_dir, bool(self.checkpoint_to_resume), self.overwrite)


def check_values(recipe: RemovalRecipe) -> None:
    """Values only (no disk): a bad one is a one-line error naming the key."""
    if recipe.method not in METHODS:
        raise MemtrainError(f"recipe key 'method' must be one of {', '.join(METHODS)}, got {recipe.method!r} "
                            "(e.g. method=esd)")
    if not recipe.output_dir:
        raise MemtrainError("recipe is missing the required key 'output_dir' (where the run writes)")
    t = recipe.resolved_train
    positive = {"train.steps": t.steps, "train.learning_rate": t.learning_rate, "train.batch": t.batch,
                "train.gradient_accumulation_steps": t.gradient_accumulation_steps,
                "esd.ddim_steps": recipe.esd.ddim_steps, "siss.generations": recipe.siss.generations,
                "concept_ablation.anchor_images": recipe.concept_ablation.anchor_images}
    if t.max_steps is not None:
        positive["train.max_steps"] = t.max_steps
    for key, value in positive.items():
        if not value > 0:
            raise MemtrainError(f"recipe key '{key}' must be > 0, got {value}")
    if recipe.checkpointing.steps < 0:
        raise MemtrainError(f"recipe key 'checkpointing.steps' must be >= 0, got {recipe.checkpointing.steps}")
    s = recipe.siss
    if not 0 < s.lambd < 1:
        raise MemtrainError(f"recipe key 'siss.lambd' must be in (0, 1), got {s.lambd}")
    if not s.random_tokens or min(s.random_tokens) < 1:
        raise MemtrainError(f"recipe key 'siss.random_tokens' must list token counts >= 1, got {s.random_tokens}")
    if recipe.plan:
        raise MemtrainError("remove has no --plan")


def removal_recipe_from_dict(data: dict, overrides: list[str] | None = None) -> RemovalRecipe:
    """A checked RemovalRecipe from a mapping and dotted overrides."""
    return config.load_config(RemovalRecipe, data=data, overrides=overrides)


def load_removal_recipe(path: str | Path, overrides: list[str] | None = None) -> RemovalRecipe:
    """A checked RemovalRecipe from a YAML file and dotted overrides (`method=esd train.steps=10`)."""
    return removal_recipe_from_dict(config.read_yaml(path), overrides)


# keys that may change between a run and its resume without changing what is computed
RESUME_FREE_KEYS = ("output_dir", "report_to", "project", "progress", "resume", "overwrite", "checkpointing.",
                    "train.max_steps", "max_memory", "timeout_minutes", "device", "plan", "resume_from_checkpoint")


def first_difference(saved: dict, current: dict) -> str | None:
    """The first recipe key (outside RESUME_FREE_KEYS) whose value differs, else None."""
    return config.first_difference(saved, current, RESUME_FREE_KEYS)
