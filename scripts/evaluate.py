"""Evaluate memorization: generate per prompt and seed, score against the training images,
write OUT/metrics.json, OUT/report.md and OUT/grids/*.png.

    accelerate launch scripts/evaluate.py --manifest M [--model DIR] [--seeds 10] [--output_dir OUT]

Without --model: the cached testbed; without --manifest: the model's memorized manifest.
Sampler overrides: --scheduler, --num_inference_steps (or --steps), --guidance_scale, --batch_size.
On CPU, run several processes with
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no scripts/evaluate.py ...
W&B without an account: WANDB_MODE=offline ... --report_to wandb (run folder: OUT/wandb/).
"""

from memtrain.core.cli import config_from_cli, run_main
from memtrain.core.run import is_main_process
from memtrain.eval.evaluate import EvaluateConfig, evaluate
from memtrain.eval.evaluate_report import summary
from memtrain.testbed.resolver import resolve_model


@run_main
def main(argv=None) -> None:
    cfg = config_from_cli(EvaluateConfig, __doc__, argv)
    metrics = evaluate(cfg, resolve_model(cfg.model, progress=cfg.progress))
    if is_main_process():
        print(metrics["plan_text"] if cfg.runtime.plan else summary(metrics))


if __name__ == "__main__":
    main()
