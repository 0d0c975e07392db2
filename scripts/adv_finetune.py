#!/usr/bin/env python
"""Adversarial fine-tuning against memorization (paper 004 Sec. 4.4, Alg. 2).

    accelerate launch scripts/adv_finetune.py recipes/testbed.yaml train.epochs=1
    accelerate launch --config_file accelerate_configs/multi_gpu_ddp.yaml \\
        scripts/adv_finetune.py recipes/sd14.yaml --resume_from_checkpoint latest
"""

from __future__ import annotations

import argparse

from memtrain.core.cli import run_main
from memtrain.core.run import is_main_process
from memtrain.testbed.resolver import resolve_recipe
from memtrain.train.recipe import load_recipe
from memtrain.train.trainer import train


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=1")
    parser.add_argument("--resume_from_checkpoint", default=None,
                        help="'latest' (newest complete checkpoint under output_dir/checkpoints) or a path")
    return parser.parse_args(argv)


@run_main
def main(argv=None) -> None:
    args = parse_args(argv)
    recipe, defaults = resolve_recipe(load_recipe(args.recipe, args.overrides))
    model_dir = train(recipe, resume_from_checkpoint=args.resume_from_checkpoint, defaults=defaults)
    if is_main_process():
        print(f"fine-tuned model: {model_dir}")


if __name__ == "__main__":
    main()
