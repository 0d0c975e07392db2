"""Evaluate memorization: generate per prompt and seed, score against the training images,
write OUT/metrics.json, OUT/report.md and OUT/grids/*.png.

    accelerate launch scripts/evaluate.py --manifest M [--model DIR] [--seeds 10] [--output_dir OUT]

Without --model: the cached testbed; without --manifest: the testbed's memorized manifest.
On CPU, run several processes with
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no scripts/evaluate.py ...
W&B without an account: WANDB_MODE=offline ... --report_to wandb (run folder: OUT/wandb/).
"""

import argparse

from memtrain.cli import run_main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", help="JSONL manifest (id, prompt, image); default: the testbed's memorized set")
    p.add_argument("--model", help="diffusers SD folder or hub id (or a testbed folder); default: the cached testbed")
    p.add_argument("--seeds", type=int, default=10, help="generations per prompt, seeds 0..N-1 (default 10)")
    p.add_argument("--output_dir", help="default: evaluations/<model>-<manifest>-<time>")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dir (once the new one is complete)")
    p.add_argument("--metric", help="SSCD backend: onnx (default), a TorchScript/.onnx path, or standin")
    p.add_argument("--allow_standin", action="store_true", help="permit the named stand-in descriptor")
    p.add_argument("--strict", action="store_true", help="a missing training image fails instead of being skipped")
    p.add_argument("--clip_model", help="CLIPModel folder for A_CLIP (default on the testbed: its clip/)")
    p.add_argument("--lpips_model", help="TorchScript LPIPS file for cross-seed LPIPS diversity")
    p.add_argument("--fid_manifest", help="FID/KID of generations vs this manifest's images (shipped Inception)")
    p.add_argument("--fid_prompts", type=int, help="use at most N items of the FID manifest "
                   "(on the testbed without --fid_manifest: its utility manifest)")
    p.add_argument("--guidance_scale", type=float, help="override the model's default guidance")
    p.add_argument("--steps", type=int, help="override the model's default number of sampling steps")
    p.add_argument("--scheduler", help="override the model's default scheduler (ddim, ddpm, dpm)")
    p.add_argument("--batch_size", type=int, help="images per sampling batch")
    p.add_argument("--report_to", choices=["none", "wandb"], default=None, help="also log to W&B")
    p.add_argument("--project", default="memtrain-evaluate", help="tracker project name")
    p.add_argument("--chunk_items", type=int, default=16, help="prompts per work unit spread over processes "
                   "(figures are identical for any process count at a fixed value)")
    p.add_argument("--grid_items", type=int, default=32, help="prompts shown in the image grids")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


@run_main
def main(argv=None) -> None:
    from memtrain.distributed import is_main_process
    from memtrain.evaluate import EvaluateConfig, evaluate, summary

    args = vars(parse_args(argv))
    progress = not args.pop("no_progress")
    metrics = evaluate(EvaluateConfig(**args, progress=progress))
    if is_main_process():
        print(summary(metrics))


if __name__ == "__main__":
    main()
