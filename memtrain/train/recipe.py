"""Training recipes: YAML -> typed dataclasses (paper 004 Sec. 4.4, Alg. 2, App. I).

Every key is checked against the dataclass fields: an unknown or misspelled key, or a value
of the wrong type, is a one-line MemtrainError naming the dotted key. Command-line overrides
`train.learning_rate=1e-5` are applied to the YAML dict before validation, so they go through
the same checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from memtrain.errors import MemtrainError


@dataclass
class UtilitySpec:
    """Non-memorized image-caption pairs for L_DM (LAION in the paper)."""

    format: Literal["manifest", "parquet", "imagefolder", "webdataset"] = "manifest"
    path: str = ""  # manifest .jsonl, parquet file/glob, imagefolder dir, or .tar glob ("" on the testbed: its utility split)
    image_column: str = "image"
    caption_column: str = "text"  # manifest: the item's prompt
    max_items: int | None = None


@dataclass
class AttackSpec:
    """Dori per memorized image and epoch (paper 004 Alg. 2)."""

    steps: int = 50
    lr: float = 0.1
    noise_samples: int = 8
    # odd epochs start from the prompt embedding, even ones from N(0, I) (epochs count from 1)
    init: Literal["alternate", "prompt", "random"] = "alternate"
    l2_radius: float | None = None
    max_batch: int = 64


@dataclass
class LoraSpec:
    rank: int = 4
    alpha: float | None = None  # None -> rank (scale 1)
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class EmaSpec:
    use: bool = False
    decay: float = 0.9999


@dataclass
class TrainSpec:
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
    num_inference_steps: int | None = None  # None -> the model's sampler settings
    guidance_scale: float | None = None


@dataclass
class CheckpointSpec:
    steps: int = 500  # save every N optimizer steps (0: never)
    total_limit: int | None = None


@dataclass
class AuditSpec:
    epoch_end: bool = True  # small MR audit (prompts and under attack) after each epoch
    seeds: int = 2
    max_items: int | None = 4
    closing: bool = True  # closing audit into output_dir/audit/report.json
    heldout_manifest: str | None = None  # held-out pairs for the denoising loss
    heldout_noise_samples: int = 4
    kid: bool = True
    kid_prompts: int = 16
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    # closing audit of the fine-tuned model with memtrain.audit (prompts, full-strength attack,
    # held-out control): its recipe (None: recipes/audit_testbed.yaml on the testbed, else
    # audit_sd14.yaml) and optional target limit
    full: bool = True
    full_recipe: str | None = None
    full_max_targets: int | None = None


TESTBED = "testbed"


@dataclass
class Recipe:
    output_dir: str
    model: str = TESTBED  # a diffusers SD folder or hub id; "testbed": the cached testbed (built if absent)
    memorized_manifest: str | None = None  # required unless model is the testbed (then: its memorized split)
    utility: UtilitySpec = field(default_factory=UtilitySpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    attack: AttackSpec = field(default_factory=AttackSpec)
    surrogates: SurrogateSpec = field(default_factory=SurrogateSpec)
    checkpointing: CheckpointSpec = field(default_factory=CheckpointSpec)
    audit: AuditSpec = field(default_factory=AuditSpec)
    report_to: Literal["none", "wandb", "tensorboard"] = "none"
    tracker_project: str = "memtrain-adv-finetune"
    seed: int = 0
    debug_rank_checksums: bool = False  # write per-rank parameter checksums at the end

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- validation ---------------------------------------------------------------------------------

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, key: str) -> Any:
    """Check (and lightly coerce: int -> float) one value against its annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except MemtrainError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise MemtrainError(f"recipe key '{key}': {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise MemtrainError(f"recipe key '{key}' must be a list, got {type(value).__name__}")
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise MemtrainError(f"recipe key '{key}' must be a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise MemtrainError(
            f"recipe key '{key}' must be {_type_name(tp)}, got {type(value).__name__} ({value!r})"
        )
    return value


def _build(cls, data: Any, prefix: str = ""):
    where = prefix or "recipe"
    if not isinstance(data, dict):
        raise MemtrainError(f"recipe key '{where}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise MemtrainError(f"unknown recipe key '{dotted}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], dotted)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise MemtrainError(f"recipe is missing the required key '{dotted}'")
    return cls(**kwargs)


def _check_values(recipe: Recipe) -> None:
    positive = {
        "train.epochs": recipe.train.epochs, "train.updates_per_embedding": recipe.train.updates_per_embedding,
        "train.surrogate_batch_size": recipe.train.surrogate_batch_size,
        "train.utility_batch_size": recipe.train.utility_batch,
        "train.gradient_accumulation_steps": recipe.train.gradient_accumulation_steps,
        "attack.steps": recipe.attack.steps, "surrogates.per_prompt": recipe.surrogates.per_prompt,
        "train.lora.rank": recipe.train.lora.rank, "train.learning_rate": recipe.train.learning_rate,
    }
    for key, value in positive.items():
        if not value > 0:
            raise MemtrainError(f"recipe key '{key}' must be > 0, got {value}")
    if recipe.checkpointing.steps < 0:
        raise MemtrainError(f"recipe key 'checkpointing.steps' must be >= 0, got {recipe.checkpointing.steps}")
    if recipe.surrogates.source == "model" and not recipe.surrogates.model:
        raise MemtrainError("recipe key 'surrogates.model' is required when surrogates.source is 'model'")
    if recipe.model != TESTBED:
        if not recipe.memorized_manifest:
            raise MemtrainError("recipe key 'memorized_manifest' is required when model is not the testbed")
        if not recipe.utility.path:
            raise MemtrainError("recipe key 'utility.path' is required (the non-memorized training pairs)")


def with_testbed_paths(recipe: Recipe, root: str | Path) -> Recipe:
    """The recipe with model 'testbed' pointing at a built testbed folder: its model and, where the
    recipe leaves them empty, its memorized, utility and held-out manifests."""
    root = Path(root)
    manifests = root / "manifests"
    utility = recipe.utility
    if not utility.path:
        utility = dataclasses.replace(utility, format="manifest", path=str(manifests / "utility.jsonl"))
    audit = recipe.audit
    if not audit.heldout_manifest:
        audit = dataclasses.replace(audit, heldout_manifest=str(manifests / "held_out.jsonl"))
    return dataclasses.replace(
        recipe, model=str(root / "model"), utility=utility, audit=audit,
        memorized_manifest=recipe.memorized_manifest or str(manifests / "memorized.jsonl"),
    )


# --- overrides and loading ----------------------------------------------------------------------

def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b=value` pairs (value parsed as YAML) set into a nested dict; bad syntax -> error."""
    for item in overrides:
        if "=" not in item:
            raise MemtrainError(f"override '{item}' must look like key=value (e.g. train.epochs=1)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise MemtrainError(f"override '{item}': empty key part in '{key}'")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise MemtrainError(f"override '{item}': '{'.'.join(parts[: depth + 1])}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def recipe_from_dict(data: dict, overrides: list[str] | None = None) -> Recipe:
    data = apply_overrides(dict(data or {}), list(overrides or []))
    recipe = _build(Recipe, data)
    _check_values(recipe)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise MemtrainError(f"recipe file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise MemtrainError(f"recipe '{path}' is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise MemtrainError(f"recipe '{path}' must be a YAML mapping at the top level")
    # relative paths in a recipe are relative to the recipe file
    recipe = recipe_from_dict(data, overrides)
    return recipe


def flat_items(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            out.update(flat_items(value, dotted))
        else:
            out[dotted] = value
    return out


# keys that may change between a run and its resume without changing what is computed
RESUME_FREE_KEYS = ("output_dir", "report_to", "tracker_project", "checkpointing.", "audit.",
                    "debug_rank_checksums", "train.max_steps")


def first_difference(saved: dict, current: dict) -> str | None:
    """The first dotted key (outside RESUME_FREE_KEYS) whose value differs, else None."""
    a, b = flat_items(saved), flat_items(current)
    for key in sorted(set(a) | set(b)):
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_FREE_KEYS):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            return f"{key} (checkpoint: {a.get(key, '<absent>')!r}, now: {b.get(key, '<absent>')!r})"
    return None
