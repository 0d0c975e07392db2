"""`memtrain remove`: one removal baseline of paper 004 (App. E.2, G.2) as a training, writing a
diffusers pipeline folder a publisher could release: `esd` (Gandikota et al. 2023: negatively
guided noise for the memorized prompts; ESD-x on the cross-attention, ESD-u on the rest),
`concept_ablation` (Kumari et al. 2023: the memorized prompt toward anchor images of paraphrased
prompts, or offline of memtrain's surrogates) or `siss` (Alberti et al. 2025: per memorized image,
Eq. 4 on replicas and non-replicas of prompts with random tokens). Training settings left empty
take the method's official values. Writes OUT/model (OUT/<item>/model per item for siss),
OUT/checkpoints and OUT/run_summary.json (skipped items with the reason).

    memtrain remove RECIPE.yaml method=esd
    accelerate launch --config_file accelerate_configs/multi_gpu_ddp.yaml -m memtrain remove \\
        RECIPE.yaml method=siss --resume_from_checkpoint latest
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from memtrain.commands.base import Command
from memtrain.core.report import CommandResult
from memtrain.testbed.reference import REFERENCE_KEY
from memtrain.testbed.resolver import reference_model, resolve_model, testbed_root_of
from memtrain.train.recipe import TESTBED
from memtrain.train.removal import RemovalRecipe, RemovalRun, train_removal


def run(recipe: RemovalRecipe, line=None) -> CommandResult:
    """Resolve `model: testbed` (its memorized split fills memorized_manifest) and Concept
    Ablation's `surrogates.model: testbed_reference`, then train."""
    defaults = resolve_model(None if recipe.model == TESTBED else recipe.model, recipe.progress)
    root = testbed_root_of(defaults.model_dir)
    if root is not None:
        recipe = dataclasses.replace(recipe, model=defaults.model_dir,
                                     memorized_manifest=recipe.memorized_manifest or defaults.manifests["memorized"])
    ca = recipe.concept_ablation
    if recipe.method == "concept_ablation" and ca.anchors == "surrogates" and ca.surrogates.model == REFERENCE_KEY:
        model = reference_model(root, recipe.progress, key="concept_ablation.surrogates.model")
        recipe = dataclasses.replace(recipe, concept_ablation=dataclasses.replace(
            ca, surrogates=dataclasses.replace(ca.surrogates, model=model)))
    result = train_removal(recipe, defaults, recipe.checkpoint_to_resume)
    return CommandResult(dataclasses.asdict(result), Path(recipe.output_dir).absolute())


def show(result: CommandResult) -> str:
    r = RemovalRun(**result.report)
    folders = sorted(set(r.model_dirs.values()))
    lines = [f"{r.method}: {len(r.model_dirs)} memorized item(s) trained into {len(folders)} model folder(s) "
             f"in {r.seconds:.0f} s (peak memory {r.peak_memory_gb:.2f} GB)"]
    lines += [f"  {folder}" for folder in folders[:5]]
    lines += [f"  skipped {item}: {why}" for item, why in r.skipped.items()]
    return "\n".join(lines)


COMMAND = Command("remove", __doc__, RemovalRecipe, run, show, recipe="required")
