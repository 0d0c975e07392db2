#!/usr/bin/env python
"""Throughput of one adversarial fine-tuning step: concatenated forward vs two forwards.

    OMP_NUM_THREADS=1 python scripts/bench_finetune.py recipes/testbed.yaml output_dir=/tmp/bench_ft

Sets up the trainer from a recipe (surrogates are generated or reused from output_dir), fixes
y_adv to the prompt embedding (the attack is not what is measured), then times `--steps`
optimizer steps per mode after `--warmup` steps and prints samples/s and their ratio.
"""

from __future__ import annotations

import argparse
import time

from memtrain.cli import run_main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    return parser.parse_args(argv)


def time_steps(trainer, concat: bool, steps: int, warmup: int) -> float:
    """samples/s of full steps (forward, backward, optimizer) for one forward mode."""
    from memtrain.text import encode_prompts
    from memtrain.train.trainer import Position, generator

    y_adv = encode_prompts(trainer.bundle, [trainer.items[0].prompt]).embeddings
    samples, start = 0, None
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        g = generator(0, i)
        util, y_util = trainer.utility_batch(Position(0, 0, i % 3), g)
        surr = trainer.surrogate_batch(0, g)
        loss_adv, loss_dm = trainer.losses(surr, y_adv, util, y_util, g, concat=concat)
        trainer.acc.backward(loss_adv + loss_dm)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            samples += len(surr) + len(util)
    return samples / (time.perf_counter() - start)


@run_main
def main(argv=None) -> None:
    args = parse_args(argv)
    from memtrain.train.recipe import load_recipe
    from memtrain.train.trainer import AdvFinetuner

    trainer = AdvFinetuner(load_recipe(args.recipe, args.overrides))
    trainer.setup()
    trainer.prepare_model()
    rates = {}
    for concat in (False, True, False, True):  # interleaved: CPU speed drifts on shared machines
        key = "concatenated" if concat else "separate"
        rates.setdefault(key, []).append(time_steps(trainer, concat, args.steps, args.warmup))
    best = {k: max(v) for k, v in rates.items()}
    for key, value in best.items():
        print(f"{key:>13}: {value:8.2f} samples/s  (runs: {', '.join(f'{x:.2f}' for x in rates[key])})")
    print(f"concatenated / separate: {best['concatenated'] / best['separate']:.2f}x "
          f"(batch {trainer.recipe.train.surrogate_batch_size} surrogate + {trainer.recipe.train.utility_batch} utility, "
          f"{trainer.world} process(es))")


if __name__ == "__main__":
    main()
