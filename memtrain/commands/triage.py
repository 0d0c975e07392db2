"""`memtrain triage`: which prompts of a release replicate their training image on a model (max
SSCD_Orig over the seeds above the threshold)? Writes evaluate's outputs plus
OUT/replicating.jsonl, OUT/non_replicating.jsonl, OUT/duplicates.json, OUT/triage.json, OUT/triage.md.

    memtrain fetch sdv1_500_memorized.jsonl --output_dir wen500
    accelerate launch -m memtrain triage wen500 --model /path/to/sd-v1-4 --output_dir triage/wen500

RELEASE: a manifest with local images, or a `memtrain fetch` output folder. Resumable: a killed
run continues with --resume (same command line).
"""

from __future__ import annotations

from memtrain.commands.base import Command, result_of
from memtrain.core.command_line import Positional
from memtrain.core.report import CommandResult
from memtrain.eval.triage import TriageConfig, triage
from memtrain.testbed.resolver import resolve_model


def run(config: TriageConfig, line=None) -> CommandResult:
    return result_of(triage(config, resolve_model(config.model, progress=config.progress)), config.plan)


def show(result: CommandResult) -> str:
    if result.plan:
        return result.plan_text
    return (f"{result.report['n_replicating']} of {result.report['n_evaluated']} prompts replicate; "
            f"manifests in {result.output_dir}")


COMMAND = Command("triage", __doc__, TriageConfig, run, show,
                  positionals=(Positional("release", "RELEASE", "a manifest with local images, or a "
                                          "`memtrain fetch` output folder"),),
                  skip=("manifest", "release"))
