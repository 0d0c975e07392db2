"""The fine-tuner's outputs: output_dir/model (the whole bundle, or the LoRA weights),
output_dir/run_summary.json and the per-rank debug checksums."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict

from memtrain.core.bundle import load_bundle
from memtrain.core.errors import MemtrainError
from memtrain.core.files import replace_dir, write_json
from memtrain.core.report import versioned
from memtrain.core.run import gather_list
from memtrain.core.runtime import DTYPE_NAMES
from memtrain.core.sampling import SAMPLER_FILE
from memtrain.train.checkpoints import param_checksum

log = logging.getLogger(__name__)


def precision(trainer) -> dict:
    """What ran in which precision: the launch, the trained U-Net and the frozen parts."""
    return {"world_size": trainer.world, "distributed_type": str(trainer.acc.distributed_type),
            "mixed_precision": trainer.acc.mixed_precision, "unet_dtype": DTYPE_NAMES[trainer.unet_dtype],
            "frozen_dtype": DTYPE_NAMES[trainer.frozen_dtype]}


def write_summary(trainer, model_dir: Path, step: int) -> None:
    """output_dir/run_summary.json: the model, the steps run, the precision, the runtime
    (device, dtype, batch sizes, peak memory of the main process) and each process's work
    per stage (collective: every process sends its counts)."""
    work = gather_list([dict(trainer.work)], trainer.acc)
    log.info("rank %d work: %s", trainer.rank, dict(trainer.work))
    if trainer.acc.is_main_process:
        write_json(trainer.out / "run_summary.json", versioned({"model": str(model_dir), "global_step": step,
                                                      **precision(trainer), "runtime": trainer.runtime.to_dict(),
                                                      "work_per_rank": work}))


def write_checksum(trainer) -> None:
    """output_dir/debug/rank<r>_checksum.json: this rank's U-Net checksum (ranks must agree)."""
    folder = trainer.out / "debug"
    folder.mkdir(parents=True, exist_ok=True)
    plugin = trainer.acc.state.deepspeed_plugin
    info = {"rank": trainer.rank, "world_size": trainer.world, "distributed_type": str(trainer.acc.distributed_type),
            "zero_stage": plugin.zero_stage if plugin is not None else None,
            **param_checksum(trainer.bundle.unet)}  # the trained U-Net, whole under ZeRO-3 too
    (folder / f"rank{trainer.rank}_checksum.json").write_text(json.dumps(info))


def save_final(trainer) -> Path:
    """output_dir/model: the whole bundle (full) or a save_lora_weights file (LoRA)."""
    acc, target = trainer.acc, trainer.out / "model"
    # the trained U-Net (after prepare bundle.unet is it, or under ZeRO-3 its whole copy)
    unet = trainer.bundle.unet
    if trainer.ema is not None:
        trainer.ema.copy_to(trainer.params)
    if trainer.recipe.train.finetune != "lora":
        return save_pipeline(acc, trainer.bundle, target, trainer.frozen_dtype)

    def lora(tmp: Path) -> None:
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionLoraLoaderMixin.save_lora_weights(save_directory=str(tmp), unet_lora_layers=layers,
                                                         safe_serialization=True)

    return _write_staged(acc, target, lora)


def save_pipeline(acc, bundle, target: Path, frozen_dtype: torch.dtype = torch.float32) -> Path:
    """The whole pipeline folder with `bundle.unet` as trained (a model a publisher could release),
    written beside `target` and renamed into place by the main process. The U-Net is saved as
    trained: fp32 master weights under accelerate; DeepSpeed's half-precision module under
    DeepSpeed (its fp32 copy is sharded in the checkpoints). Frozen parts cast to
    `frozen_dtype` are saved as they came. Collective."""
    def pipeline(tmp: Path) -> None:
        saved = bundle
        if frozen_dtype != torch.float32:  # the frozen parts as they came, not cast
            saved = dataclasses.replace(load_bundle(bundle.path), unet=bundle.unet)
        saved.save(tmp)
        sampler = Path(bundle.path) / SAMPLER_FILE
        if sampler.is_file():
            shutil.copy(sampler, tmp / SAMPLER_FILE)

    return _write_staged(acc, Path(target), pipeline)


def _write_staged(acc, target: Path, write) -> Path:
    """`write(tmp)` into a hidden sibling of `target`, renamed into place (main process); a full
    disk leaves no half model where the last one was. Collective."""
    if acc.is_main_process:
        tmp = target.parent / f".{target.name}.partial"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            write(tmp)
            replace_dir(tmp, target)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _save_failed(target, e) from e
    acc.wait_for_everyone()
    return target


def _save_failed(target: Path, e: OSError) -> MemtrainError:
    return MemtrainError(f"saving the trained model to {target} failed ({e.strerror or e}); the partial folder "
                         "was removed and the checkpoints are kept: free space, then rerun with "
                         "--resume_from_checkpoint latest")


def set_aside_previous(recipe, acc, out: Path) -> Path | None:
    """--overwrite without resuming: the previous run in output_dir moves to a hidden sibling
    (same name on every rank), deleted by `drop_previous` once this run completes and kept if it
    fails, so replacing a run never loses it before the new one exists."""
    if not (recipe.overwrite and not recipe.checkpoint_to_resume and out.is_dir() and any(out.iterdir())):
        return None
    previous = out.parent / f".{out.name}.previous"
    if previous.exists():
        raise MemtrainError(f"'{previous}' holds a run set aside by an earlier --overwrite that did not "
                            "complete: move or delete it, then rerun")
    acc.wait_for_everyone()  # every rank has looked at output_dir before it moves
    if acc.is_main_process:
        out.rename(previous)
        log.info("--overwrite: the previous run moved to %s until this one completes", previous)
    acc.wait_for_everyone()
    return previous


def drop_previous(acc, previous: Path | None) -> None:
    """Delete the run `set_aside_previous` kept, now that the new one is complete."""
    if previous is not None and acc.is_main_process:
        shutil.rmtree(previous, ignore_errors=True)
