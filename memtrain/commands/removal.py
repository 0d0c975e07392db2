"""`memtrain removal`: paper 004's Tables 3 and 5 by one command. Each listed removal method (ESD,
Concept Ablation, SISS, adversarial fine-tuning) is trained from the original model into
OUT/<method>/ and audited against it as a weight edit under Dori and the prompt attacks, held-out
control included; OUT/removal.json has a row per method, OUT/removal.md the table (with the
paper's figures beside for the SD recipe). docs/removal.md says what each column means.

    accelerate launch scripts/removal_table.py recipes/removal_testbed.yaml
    memtrain removal recipes/removal_sd14.yaml methods='[esd, adv_finetune]' --resume
"""

from __future__ import annotations

import copy
import dataclasses

from memtrain.commands.base import Command
from memtrain.core.command_line import merge
from memtrain.core.report import format_value
from memtrain.testbed.reference import REFERENCE_KEY
from memtrain.testbed.resolver import reference_model, resolve_model, resolve_recipe, testbed_root_of
from memtrain.train.removal_config import FINETUNE, RemovalTableConfig
from memtrain.train.removal_table import RemovalTable, run_table


def run(config: RemovalTableConfig, line=None) -> RemovalTable:
    """Resolve the original model (`model: testbed`: the cached testbed), the fine-tuning recipe
    and Concept Ablation's surrogate model (`testbed_reference`), then train and audit every method."""
    defaults = resolve_model(config.model, progress=config.progress)
    finetune = None
    if FINETUNE in config.methods:
        finetune, _ = resolve_recipe(config.finetune_config(), progress=config.progress)
    if "concept_ablation" in config.methods:
        spec = config.removal_recipe("concept_ablation", "-", "-").concept_ablation
        if spec.anchors == "surrogates" and spec.surrogates.source == "model" and spec.surrogates.model == REFERENCE_KEY:
            folder = reference_model(testbed_root_of(defaults.model_dir), config.progress,
                                     "concept_ablation.surrogates.model")
            keys = merge(copy.deepcopy(config.method_settings), {"concept_ablation": {"concept_ablation": {
                "surrogates": {"model": folder}}}})
            config = dataclasses.replace(config, method_settings=keys)
    return run_table(config, defaults, finetune)


def show(result: RemovalTable) -> str:
    def line(r: dict) -> str:
        if r["verdict"] == "not run":
            return f"{r['method']}: not run ({result.report['methods'][r['method']]['verdict_reason']})"
        skipped = f"; {len(r['skipped'])} items skipped" if r["skipped"] else ""
        return (f"{r['method']}: MR prompt {format_value(r['mr_prompt'], 2)}, under Dori {format_value(r['mr_attack'], 2)} "
                f"(control {format_value(r['mr_control'], 2)}): {r['verdict']}{skipped}")

    return "\n".join([*map(line, result.rows), f"table: {result.output_dir / 'removal.md'}"])


COMMAND = Command("removal", __doc__, RemovalTableConfig, run, show, recipe="required")
