"""Audit memorization mitigations (paper 004 Table 1): the unmitigated model, each mitigation on
the memorized prompts, each mitigation under the Dori attack, and the false-positive control
(the same attack on held-out images). Writes OUT/report.json, OUT/report.md, OUT/grids/.

    accelerate launch scripts/audit.py --mitigation none nemo wanda pad_eot pad_mask

Without --model: the cached testbed and its manifests (memorized, held_out, unique, utility)
and recipes/audit_testbed.yaml; with a --model that is not a testbed: recipes/audit_sd14.yaml
(paper 004's attack defaults) and --manifest/--control_manifest are required.
On CPU, several processes:
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no scripts/audit.py ...
W&B without an account: WANDB_MODE=offline ... --report_to wandb (run folder: OUT/wandb/).
"""

import argparse

from memtrain.cli import run_main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mitigation", dest="mitigations", nargs="+", required=True, metavar="NAME",
                   help="mitigations to audit (none, nemo, wanda, pad_eot, pad_mask, ...)")
    p.add_argument("--model", help="diffusers SD folder or hub id (or a testbed folder); default: the cached testbed")
    p.add_argument("--lora", help="U-Net LoRA weights to fuse into --model first (adv_finetune's output_dir/model "
                                   "of a finetune: lora run)")
    p.add_argument("--manifest", help="memorized targets (id, prompt, image); default: the testbed's memorized set")
    p.add_argument("--control_manifest", help="held-out images for the false-positive control; default: testbed held_out")
    p.add_argument("--reference_manifest", help="non-memorized prompts (NeMo statistics); default: testbed unique")
    p.add_argument("--utility_manifest", help="prompts + images for FID/KID; default: testbed utility (a small subset)")
    p.add_argument("--output_dir", help="default: audits/<model>-<time>")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dir (once the new one is complete)")
    p.add_argument("--report_to", choices=["none", "wandb", "tensorboard"], default=None, help="also log to a tracker")
    p.add_argument("--project", default="memtrain-audit", help="tracker project name")
    p.add_argument("--seeds", type=int, help="generations per input, seeds 0..N-1 (default: the recipe's, 10)")
    p.add_argument("--recipe", help="audit recipe YAML (default: recipes/audit_testbed.yaml on the testbed, "
                   "recipes/audit_sd14.yaml otherwise)")
    p.add_argument("--metric", help="SSCD backend: onnx (default), a TorchScript/.onnx path, or standin")
    p.add_argument("--allow_standin", action="store_true", help="permit the named stand-in descriptor")
    p.add_argument("--clip_model", help="CLIPModel folder for A_CLIP (default on the testbed: its clip/)")
    p.add_argument("--max_targets", type=int, help="audit only the first N targets (default: the recipe's)")
    p.add_argument("--attack_steps", type=int, help="override the recipe's attack steps")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


@run_main
def main(argv=None) -> None:
    from memtrain.audit import AuditConfig, audit, summary
    from memtrain.distributed import is_main_process

    args = vars(parse_args(argv))
    progress = not args.pop("no_progress")
    doc = audit(AuditConfig(**args, progress=progress))
    if is_main_process():
        print(summary(doc))


if __name__ == "__main__":
    main()
