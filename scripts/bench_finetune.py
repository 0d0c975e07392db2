#!/usr/bin/env python
"""Adversarial fine-tuning speed: concatenated forward vs two forwards, and the trainer's speedups.

    OMP_NUM_THREADS=1 python scripts/bench_finetune.py recipes/testbed.yaml output_dir=/tmp/bench_ft

Sets up the trainer from a recipe (surrogates are generated or reused from output_dir), fixes
y_adv to the prompt embedding, times `--steps` optimizer steps per mode after `--warmup` steps
and prints samples/s and their ratio. Then times `--steps` full steps (crafting y_adv every
updates_per_embedding steps) plus one per-epoch audit on a fresh trainer with speedups=False and
one with speedups=True, and prints the seconds of each and the "speedup" ratio.
"""

from __future__ import annotations

import argparse

from memtrain.core.cli import run_main
from memtrain.testbed.resolver import resolve_recipe
from memtrain.bench.finetune import bench_finetune, bench_speedups
from memtrain.train.recipe import load_recipe
from memtrain.train.trainer import AdvFinetuner


@run_main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    recipe, defaults = resolve_recipe(load_recipe(args.recipe, args.overrides))
    print(bench_finetune(AdvFinetuner(recipe, defaults=defaults), args.steps, args.warmup), flush=True)
    print(bench_speedups(recipe, defaults, args.steps))


if __name__ == "__main__":
    main()
