"""The audit (paper 004 Table 1): pipeline (stages of work), verdict rules, report."""

from memtrain.eval.audit.pipeline import audit, default_output_dir, resolve_inputs
from memtrain.eval.audit.recipe import (AuditConfig, AuditRecipe, audit_config, build_mitigations, config_for_model, load_audit_recipe,
                                        model_recipe)
from memtrain.eval.audit.result import AuditResult, AuditRow
from memtrain.eval.audit.report import markdown, summary, table_rows
from memtrain.eval.audit.verdict import VERDICTS, VerdictRule, verdict, verdict_reason

__all__ = ["AuditConfig", "AuditResult", "AuditRow", "AuditRecipe", "VERDICTS", "VerdictRule", "audit", "build_mitigations",
           "default_output_dir", "load_audit_recipe", "markdown", "resolve_inputs", "model_recipe", "audit_config", "config_for_model", "summary",
           "table_rows", "verdict", "verdict_reason"]
