"""`memtrain evaluate`: how much does a model replicate its training images? Generates `seeds`
images per manifest prompt, scores each against its training image with SSCD, and writes
OUT/metrics.json (MR, SSCD_Orig, diversity, A_CLIP and FID/KID where their inputs are given),
OUT/report.md and OUT/grids/*.png.

    memtrain evaluate --manifest M.jsonl --model /path/to/sd-v1-4 --seeds 10
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m memtrain evaluate ...

Without --model: the cached testbed; without --manifest: the model's memorized manifest.
W&B without an account: WANDB_MODE=offline ... --report_to wandb (run folder: OUT/wandb/).
"""

from __future__ import annotations

from memtrain.commands.base import Command, result_of
from memtrain.core.report import CommandResult
from memtrain.eval.evaluate import EvaluateConfig, evaluate
from memtrain.eval.evaluate_report import summary
from memtrain.testbed.resolver import resolve_model


def run(config: EvaluateConfig, line=None) -> CommandResult:
    return result_of(evaluate(config, resolve_model(config.model, progress=config.progress)), config.plan)


def show(result: CommandResult) -> str:
    return result.plan_text or summary(result.report)


COMMAND = Command("evaluate", __doc__, EvaluateConfig, run, show)
