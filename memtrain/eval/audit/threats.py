"""Threat models in the audit: which attacker each mitigation is audited against and
how each is answered. `weights`: the attacker has the released weights and their own sampler, so
an inference-time fix is `bypassed` for free and a weight edit faces the embedding attack on the
edited weights; `embedding`: adversarial text embeddings through the deployed pipeline; `prompt`:
hard prompts (token strings) through the whole pipeline, prompt rewrites included."""

from __future__ import annotations

from typing import Sequence

from memtrain.core import report
from memtrain.core.errors import MemtrainError
from memtrain.metrics import not_computed
from memtrain.mitigations import THREAT_MODELS, Mitigation


def plan_threats(mitigation: Mitigation, requested: Sequence[str] | None) -> dict[str, str]:
    """threat model -> how it is answered: "bypassed" (no compute) or the attack space
    ("embedding", "prompt"). `requested` None: every threat model that applies; a named one that
    does not apply is a MemtrainError saying why."""
    plan = {}
    for threat in requested or THREAT_MODELS:
        reason = mitigation.threat_model_reason(threat)
        if reason is not None:
            if requested:
                raise MemtrainError(f"--threat_model {threat} does not apply to --mitigation {mitigation.name}: {reason}")
            continue
        if mitigation.bypassed_by(threat):
            plan[threat] = "bypassed"
        else:  # with the weights, an attacker feeds embeddings to their own sampler on the edited weights
            plan[threat] = "prompt" if threat == "prompt" else "embedding"
    return plan


def result_label(name: str, threat: str) -> str:
    """A result's name in tables and grids: the mitigation, with its threat model unless `embedding`
    (today's attack, the label plain audits have always used)."""
    return name if threat == "embedding" else f"{name} [{threat}]"


def bypassed_result(mitigation: Mitigation, threat: str, mr) -> dict:
    """The report entry of an inference-time mitigation under `weights`: the attacker samples without
    it, so the images come back exactly as from the unmitigated model (MR `mr`). Nothing is computed."""
    reason = (f"an attacker with the released weights runs a sampler without '{mitigation.name}' (it acts at "
              f"generation time, not in the weights): the memorized images replicate as unmitigated (MR "
              f"{report.format_value(mr)})")
    result = {"mitigation": mitigation.name, "variant": mitigation.variant, "threat_model": threat, "label": result_label(mitigation.name, threat),
              "attack_space": None, "attack_name": None, "attack_variant": "none needed", "mr_unmitigated": mr, "mr_prompt": mr,
              "mr_attack": mr, "mr_control": not_computed("no attack was run"), "verdict": "bypassed",
              "verdict_reason": reason, "description": mitigation.describe(), "failed_targets": []}
    return result
