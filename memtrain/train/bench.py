"""Throughput of one adversarial fine-tuning step: one concatenated U-Net forward for the
surrogate and utility halves against two forwards, measured in one run (paper 004 App. I)."""

from __future__ import annotations

import time

from memtrain.core.diffusion import generator
from memtrain.core.text import encode_prompts
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
