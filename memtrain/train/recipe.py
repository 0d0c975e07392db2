"""Training recipes: YAML -> typed dataclasses (paper 004 Sec. 4.4, Alg. 2, App. I).

Read with memtrain.core.config: every key is checked against the dataclass fields, and
command-line overrides `train.learning_rate=1e-5` go through the same checks. `model: testbed`
(the default) is filled in by the testbed resolver before training starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from memtrain.attack import AttackConfig
from memtrain.core import config
from memtrain.core.errors import MemtrainError
from memtrain.core.cli import option, section
from memtrain.core.manifest import read_manifest
from memtrain.core.options import ModelOptions, OutputOptions
from memtrain.core.sampling import SamplerOverrides


@dataclass
class UtilitySpec:
    """Non-memorized image-caption pairs for L_DM (LAION in the paper)."""

    format: Literal["manifest", "parquet", "imagefolder", "webdataset"] = "manifest"
    path: str = ""  # manifest .jsonl, parquet file/glob, imagefolder dir, or .tar glob ("" on the testbed: its utility split)
    image_column: str = "image"
    caption_column: str = "text"  # manifest: the item's prompt
    max_items: int | None = None


@dataclass
class FinetuneAttack(AttackConfig):
    """The attack of Alg. 2: AttackConfig with the fine-tuner's default start, `alternate` (odd
    epochs from the prompt embedding, even ones from N(0, I)); resolved per epoch by for_epoch."""

    init: Literal["prompt", "random", "other_prompt", "alternate"] = "alternate"


@dataclass
class LoraSpec:
    """LoRA rank, alpha and target modules of a `finetune: lora` run."""

    rank: int = 4
    alpha: float | None = None  # None -> rank (scale 1)
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class EmaSpec:
    """Exponential moving average of the fine-tuned weights."""

    use: bool = False
    decay: float = 0.9999


@dataclass
class TrainSpec:
    """The optimisation: epochs, batches, optimizer, precision, full or LoRA."""

    epochs: int = 5
    updates_per_embedding: int = 3  # S in Alg. 2
    surrogate_batch_size: int = 1
    utility_batch_size: int | None = None  # None -> equal to surrogate_batch_size (App. I)
    learning_rate: float = 1e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    finetune: Literal["full", "lora"] = "full"
    lora: LoraSpec = field(default_factory=LoraSpec)
    ema: EmaSpec = field(default_factory=EmaSpec)
    concat_forward: bool = True  # surrogate and utility halves in one U-Net forward (App. I)
    max_steps: int | None = None  # stop after this many optimizer steps (debugging, tests)

    @property
    def utility_batch(self) -> int:
        return self.utility_batch_size or self.surrogate_batch_size


@dataclass
class SurrogateSpec:
    """Images that keep a memorized prompt's content but not its pixels."""

    source: Literal["mitigation", "model"] = "mitigation"
    mitigation: str = "nemo"
    mitigation_settings: dict = field(default_factory=dict)
    # source: model -> a model folder that never saw the images; "testbed_reference": the
    # testbed's second model trained without its memorized pairs (memtrain.testbed.reference)
    model: str | None = None
    per_prompt: int = 4
    sscd_drop_threshold: float = 0.5  # drop surrogates with SSCD above this against any memorized image
    descriptor: str = "auto"  # memtrain.metrics.get_descriptor spec ("standin" for tests)
    seed: int = 1000
    sampler: SamplerOverrides = field(default_factory=SamplerOverrides)  # None fields: the model's own


@dataclass
class CheckpointSpec:
    """How often checkpoints are saved and how many are kept."""

    steps: int = 500  # save every N optimizer steps (0: never)
    total_limit: int | None = None


@dataclass
class AuditSpec:
    """The per-epoch and closing checks of a fine-tuning run."""

    epoch_end: bool = True  # small MR audit (prompts and under attack) after each epoch
    seeds: int = 2
    max_items: int | None = 4
    # targets per batched attack in the epoch and closing audits: the batches are cut before the
    # targets are spread over the processes, so the figures do not depend on their number
    targets_per_attack: int = 2
    closing: bool = True  # closing audit into output_dir/audit/report.json
    heldout_manifest: str | None = None  # held-out pairs for the denoising loss
    heldout_noise_samples: int = 4
    kid: bool = True
    kid_prompts: int = 16
    sampler: SamplerOverrides = field(default_factory=SamplerOverrides)  # None fields: the model's own
    # closing audit of the fine-tuned model with memtrain.eval.audit (prompts, full-strength attack,
    # held-out control): its recipe (None: recipes/audit_testbed.yaml on the testbed, else
    # audit_sd14.yaml) and optional target limit
    full: bool = True
    full_recipe: str | None = None
    full_max_targets: int | None = None


TESTBED = "testbed"  # the value of `model` the testbed resolver replaces by the cached testbed


@dataclass(kw_only=True)
class Recipe(ModelOptions, OutputOptions):
    """A fine-tuning recipe (recipes/*.yaml): the shared model and output options, then data,
    training, attack, surrogates and checks.

    From the shared groups: `model` ("testbed": the cached testbed, built if absent), `dtype` (the
    frozen parts' precision: text encoder, VAE, surrogate model; the trained U-Net follows
    train.mixed_precision), `max_memory` (the budget of the no-grad batches: VAE encodes,
    held-out loss), `timeout_minutes`, `output_dir` (required), `resume` (= --resume_from_checkpoint
    latest), `report_to`, `project`, `progress`."""

    model: str | None = option(TESTBED, "a diffusers SD folder or hub id; testbed: the cached testbed (built if absent)")
    output_dir: str | None = option(None, "where checkpoints, the model and the reports go (required)")
    project: str | None = option("memtrain-adv-finetune", "tracker project name")
    memorized_manifest: str | None = option(None, "the memorized pairs to remove (required unless model is the "
                                                  "testbed: then its memorized split)")
    utility: UtilitySpec = section(UtilitySpec, "non-memorized pairs for the denoising loss")
    train: TrainSpec = section(TrainSpec, "the optimisation")
    # Dori per memorized image and epoch (Alg. 2): odd epochs from the prompt, even from N(0, I)
    attack: FinetuneAttack = section(FinetuneAttack, "the attack crafted per image and epoch")
    surrogates: SurrogateSpec = section(SurrogateSpec, "the images the memorized prompts are trained toward")
    checkpointing: CheckpointSpec = section(CheckpointSpec, "checkpoint frequency")
    audit: AuditSpec = section(AuditSpec, "the per-epoch and closing checks")
    seed: int = option(0, "the run's seed")
    debug_rank_checksums: bool = option(False, "write per-rank parameter checksums at the end")
    resume_from_checkpoint: str | None = option(None, "continue from this checkpoint folder, or latest (the "
                                                      "newest complete one under output_dir/checkpoints)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_values(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def checkpoint_to_resume(self) -> str | None:
        """resume_from_checkpoint, or latest under --resume."""
        return self.resume_from_checkpoint or ("latest" if self.resume else None)

    def check_files(self) -> None:
        """The memorized manifest named (the testbed's are checked once it is resolved), and an
        output_dir holding a previous run only with --resume (continue it) or --overwrite."""
        if self.memorized_manifest:
            read_manifest(self.memorized_manifest)
        check_taken_output(self.output_dir, bool(self.checkpoint_to_resume), self.overwrite)


def check_taken_output(output_dir: str, resume: bool, overwrite: bool) -> None:
    """A training's output_dir may hold a previous run only with --resume (continue it) or
    --overwrite (replace it once the new run completes)."""
    out = Path(output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise MemtrainError(f"output_dir '{out}' exists and is a file: choose a folder name")
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise MemtrainError(f"output_dir '{out}' holds a previous run: pass --resume to continue it, "
                            "--overwrite to replace it once this run completes, or choose another")


def _check_values(recipe: Recipe) -> None:
    positive = {
        "train.epochs": recipe.train.epochs, "train.updates_per_embedding": recipe.train.updates_per_embedding,
        "train.surrogate_batch_size": recipe.train.surrogate_batch_size,
        "train.utility_batch_size": recipe.train.utility_batch,
        "train.gradient_accumulation_steps": recipe.train.gradient_accumulation_steps,
        "attack.steps": recipe.attack.steps, "audit.targets_per_attack": recipe.audit.targets_per_attack,
        "surrogates.per_prompt": recipe.surrogates.per_prompt,
        "train.lora.rank": recipe.train.lora.rank, "train.learning_rate": recipe.train.learning_rate,
    }
    for key, value in positive.items():
        if not value > 0:
            raise MemtrainError(f"recipe key '{key}' must be > 0, got {value}")
    if recipe.checkpointing.steps < 0:
        raise MemtrainError(f"recipe key 'checkpointing.steps' must be >= 0, got {recipe.checkpointing.steps}")
    if not recipe.output_dir:
        raise MemtrainError("recipe is missing the required key 'output_dir' (where the run writes)")
    if recipe.plan:
        raise MemtrainError("finetune has no --plan: it plans its no-grad batches within max_memory as it runs")
    if recipe.lora and recipe.train.finetune == "lora":
        raise MemtrainError("recipe key 'lora' with train.finetune: lora: fuse the first LoRA into a model folder "
                            "and fine-tune that (the new LoRA would be saved relative to the fused model)")
    if recipe.surrogates.source == "model" and not recipe.surrogates.model:
        raise MemtrainError("recipe key 'surrogates.model' is required when surrogates.source is 'model'")


def check_resolved(recipe: Recipe) -> None:
    """The keys a recipe needs once its model is a real folder (the resolver fills them in for
    the testbed from its splits)."""
    if not recipe.memorized_manifest:
        raise MemtrainError("recipe key 'memorized_manifest' is required when model is not the testbed")
    if not recipe.utility.path:
        raise MemtrainError("recipe key 'utility.path' is required (the non-memorized training pairs)")


# --- loading ------------------------------------------------------------------------------------

def recipe_from_dict(data: dict, overrides: list[str] | None = None) -> Recipe:
    """A checked Recipe from a mapping and dotted overrides."""
    return config.load_config(Recipe, data=data, overrides=overrides)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """A checked Recipe from a YAML file and dotted overrides (`train.epochs=1`)."""
    return recipe_from_dict(config.read_yaml(path), overrides)


# keys that may change between a run and its resume without changing what is computed
# (max_memory only cuts no-grad batches into chunks; `auto` differs from run to run anyway)
RESUME_FREE_KEYS = ("output_dir", "report_to", "project", "progress", "resume", "overwrite", "checkpointing.",
                    "audit.", "debug_rank_checksums", "train.max_steps", "max_memory", "timeout_minutes", "device",
                    "plan", "resume_from_checkpoint")


def first_difference(saved: dict, current: dict) -> str | None:
    """The first recipe key (outside RESUME_FREE_KEYS) whose value differs, else None."""
    return config.first_difference(saved, current, RESUME_FREE_KEYS)
