"""`memtrain detect`: how well do the papers' memorization detectors tell memorized prompts from
others? Wen's first-step magnitude (and its mean over all steps), Ren's attention entropy,
NeMo's first-step SSIM, the guidance transition point and the overestimation delta, scored on
memorized against non-memorized prompts. Writes OUT/detect.json (AUC, TPR at 1% FPR, seconds per
prompt, every score), OUT/detect.md, OUT/roc.png.

    memtrain detect --max_prompts 10                 # the cached testbed: memorized vs unique prompts
    memtrain detect --model /path/to/sd-v1-4 --memorized M.jsonl --non_memorized N.jsonl
"""

from __future__ import annotations

from memtrain.commands.base import Command
from memtrain.core.report import CommandResult
from memtrain.eval.detect_run import DetectConfig, detect
from memtrain.testbed.resolver import resolve_model


def run(config: DetectConfig, line=None) -> CommandResult:
    return detect(config, resolve_model(config.model, progress=config.progress))


def show(result: CommandResult) -> str:
    if result.plan:
        return result.plan_text
    lines = [f"{name:<17} AUC {r['auc']:.3f}  TPR@1%FPR {r['tpr_at_1pct_fpr']:.2f}  {r['seconds_per_prompt']:.2f} s/prompt"
             for name, r in result.report["detectors"].items()]
    return "\n".join([*lines, f"wrote {result.output_dir}"])


COMMAND = Command("detect", __doc__, DetectConfig, run, show)
