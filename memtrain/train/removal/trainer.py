"""The removal methods' shared trainer on the fine-tuner's scaffolding: accelerate (DDP over gloo on
the CPU, DeepSpeed ZeRO-1/2, mixed precision as memtrain.train.trainer handles it), atomic
checkpoints with `--resume_from_checkpoint latest` (memtrain.train.checkpoints), trackers, and
the saved pipeline folder (memtrain.train.outputs.save_pipeline).

A method (REMOVAL_METHODS) prepares its jobs (collective: anchors, splits), names the U-Net
weights it trains and the loss of one micro-step; the trainer runs each job: one for ESD and
Concept Ablation (one model for every memorized item), one per item for SISS (each from the
original U-Net). Every random draw of a micro-step comes from a generator seeded by (seed, job,
step, micro-step, rank): a resumed run replays exactly the draws the uninterrupted one made.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate.utils import DistributedType

from memtrain.core import progress
from memtrain.core.bundle import ModelDefaults, load_bundle, quiet_diffusers
from memtrain.core.config import flat_items
from memtrain.core.diffusion import generator, training_scheduler
from memtrain.core.errors import MemtrainError
from memtrain.core.files import write_json
from memtrain.core.manifest import read_manifest
from memtrain.core.registry import Registry
from memtrain.core.report import versioned
from memtrain.core.run import finish_trackers, gather_list, init_trackers, make_accelerator
from memtrain.core.runtime import DTYPE_NAMES, RuntimeOptions, resolve_runtime
from memtrain.train import outputs
from memtrain.train.checkpoints import check_finite, load_checkpoint, param_checksum, save_checkpoint
from memtrain.train.recipe import TESTBED
from memtrain.train.removal.recipe import RemovalRecipe, first_difference
from memtrain.train.trainer import HALF, make_optimizer

log = logging.getLogger(__name__)
REMOVAL_METHODS = Registry("removal method", key=lambda cls: cls.name)
JOB_SUMMARY = "job_summary.json"


@dataclass
class RemovalRun:
    """What a removal training did (also OUT/run_summary.json)."""

    method: str
    model_dirs: dict[str, str]  # memorized item id -> the diffusers folder it is removed in
    skipped: dict[str, str]  # item id -> why it could not be removed (no anchors, no split)
    seconds: float  # wall time of preparation (anchors, splits) and training
    peak_memory_gb: float  # CUDA max allocated on a GPU, peak RSS on the CPU (main process)
    summary: dict = field(default_factory=dict)


@dataclass
class Job:
    """One training: the items it removes, where its model and checkpoints go, the method's data."""

    name: str
    items: list[int]
    folder: Path  # model/ and job_summary.json go here
    ckpt_root: Path
    data: Any = None

    @property
    def model_dir(self) -> Path:
        return self.folder / "model"


class RemovalMethod:
    """A removal method: its jobs, the weights it trains, one micro-step's loss."""

    name: ClassVar[str] = ""
    per_item: ClassVar[bool] = False  # one job (and model) per memorized item
    deepspeed: ClassVar[bool] = True  # False: its gradients are combined by hand (refused under DeepSpeed)

    def __init__(self, trainer: "RemovalTrainer"):
        self.t = trainer
        self.spec = getattr(trainer.recipe, self.name)

    def prepare(self) -> tuple[list[Job], dict[str, str], dict]:
        """(jobs, skipped item id -> why, what the preparation found). Collective."""
        raise NotImplementedError

    def trainable(self, unet) -> list[str]:
        raise NotImplementedError

    def rows(self) -> int:
        """U-Net rows with gradients per micro-step and process (DeepSpeed's micro batch)."""
        return self.t.train.batch

    def learning_rate(self, lr: float) -> float:
        """The optimizer's learning rate for the recipe's (Concept Ablation scales it)."""
        return lr

    def start_job(self, job: Job) -> None:
        """Per-job setup once the model is prepared (encode its images, ...)."""

    def loss(self, job: Job, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def optimizer_step(self, job: Job, step: int) -> dict:
        """`gradient_accumulation_steps` micro-steps and one optimizer update; the last micro-step's logs."""
        t, acc = self.t, self.t.acc
        logs: dict = {}
        for micro in range(t.train.gradient_accumulation_steps):
            g = t.micro_generator(job, step, micro)
            with acc.accumulate(t.model):
                loss, logs = self.loss(job, g)
                t.check_finite(loss, step, job)
                acc.backward(loss)
                if acc.sync_gradients and t.train.max_grad_norm:
                    acc.clip_grad_norm_(t.params, t.train.max_grad_norm)
                t.optimizer.step()
                t.optimizer.zero_grad(set_to_none=True)
        return {"loss": float(loss.detach()), **logs}

    def settings(self) -> dict:
        return dataclasses.asdict(self.spec)


class RemovalTrainer:
    """One removal recipe: setup, the method's jobs, checkpoints, outputs."""

    def __init__(self, recipe: RemovalRecipe, defaults: ModelDefaults | None = None,
                 resume_from_checkpoint: str | None = None):
        if recipe.model in (None, TESTBED) or not recipe.memorized_manifest:
            raise MemtrainError("removal: give model (a diffusers folder) and memorized_manifest, or resolve "
                                "model: testbed first (memtrain remove does)")
        self.recipe = recipe
        self.defaults = defaults or ModelDefaults.plain(recipe.model)
        self.out = Path(recipe.output_dir).absolute()
        self.resume_arg = resume_from_checkpoint or recipe.checkpoint_to_resume
        self.train = recipe.resolved_train
        self.logged = 0

    # setup ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        r, t = self.recipe, self.train
        if not self.resume_arg:
            r.check_files()  # an output_dir holding a run only with resume or overwrite
        self.acc = acc = make_accelerator(r.report_to, t.mixed_precision, t.gradient_accumulation_steps, self.out,
                                          timeout_minutes=r.timeout_minutes)
        self.previous_run = outputs.set_aside_previous(r, acc, self.out)  # --overwrite
        self.out.mkdir(parents=True, exist_ok=True)
        self.rank, self.world = acc.process_index, acc.num_processes
        self.deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        plugin = acc.state.deepspeed_plugin
        if plugin is not None and plugin.zero_stage == 3:
            raise MemtrainError("removal trainings run under DDP or DeepSpeed ZeRO-1/2, not ZeRO-3 (the methods "
                                "sample with the trained U-Net whole): use accelerate_configs/ds_zero2.json")
        self.runtime = resolve_runtime(RuntimeOptions(dtype=r.dtype, max_memory=r.max_memory), acc)
        self.frozen_dtype = self.runtime.dtype
        self.unet_dtype = HALF.get(acc.mixed_precision, torch.float32) if self.deepspeed else torch.float32
        self.bundle = load_bundle(r.model, device=acc.device)
        self.bundle.runtime = self.runtime
        self.bundle.text_encoder.requires_grad_(False)
        self.bundle.vae.requires_grad_(False)
        if self.frozen_dtype != torch.float32:
            with quiet_diffusers():
                self.bundle.text_encoder.to(dtype=self.frozen_dtype)
                self.bundle.vae.to(dtype=self.frozen_dtype)
        self.scheduler = training_scheduler(self.bundle)
        self.items = list(read_manifest(r.memorized_manifest, require_images=True, strict=True))
        if not self.items:
            raise MemtrainError(f"memorized_manifest '{r.memorized_manifest}' has no items to remove")
        self.method = REMOVAL_METHODS[r.method](self)
        if self.deepspeed and not self.method.deepspeed:
            raise MemtrainError(f"{r.method} combines its two gradients by hand: run it under DDP (accelerate launch "
                                "--multi_gpu) or one process, not DeepSpeed")
        # the original U-Net (CPU copy): per-item jobs start from it
        self.original = {k: v.detach().to("cpu", copy=True) for k, v in self.bundle.unet.state_dict().items()}
        lr = self.method.learning_rate(self.train.learning_rate)
        self.opt_recipe = dataclasses.replace(r, train=dataclasses.replace(self.train, learning_rate=lr))

    def micro_generator(self, job: Job, step: int, micro: int) -> torch.Generator:
        return generator(self.recipe.seed, self.job_index(job), step, micro, self.rank)

    def job_index(self, job: Job) -> int:
        return job.items[0] if self.method.per_item else 0

    # one job -------------------------------------------------------------------------------------
    def prepare_job(self, job: Job) -> None:
        acc, unet = self.acc, self.bundle.unet
        if self.method.per_item:
            unet.load_state_dict(self.original)
        names = set(self.method.trainable(unet))
        if not names:
            raise MemtrainError(f"{self.recipe.method}: the U-Net has no weights of the kind it trains "
                                f"({self.method.settings()})")
        for n, p in unet.named_parameters():
            p.requires_grad_(n in names)
        unet.train()
        if self.train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.params = [p for n, p in unet.named_parameters() if n in names]
        self.trained_names = sorted(names)
        optimizer = make_optimizer(self.params, self.opt_recipe)
        if acc.state.deepspeed_plugin is not None:  # no dataloader: DeepSpeed needs the micro batch
            acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = self.method.rows()
        self.model, self.optimizer = acc.prepare(unet, optimizer)
        self.unet_dtype = self.unwrapped.dtype
        self.method.start_job(job)

    @property
    def shows_progress(self) -> bool:
        """Bars and stage summaries on the main process only, unless the recipe says progress: false."""
        return bool(self.recipe.progress) and self.acc.is_main_process

    @property
    def unwrapped(self):
        """The trained U-Net itself (no DDP/DeepSpeed wrapper): for its no-grad uses."""
        return self.acc.unwrap_model(self.model)

    def check_finite(self, loss: torch.Tensor, step: int, job: Job) -> None:
        check_finite(self.acc, loss, step, job.ckpt_root, f" of {job.name}")

    def resume(self, job: Job) -> int:
        arg = self.resume_arg
        if arg and arg != "latest" and Path(arg).absolute().parent != job.ckpt_root:
            arg = "latest"  # a checkpoint of another item's job: this one continues from its own latest
        loaded = load_checkpoint(self.acc, arg, job.ckpt_root, self.recipe.to_dict(), first_difference, self.world)
        return 0 if loaded is None else int(loaded[1]["global_step"])

    def run_job(self, job: Job) -> dict:
        """Train one job, save its pipeline folder; its summary."""
        done = job.folder / JOB_SUMMARY
        if self.resume_arg and done.is_file() and (job.model_dir / "model_index.json").is_file():
            summary = json.loads(done.read_text())
            if summary["steps"] >= self.train.steps:  # not a run stopped early by train.max_steps
                log.info("%s was finished before: kept", job.name)
                return summary
        acc, t = self.acc, self.train
        self.prepare_job(job)
        step = self.resume(job)
        start, losses, t0 = step, [], time.perf_counter()
        stop = min(t.steps, t.max_steps or t.steps)
        with progress.stage(f"{self.recipe.method}: {job.name}: training", total=stop - step, unit="steps",
                            enabled=self.shows_progress) as bar:
            while step < stop:
                logs = self.method.optimizer_step(job, step)
                step += 1
                losses.append(logs["loss"])
                self.logged += 1
                acc.log({f"{k}" if not self.method.per_item else f"{job.name}/{k}": v for k, v in logs.items()}
                        | {"step_in_job": step}, step=self.logged)
                bar.advance()
                progress.note(f"loss {logs['loss']:.4f}")
                every = self.recipe.checkpointing.steps
                if every and step % every == 0:
                    state = {"global_step": step, "job": job.name, "world_size": self.world,
                             "recipe": self.recipe.to_dict()}
                    save_checkpoint(acc, job.ckpt_root, step, state, total_limit=self.recipe.checkpointing.total_limit)
        acc.wait_for_everyone()
        loop_seconds = time.perf_counter() - t0  # the optimizer steps alone (the save follows)
        unet = self.unwrapped
        self.bundle.unet = unet
        outputs.save_pipeline(acc, self.bundle, job.model_dir, self.frozen_dtype)
        checksums = gather_list([param_checksum(unet)["sha256"]], acc)
        summary = {"job": job.name, "items": [self.items[i].id for i in job.items], "model_dir": str(job.model_dir),
                   "steps": step, "steps_this_run": step - start, "seconds_this_run": round(time.perf_counter() - t0, 2),
                   "step_seconds_this_run": round(loop_seconds, 3),
                   "trained_parameters": sum(p.numel() for p in self.params), "trained_tensors": len(self.trained_names),
                   "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                   "unet_sha256_per_rank": checksums}
        if acc.is_main_process:
            write_json(done, summary)
        self.acc.free_memory()  # the next job prepares its own model and optimizer
        self.model = self.optimizer = None
        unet.requires_grad_(False)
        return summary

    # the run -------------------------------------------------------------------------------------
    def run(self) -> RemovalRun:
        t0 = time.perf_counter()
        self.setup()
        set_up = time.perf_counter() - t0
        r, acc = self.recipe, self.acc
        # anchors (Concept Ablation), generations and their split (SISS): the sampler's notes show on this bar
        with progress.stage(f"{r.method}: preparation", total=None, unit="stages", enabled=self.shows_progress):
            jobs, skipped, found = self.method.prepare()
        prepared = time.perf_counter() - t0
        if not jobs:
            reasons = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3])
            raise MemtrainError(f"{r.method}: every memorized item was skipped ({len(skipped)}; {reasons}): "
                                "nothing was trained")
        init_trackers(acc, r.project, flat_items(r.to_dict()), self.out)
        jobs_done = [self.run_job(job) for job in jobs]
        finish_trackers(acc)
        seconds = time.perf_counter() - t0
        model_dirs = {self.items[i].id: str(job.model_dir) for job in jobs for i in job.items}
        summary = {"method": r.method, "settings": self.method.settings(),
                   "train": dataclasses.asdict(self.train), "learning_rate_used": self.opt_recipe.train.learning_rate,
                   "world_size": self.world, "distributed_type": str(acc.distributed_type),
                   "mixed_precision": acc.mixed_precision, "unet_dtype": DTYPE_NAMES[self.unet_dtype],
                   "frozen_dtype": DTYPE_NAMES[self.frozen_dtype], "items": len(self.items),
                   "model_dirs": model_dirs, "skipped": skipped, "preparation": found, "jobs": jobs_done,
                   "seconds": round(seconds, 2), "setup_seconds": round(set_up, 2), "prepare_seconds": round(prepared, 2),
                   "peak_memory_gb": self.runtime.peak_memory_gb(), "runtime": self.runtime.to_dict()}
        if acc.is_main_process:
            write_json(self.out / "run_summary.json", versioned(summary))
        acc.wait_for_everyone()
        outputs.drop_previous(acc, self.previous_run)
        return RemovalRun(method=r.method, model_dirs=model_dirs, skipped=skipped, seconds=round(seconds, 2),
                          peak_memory_gb=summary["peak_memory_gb"], summary=summary)


def train_removal(recipe: RemovalRecipe, defaults: ModelDefaults | None = None,
                  resume_from_checkpoint: str | None = None) -> RemovalRun:
    """Run the recipe's removal method; returns what it did (RemovalRun). Items it cannot remove
    are in `skipped`; a MemtrainError when every item was skipped."""
    return RemovalTrainer(recipe, defaults, resume_from_checkpoint).run()
