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
from memtrain.core.run import DEFAULT_TIMEOUT_MINUTES, check_timeout
from memtrain.core.runtime import parse_dtype, parse_memory
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


@dataclass
class Recipe:
    """A fine-tuning recipe (recipes/*.yaml): model, data, training, attack, surrogates, checks."""

    output_dir: str
    model: str = TESTBED  # a diffusers SD folder or hub id; "testbed": the cached testbed (built if absent)
    memorized_manifest: str | None = None  # required unless model is the testbed (then: its memorized split)
    utility: UtilitySpec = field(default_factory=UtilitySpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    # Dori per memorized image and epoch (Alg. 2): odd epochs from the prompt, even from N(0, I)
    attack: FinetuneAttack = field(default_factory=FinetuneAttack)
    surrogates: SurrogateSpec = field(default_factory=SurrogateSpec)
    checkpointing: CheckpointSpec = field(default_factory=CheckpointSpec)
    audit: AuditSpec = field(default_factory=AuditSpec)
    report_to: Literal["none", "wandb", "tensorboard"] = "none"
    tracker_project: str = "memtrain-adv-finetune"
    seed: int = 0
    debug_rank_checksums: bool = False  # write per-rank parameter checksums at the end
    # precision of the frozen parts (text encoder, VAE, surrogate model), as every command's
    # --dtype: auto = bf16 on a CUDA device with bf16, else fp16; fp32 on the CPU. The trained
    # U-Net follows train.mixed_precision instead.
    dtype: str = "auto"
    # memory budget the trainer's no-grad batches (VAE encodes, held-out loss) are planned for,
    # as every command's --max_memory: auto (the device's free memory) or a size like 24GB
    max_memory: str = "auto"
    # as every command's --timeout_minutes: how long a process waits for the others in a
    # collective (NCCL's own default, 10 minutes, is shorter than an SD v1.4 audit shard)
    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
    for key, parse in (("dtype", parse_dtype), ("max_memory", parse_memory)):
        try:
            parse(getattr(recipe, key))
        except MemtrainError as err:  # the runtime's message starts "--<key> '<value>' ..."
            raise MemtrainError(f"recipe key '{key}': {str(err).removeprefix(f'--{key} ')}") from None
    try:
        recipe.timeout_minutes = check_timeout(recipe.timeout_minutes)
    except MemtrainError as err:
        raise MemtrainError(f"recipe key {err}") from None
    recipe.dtype = parse_dtype(recipe.dtype)  # bfloat16 -> bf16: one spelling in checkpoints
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
    recipe = config.load_config(Recipe, data=data, overrides=overrides)
    _check_values(recipe)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """A checked Recipe from a YAML file and dotted overrides (`train.epochs=1`)."""
    return recipe_from_dict(config.read_yaml(path), overrides)


# keys that may change between a run and its resume without changing what is computed
# (max_memory only cuts no-grad batches into chunks; `auto` differs from run to run anyway)
RESUME_FREE_KEYS = ("output_dir", "report_to", "tracker_project", "checkpointing.", "audit.",
                    "debug_rank_checksums", "train.max_steps", "max_memory", "timeout_minutes")


def first_difference(saved: dict, current: dict) -> str | None:
    """The first recipe key (outside RESUME_FREE_KEYS) whose value differs, else None."""
    return config.first_difference(saved, current, RESUME_FREE_KEYS)
