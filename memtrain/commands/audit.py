"""`memtrain audit`: does each mitigation remove the memorized images or only hide them? The
unmitigated model, each mitigation on the memorized prompts and under the Dori attack (and the
prompt-space attack), and the false-positive control (the same attack on held-out images), with
a verdict per mitigation and threat model (paper 004's Table 1). Writes OUT/report.json,
OUT/report.md, OUT/grids/.

    memtrain audit --mitigation none nemo wanda pad_eot pad_mask
    accelerate launch -m memtrain audit --model /path/to/sd-v1-4 --manifest M.jsonl \\
        --control_manifest H.jsonl --mitigation all attack.steps=100

Without --model: the cached testbed (built on first use) with its manifests and its recipe; with
another model: the packaged audit_sd14.yaml (paper 004's settings). A RECIPE.yaml replaces the
model's recipe; key=value and flags change single keys.
"""

from __future__ import annotations

from memtrain.commands.base import Command
from memtrain.core.command_line import CommandLine
from memtrain.eval.audit import AuditConfig, AuditResult, audit, config_for_model, summary
from memtrain.testbed.resolver import resolve_model


def run(config: AuditConfig, line: CommandLine) -> AuditResult:
    """Resolve the model, put the command line over its recipe (or RECIPE.yaml), run the audit."""
    defaults = resolve_model(config.model, progress=config.progress)
    return audit(config_for_model(line, defaults), defaults)


def show(result: AuditResult) -> str:
    return result.plan["plan_text"] if result.plan else summary(result.report)


COMMAND = Command("audit", __doc__, AuditConfig, run, show)
