"""Audit memorization mitigations (paper 004 Table 1): the unmitigated model, each mitigation on
the memorized prompts, each mitigation under the Dori attack, and the false-positive control
(the same attack on held-out images). Writes OUT/report.json, OUT/report.md, OUT/grids/.

    accelerate launch scripts/audit.py --mitigation none nemo wanda pad_eot pad_mask

Without --model: the cached testbed, its manifests and recipes/audit_testbed.yaml; with a --model
that is not a testbed: recipes/audit_sd14.yaml, and --manifest/--control_manifest are required.
On CPU, several processes:
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no scripts/audit.py ...
W&B without an account: WANDB_MODE=offline ... --report_to wandb (run folder: OUT/wandb/).
"""

from memtrain.core.cli import config_from_cli, run_main
from memtrain.core.run import is_main_process
from memtrain.eval.audit import AuditConfig, audit, summary
from memtrain.testbed.resolver import resolve_model


@run_main
def main(argv=None) -> None:
    cfg = config_from_cli(AuditConfig, __doc__, argv)
    doc = audit(cfg, resolve_model(cfg.model, progress=cfg.progress))
    if is_main_process():
        print(doc["plan_text"] if cfg.runtime.plan else summary(doc))


if __name__ == "__main__":
    main()
