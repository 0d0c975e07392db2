"""The removal table's recipe (recipes/removal_*.yaml onto RemovalTableConfig): which methods, their
training settings (memtrain.train.removal's RemovalRecipe keys, the fine-tuning Recipe for
adv_finetune) and the audit every method faces; checked before any model loads (values here,
files in check_files). The run: memtrain.train.removal_table."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from memtrain.core.cli import option
from memtrain.core.command_line import merge
from memtrain.core.config import build, first_difference, packaged_recipe, read_yaml
from memtrain.core.errors import MemtrainError
from memtrain.core.files import check_output_dir
from memtrain.core.manifest import read_manifest
from memtrain.core.options import MetricOptions, ModelOptions, OutputOptions
from memtrain.core.report import to_jsonable
from memtrain.eval.audit import AuditRecipe
from memtrain.eval.audit.recipe import recipe_keys
from memtrain.train.recipe import TESTBED, Recipe, recipe_from_dict
from memtrain.train.removal import REMOVAL_METHODS, RemovalRecipe, removal_recipe_from_dict

FINETUNE = "adv_finetune"
# keys that may change between a run and its resume without changing what is computed
RESUME_FREE = ("output_dir", "overwrite", "resume", "report_to", "project", "progress", "max_memory", "plan",
               "timeout_minutes", "device")


@dataclass(kw_only=True)
class RemovalTableConfig(ModelOptions, OutputOptions, MetricOptions):
    """The removal table's recipe (recipes/removal_*.yaml): which methods, their training settings,
    and the audit they all face."""

    model: str | None = option(TESTBED, "the original model: a diffusers SD folder or hub id; testbed: the cached one")
    output_dir: str | None = option(None, "where the trainings, audits and the table go (required)")
    project: str | None = option("memtrain-removal", "tracker project name")
    methods: list[str] = option(dataclasses.MISSING, "removal methods: esd, concept_ablation, siss, adv_finetune",
                                "--method")
    memorized_manifest: str | None = option(None, "the memorized items to remove (default: the model's memorized set)")
    control_manifest: str | None = option(None, "held-out images for the control (default: the model's held_out set)")
    utility_manifest: str | None = option(None, "FID/KID prompts and images (default: the model's utility set)")
    items: int | None = option(None, "remove and audit the first N memorized items (None: all)")
    prompt_attacks: list[str] = field(default_factory=lambda: ["pez"], metadata={
        "help": "the attacks under the prompt threat model (pez, gcg): the first in the main audit, each further "
                "one in an audit of its own", "flags": ("--prompt_attack",)})
    audit: dict = field(default_factory=dict, metadata={"help": "audit recipe keys (AuditRecipe) over the model's"})
    audit_recipe: str | None = option(None, "an audit recipe replacing the model's own")
    removal: dict = field(default_factory=dict, metadata={
        "help": "every removal training's recipe keys (RemovalRecipe: train, checkpointing, esd, concept_ablation, siss)"})
    method_settings: dict = field(default_factory=dict, metadata={
        "help": "a method's own RemovalRecipe keys over `removal` (method -> keys: its steps, ...)"})
    finetune_recipe: str = option("testbed.yaml", "adversarial fine-tuning's recipe: a packaged name or a path")
    finetune: dict = field(default_factory=dict, metadata={"help": "fine-tuning recipe keys over finetune_recipe"})
    paper: str | None = option(None, "sd14: show paper 004's Table 3/5 figures beside the measured ones")
    seed: int = option(0, "the trainings' seed")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.output_dir:
            raise MemtrainError("recipe is missing the required key 'output_dir' (where the table goes)")
        known = [*REMOVAL_METHODS.names(), FINETUNE]
        if not self.methods:
            raise MemtrainError(f"name at least one removal method (methods: {', '.join(known)})")
        for name in self.methods:
            if name not in known:
                raise MemtrainError(f"unknown removal method '{name}': choose from {', '.join(known)}")
        if len(set(self.methods)) != len(self.methods):
            raise MemtrainError(f"recipe key 'methods' names a method twice: {self.methods}")
        if self.items is not None and self.items < 1:
            raise MemtrainError(f"recipe key 'items' must be >= 1, got {self.items}")
        if not self.prompt_attacks:
            raise MemtrainError("recipe key 'prompt_attacks' must name at least one attack (pez, gcg)")
        if self.paper not in (None, "sd14"):
            raise MemtrainError(f"recipe key 'paper' must be sd14 or null, got {self.paper!r}")
        if self.plan:
            raise MemtrainError("removal has no --plan: each training and audit plans its batches as it runs")
        bad = sorted(set(self.audit) - set(recipe_keys()) | {"prompt_attack"} & set(self.audit))
        if bad:
            raise MemtrainError(f"recipe key 'audit.{bad[0]}' is not a key the table's audits take"
                                + (" (the table's prompt_attacks lists them)" if bad[0] == "prompt_attack" else ""))
        checked = {k: v for k, v in copy.deepcopy(self.audit).items() if k != "budget" or "budgets" in self.audit}
        for attack in self.prompt_attacks:  # as the audit recipe takes them (a budget < 1 fails here)
            try:
                build(AuditRecipe, {**checked, "prompt_attack": attack}, prefix="audit")
            except MemtrainError as err:
                raise MemtrainError(f"audit: {err}") from None
        if self.lora:
            raise MemtrainError("removal takes no --lora: fuse it into a model folder and name that as the model")
        for name, keys in self.method_settings.items():
            if name not in REMOVAL_METHODS or not isinstance(keys, dict):
                raise MemtrainError(f"recipe key 'method_settings.{name}': give a removal method "
                                    f"({', '.join(REMOVAL_METHODS.names())}) and a mapping of its recipe keys")
        for name in self.removal_methods:
            self.removal_recipe(name, "<output_dir>", "<manifest>")  # wrong keys, budgets < 1: one line now

    @property
    def removal_methods(self) -> list[str]:
        return [m for m in self.methods if m != FINETUNE]

    def removal_recipe(self, method: str, output_dir: str, manifest: str, model: str | None = None,
                       overwrite: bool = False) -> RemovalRecipe:
        """The typed recipe of one removal training, from the table's `removal` keys."""
        data = merge(merge(copy.deepcopy(self.removal), copy.deepcopy(self.method_settings.get(method, {}))), {
            "method": method, "model": model or self.model, "output_dir": output_dir, "memorized_manifest": manifest,
            "seed": self.seed, "report_to": self.report_to, "progress": self.progress, "overwrite": overwrite,
            **{k: v for k, v in dataclasses.asdict(self.runtime).items() if k != "plan"}})
        try:
            return removal_recipe_from_dict(data)
        except MemtrainError as err:
            raise MemtrainError(f"removal ({method}): {err}") from None

    def finetune_config(self) -> Recipe:
        """The fine-tuning recipe (finetune_recipe under `finetune`), read from disk."""
        path = Path(self.finetune_recipe)
        data = read_yaml(path if path.is_file() or "/" in self.finetune_recipe else packaged_recipe(path.name))
        data = merge(merge(data, copy.deepcopy(self.finetune)), {"model": self.model, "seed": self.seed,
                                                                  "output_dir": self.output_dir})
        try:
            return recipe_from_dict(data)
        except MemtrainError as err:
            raise MemtrainError(f"finetune: {err}") from None

    def check_files(self) -> None:
        """The output folder is free (or --overwrite), the manifests named read, and the fine-tuning
        recipe reads and fits the table: a full U-Net (the audit swaps whole folders in) and the
        removal trainings' precision (one launch runs one)."""
        self.check_output()
        for path in (self.memorized_manifest, self.control_manifest, self.utility_manifest):
            if path is not None:
                read_manifest(path)
        if FINETUNE not in self.methods:
            return
        finetune = self.finetune_config()
        if finetune.train.finetune != "full":
            raise MemtrainError("finetune.train.finetune must be full: the table audits whole model folders "
                                "(a LoRA run's model/ holds only its adapter)")
        for name in self.removal_methods:
            precision = self.removal_recipe(name, "-", "-").train.mixed_precision
            if precision != finetune.train.mixed_precision:
                raise MemtrainError(f"removal.train.mixed_precision ({precision}) differs from the fine-tuning "
                                    f"recipe's ({finetune.train.mixed_precision}): one launch runs one precision, "
                                    "set both alike")

    def check_output(self) -> None:
        """OUT is free, or --overwrite replaces it, or --resume continues the interrupted table it
        holds (same settings); a complete table is replaced only with --overwrite."""
        out = check_output_dir(self.output_dir, True)
        state = out / "table.json"
        if not (out.is_dir() and any(out.iterdir())) or self.overwrite:
            return
        if (out / "removal.json").is_file():
            raise MemtrainError(f"'{out}' holds a complete removal table: pass --overwrite to replace it (once the "
                                "new one is complete), or choose another output_dir")
        if not self.resume:
            what = "an interrupted table's work" if state.is_file() else "other files"
            raise MemtrainError(f"output dir '{out}' holds {what}: pass --resume to continue it, or --overwrite to "
                                "start over")
        if not state.is_file():
            raise MemtrainError(f"output dir '{out}' holds no interrupted removal table to resume: choose another")
        diff = first_difference(json.loads(state.read_text()), self.fingerprint(), labels=("interrupted table", "now"))
        if diff:
            raise MemtrainError(f"cannot resume the table in {out}: {diff}; rerun it as it was, or with --overwrite "
                                "to start over")

    @property
    def checkpoint_to_resume(self) -> str | None:
        """--resume continues the interrupted table (memtrain.train.outputs.set_aside_previous asks)."""
        return "latest" if self.resume else None

    def fingerprint(self) -> dict:
        """What a resumed table must share with the interrupted one."""
        return {k: v for k, v in to_jsonable(dataclasses.asdict(self)).items() if k not in RESUME_FREE}
