"""`memtrain analyze`: why do the mitigations fail? The mechanism analyses with plots: embedding
interventions (Wen et al.), guidance magnitude, the overestimation switch, locality of
memorization in the weights, and localization against planted ground truth. Each writes
OUT/<analysis>.json, PNG plots and OUT/<analysis>.md; OUT/index.md links them.

    memtrain analyze guidance overestimation          # the cached testbed, its recipe
    memtrain analyze all --report_to wandb             # every analysis, plots to W&B too
    memtrain analyze locality --model /path/to/sd-v1-4 --manifest M.jsonl --non_memorized N.jsonl

A RECIPE.yaml replaces the model's analysis recipe; key=value and flags change single keys.
"""

from __future__ import annotations

import dataclasses

from memtrain.commands.base import Command
from memtrain.core.command_line import CommandLine, Positional
from memtrain.core.config import read_yaml
from memtrain.core.report import CommandResult
from memtrain.eval.analyses.run import ANALYSES, AnalyzeConfig, analyze, model_recipe
from memtrain.testbed.resolver import resolve_model


def run(config: AnalyzeConfig, line: CommandLine) -> CommandResult:
    """Resolve the model, put the command line over its analysis recipe, run the analyses."""
    defaults = resolve_model(config.model, progress=config.progress)
    path = model_recipe(defaults, line.recipe)
    config = dataclasses.replace(line, recipe=None).config(AnalyzeConfig, base=read_yaml(path))
    config.recipe_path = str(path)
    results = analyze(config, defaults)
    if config.plan:
        return CommandResult({}, plan=results["plan"])
    output_dir = next(iter(results.values()))["output_dir"] if results else None
    return CommandResult(results, output_dir)


def show(result: CommandResult) -> str:
    if result.plan:
        return result.plan_text
    lines = [f"{name:<15} {doc['seconds']:.0f} s" for name, doc in result.report.items()]
    return "\n".join([*lines, f"wrote {result.output_dir}"])


COMMAND = Command("analyze", __doc__, AnalyzeConfig, run, show,
                  positionals=(Positional("analyses", "ANALYSIS", f"{', '.join(ANALYSES)} or all "
                                          "(also --analysis NAME ...)", many=True, required=False),))
