"""`memtrain finetune`: adversarial fine-tuning that removes memorized images (paper 004's
Alg. 2): the U-Net learns to map each memorized prompt, and Dori's adversarial embeddings for
it, to surrogate images, while a denoising loss on other pairs keeps the model's utility.
Writes OUT/model (a diffusers folder, or the LoRA weights), checkpoints, OUT/run_summary.json
and OUT/audit/report.json (memorization before and after, held-out loss, KID).

    memtrain finetune recipes/testbed.yaml train.epochs=1
    accelerate launch --config_file accelerate_configs/multi_gpu_ddp.yaml -m memtrain finetune \\
        recipes/sd14.yaml --resume_from_checkpoint latest
"""

from __future__ import annotations

from pathlib import Path

from memtrain.commands.base import Command
from memtrain.core.report import CommandResult
from memtrain.testbed.resolver import resolve_recipe
from memtrain.train.recipe import Recipe
from memtrain.train.trainer import train


def run(recipe: Recipe, line=None) -> CommandResult:
    """Resolve `model: testbed` (and the reference model), then train."""
    recipe, defaults = resolve_recipe(recipe, progress=recipe.progress)
    model_dir = train(recipe, resume_from_checkpoint=recipe.checkpoint_to_resume, defaults=defaults)
    return CommandResult({"model_dir": str(model_dir)}, Path(recipe.output_dir).absolute())


def show(result: CommandResult) -> str:
    return f"fine-tuned model: {result.report['model_dir']}"


COMMAND = Command("finetune", __doc__, Recipe, run, show, recipe="required")
