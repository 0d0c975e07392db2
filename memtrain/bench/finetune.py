"""Throughput of adversarial fine-tuning, each comparison measured in one run: one concatenated
U-Net forward for the surrogate and utility halves against two forwards (paper 004 App. I), and
the trainer with its speedups (AdvFinetuner speedups=True) against without them."""

from __future__ import annotations

import dataclasses
import time

from memtrain.core.bundle import ModelDefaults
from memtrain.core.diffusion import generator
from memtrain.core.text import encode_prompts
from memtrain.train import checks
from memtrain.train.recipe import Recipe
from memtrain.train.trainer import AdvFinetuner, Position


def time_steps(trainer: AdvFinetuner, concat: bool, steps: int, warmup: int) -> float:
    """samples/s of full steps (forward, backward, optimizer) for one forward mode; y_adv is
    fixed to the prompt embedding (the attack is not what is measured)."""
    y_adv = encode_prompts(trainer.bundle, [trainer.items[0].prompt]).embeddings
    samples, start = 0, time.perf_counter()
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


def bench_finetune(trainer: AdvFinetuner, steps: int = 10, warmup: int = 2) -> str:
    """Both modes, interleaved twice (CPU speed drifts on shared machines); the best of each."""
    trainer.setup()
    trainer.prepare_model()
    rates: dict[str, list[float]] = {}
    for concat in (False, True, False, True):
        rates.setdefault("concatenated" if concat else "separate", []).append(time_steps(trainer, concat, steps, warmup))
    best = {k: max(v) for k, v in rates.items()}
    lines = [f"{k:>13}: {v:8.2f} samples/s  (runs: {', '.join(f'{x:.2f}' for x in rates[k])})" for k, v in best.items()]
    r = trainer.recipe.train
    lines.append(f"concatenated / separate: {best['concatenated'] / best['separate']:.2f}x (batch "
                 f"{r.surrogate_batch_size} surrogate + {r.utility_batch} utility, {trainer.world} process(es))")
    return "\n".join(lines)


def time_training(trainer: AdvFinetuner, steps: int) -> float:
    """Seconds for `steps` optimizer steps as the training loop runs them, with the trainer's own
    pieces: y_adv crafted (`craft`) every `updates_per_embedding` steps, the losses, backward and
    the optimizer; then one per-epoch audit (`checks.epoch_audit`) when the recipe runs one."""
    r, acc = trainer.recipe, trainer.acc
    pos, y_adv = Position(), None
    start = time.perf_counter()
    for _ in range(steps):
        image = (pos.group * trainer.world + trainer.rank) % len(trainer.items)
        if pos.update == 0:
            y_adv, _ = trainer.craft(pos.epoch, image)
        g = generator(r.seed, pos.epoch, pos.group, pos.update, trainer.rank)
        util, y_util = trainer.utility_batch(pos, g)
        surr = trainer.surrogate_batch(image, g)
        loss_adv, loss_dm = trainer.losses(surr, y_adv, util, y_util, g, concat=r.train.concat_forward)
        acc.backward(loss_adv + loss_dm)
        if acc.sync_gradients and r.train.max_grad_norm:
            acc.clip_grad_norm_(trainer.params, r.train.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        pos = pos.advance(trainer.groups, r.train.updates_per_embedding)
    if r.audit.epoch_end:
        checks.epoch_audit(trainer.check_context(), pos.epoch, steps)
    return time.perf_counter() - start


def bench_speedups(recipe: Recipe, defaults: ModelDefaults | None, steps: int = 6) -> str:
    """Today's trainer (speedups=False) against the sped-up one on the same work: two fresh
    trainers, each set up (the second reuses the first's surrogates from output_dir), timed once
    each. Gradient checkpointing is switched on where the recipe has it off (what the speedups
    touch), and the output says so."""
    lines = []
    if not recipe.train.gradient_checkpointing:
        recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, gradient_checkpointing=True))
        lines.append("train.gradient_checkpointing=true for both runs (the recipe has it off)")
    seconds = {}
    for speedups in (False, True):
        trainer = AdvFinetuner(recipe, defaults=defaults, speedups=speedups)
        trainer.setup()
        trainer.prepare_model()
        seconds[speedups] = time_training(trainer, steps)
    audit = " + one per-epoch audit" if recipe.audit.epoch_end else ""
    lines += [f"{steps} steps{audit}, updates_per_embedding={recipe.train.updates_per_embedding}:",
              f"  speedups off: {seconds[False]:8.1f} s", f"  speedups on:  {seconds[True]:8.1f} s",
              f"speedup {seconds[False] / seconds[True]:.2f}x"]
    return "\n".join(lines)
