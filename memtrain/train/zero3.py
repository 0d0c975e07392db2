"""DeepSpeed ZeRO-3 in the fine-tuner: a whole, unpartitioned copy of the trained U-Net.

ZeRO-3 (Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models") keeps only each rank's shard of every weight: outside the engine's forward the U-Net's
parameters are 0-sized placeholders, and a forward that not every rank makes (a main-process
audit, a per-rank attack that stops early) waits forever for the other ranks' shards. So under
ZeRO-3 the trainer's no-grad uses of the U-Net (crafting y_adv, the audits, checksums, the saved
model) read `bundle.unet` = a plain copy of it, filled collectively (every rank gathers every
shard) after each optimizer update and after a checkpoint is loaded, the only times the weights
change; the training forward and backward run on the engine as before.

Cost: one all-gather of the U-Net per optimizer update (the engine already gathers it for each
micro-step's forward and backward) and one whole copy per rank in the engine's dtype: ZeRO-3
here saves the optimizer state, gradients and fp32 master weights, not the weights themselves.
"""

from __future__ import annotations

import copy

import deepspeed
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from memtrain.core.errors import MemtrainError

# elements gathered per collective: few collectives, and a bounded extra full-size buffer
GATHER_ELEMENTS = 1 << 26


def is_zero3(acc: Accelerator) -> bool:
    """Whether the launch is DeepSpeed with ZeRO stage 3."""
    plugin = acc.state.deepspeed_plugin
    return acc.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3


def whole_copy(unet: torch.nn.Module, acc: Accelerator, ema: bool) -> torch.nn.Module | None:
    """Before accelerator.prepare: under ZeRO-3 a copy of the U-Net that DeepSpeed never
    partitions (read only: no weight gradients); None otherwise. EMA is refused: its shadow
    weights would copy the placeholders."""
    if not is_zero3(acc):
        return None
    if ema:
        raise MemtrainError("train.ema.use is not supported under DeepSpeed ZeRO-3 (the EMA would average "
                            "0-sized weight shards): use ZeRO-2 (accelerate_configs/deepspeed_zero2.yaml) "
                            "or train.ema.use=false")
    mirror = copy.deepcopy(unet)
    mirror.requires_grad_(False)
    return mirror


@torch.no_grad()
def refresh(module: torch.nn.Module, mirror: torch.nn.Module) -> None:
    """Copy the partitioned `module`'s weights into `mirror`; collective: every rank calls it."""
    params, mine = list(module.parameters()), list(mirror.parameters())
    start = 0
    while start < len(params):
        stop, size = start, 0
        while stop < len(params) and (stop == start or size + params[stop].ds_numel <= GATHER_ELEMENTS):
            size += params[stop].ds_numel
            stop += 1
        with deepspeed.zero.GatheredParameters(params[start:stop], modifier_rank=None):
            for p, q in zip(params[start:stop], mine[start:stop]):
                q.copy_(p.data)
        start = stop


def attach(engine, mirror: torch.nn.Module) -> torch.nn.Module:
    """After accelerator.prepare: cast `mirror` to the engine's dtype, fill it, and refill it
    after every optimizer update (engine.step) and checkpoint load; returns it for `bundle.unet`."""
    module = engine.module
    names = [n for n, _ in module.named_parameters()]
    if names != [n for n, _ in mirror.named_parameters()]:
        raise MemtrainError("internal: the ZeRO-3 copy of the U-Net does not match the prepared one")
    mirror.to(dtype=next(module.parameters()).dtype)
    refresh(module, mirror)
    step, load = engine.step, engine.load_checkpoint

    def stepped(*args, **kwargs):
        before = engine.global_steps  # counts updates, skipped (fp16 overflow) ones too
        out = step(*args, **kwargs)
        if engine.global_steps != before:
            refresh(module, mirror)
        return out

    def loaded(*args, **kwargs):
        out = load(*args, **kwargs)
        refresh(module, mirror)
        return out

    # on the instance: accelerate's backward and load_state call these on every rank in step
    engine.step, engine.load_checkpoint = stepped, loaded
    return mirror
