"""Adversarial fine-tuning with accelerate (paper 004 Alg. 2; diffusers' training examples as
the model for accelerate usage and checkpoint/resume).

Per epoch and memorized image, Dori crafts y_adv against the current U-Net (odd epochs from
the prompt embedding, even ones from N(0, I)); it stays fixed for `updates_per_embedding`
optimizer updates of L = L_adv(surrogate latents, y_adv) + L_DM(utility pairs), both halves in
one concatenated U-Net forward. With several processes each rank takes a different memorized
image per step group (rank r: image g * world + r), so DDP averages their gradients.

Every random draw of a micro-step (surrogate pick, utility pick, noise, timesteps) comes from a
generator seeded by (seed, epoch, group, update, rank), and every attack from one seeded by
(seed, epoch, image): a resumed run replays exactly the draws the uninterrupted one made.

Precision: `train.mixed_precision` is the trained U-Net's (fp32 master weights under
accelerate's autocast; under DeepSpeed the module itself in fp16/bf16), the recipe's `dtype` the
frozen parts' (text encoder, VAE, surrogate model). The no-grad batches (VAE encodes, held-out
loss) are planned within the recipe's `max_memory`; output_dir/run_summary.json says what ran.

Longer than 400 lines because setup, the loop and checkpoints share the trainer's state; the
outputs (the saved model, run summary, checksums) are in memtrain.train.outputs.
"""

from __future__ import annotations

import contextlib
from collections import Counter
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from peft import LoraConfig

from memtrain.attack import attack
from memtrain.core.bundle import ModelDefaults, fuse_lora_weights, load_bundle, quiet_diffusers
from memtrain.core.config import flat_items
from memtrain.core.diffusion import derived_seed, generator, images_to_latents, regression_target, to_pixels
from memtrain.core.diffusion import checkpointing_off, training_scheduler
from memtrain.core.errors import MemtrainError
from memtrain.core.manifest import load_image, read_manifest
from memtrain.core.memory import plan_memory
from memtrain.core.run import finish_trackers, init_trackers, make_accelerator
from memtrain.core.runtime import RuntimeOptions, resolve_runtime
from memtrain.core.text import encode_prompts
from memtrain.train import checks, outputs, zero3
from memtrain.train.checkpoints import Position, check_finite, load_checkpoint, save_checkpoint
from memtrain.train.checkpoints import checkpoint_dirs, resolve_resume  # noqa: F401  (tests import them from here)
from memtrain.train.data import load_utility
from memtrain.train.recipe import Recipe, check_resolved, first_difference
from memtrain.train.surrogates import build_surrogates, descriptor_for

log = logging.getLogger(__name__)

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
# bytes per trained weight held while the held-out loss runs: Adam's two fp32 moments and, under
# DeepSpeed, its fp32 master copy (gradients are freed by then: zero_grad(set_to_none=True))
TRAINING_STATE_BYTES = 12


# --- small pieces -------------------------------------------------------------------------------

LORA_STREAM = 7919  # derived_seed stream of the LoRA initialization


def add_lora(unet, recipe: Recipe) -> None:
    """Add the recipe's LoRA adapter to the U-Net (peft)."""
    spec = recipe.train.lora
    unet.requires_grad_(False)
    # LoRA's A matrices are random: drawn from the recipe's seed, so a rerun starts from the same
    # adapter (without it they depended on whatever had used torch's global generator before)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(recipe.seed, LORA_STREAM))
        unet.add_adapter(LoraConfig(r=spec.rank, lora_alpha=spec.alpha or spec.rank,
                                    init_lora_weights="gaussian", target_modules=list(spec.targets)))


def make_optimizer(params, recipe: Recipe):
    """AdamW (or bitsandbytes' 8-bit AdamW) with the recipe's settings."""
    t = recipe.train
    cls = torch.optim.AdamW
    if t.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise MemtrainError("train.use_8bit_adam needs bitsandbytes: pip install bitsandbytes, "
                                "or set train.use_8bit_adam=false") from None
        cls = bnb.optim.AdamW8bit
    return cls(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
               weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)


# --- the trainer --------------------------------------------------------------------------------

class AdvFinetuner:
    """Adversarial fine-tuning (paper 004 Alg. 2) of one recipe: setup, the loop, checkpoints, outputs."""

    def __init__(self, recipe: Recipe, resume_from_checkpoint: str | None = None,
                 defaults: ModelDefaults | None = None, speedups: bool = True):
        check_resolved(recipe)  # model: testbed must have been resolved (memtrain.testbed.resolver)
        self.recipe = recipe
        self.defaults = defaults or ModelDefaults.plain(recipe.model)
        self.out = Path(recipe.output_dir).absolute()
        self.ckpt_root = self.out / "checkpoints"
        self.resume_arg = resume_from_checkpoint
        # False: crafting keeps gradient checkpointing on and the epoch audit attacks one target at
        # a time, as the trainer did before (bench_finetune's baseline)
        self.speedups = speedups
        self.work: Counter = Counter()  # this process's items per stage (run_summary.json)
        self._checks: checks.CheckContext | None = None  # what the checks see (check_context)

    # setup ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        r = self.recipe
        self.acc = acc = make_accelerator(r.report_to, r.train.mixed_precision, r.train.gradient_accumulation_steps,
                                          self.out, timeout_minutes=r.timeout_minutes)
        self.previous_run = outputs.set_aside_previous(r, acc, self.out)  # --overwrite
        self.out.mkdir(parents=True, exist_ok=True)
        self.rank, self.world = acc.process_index, acc.num_processes
        # recipe `dtype` (every command's --dtype) is the frozen parts' precision
        self.runtime = resolve_runtime(RuntimeOptions(dtype=r.dtype, max_memory=r.max_memory), acc)
        self.frozen_dtype = self.runtime.dtype
        # the trained U-Net loads fp32: under accelerate's mixed precision those are the master
        # weights its autocast runs in half precision; DeepSpeed casts the module itself in prepare
        # (prepare_model then reads the dtype off the module)
        deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        self.unet_dtype = HALF.get(acc.mixed_precision, torch.float32) if deepspeed else torch.float32
        if r.device is not None and torch.device(r.device).type != acc.device.type:
            raise MemtrainError(f"device '{r.device}': the fine-tuner runs where accelerate places it "
                                f"({acc.device}); choose the device with accelerate launch (e.g. --cpu)")
        self.bundle = load_bundle(r.model, device=acc.device)
        if r.lora:  # start from the model with these LoRA weights fused in
            fuse_lora_weights(self.bundle, r.lora)
        self.bundle.runtime = self.runtime  # records the VAE chunks it runs
        # frozen parts stay outside accelerator.prepare (DeepSpeed must not partition them)
        if self.frozen_dtype != torch.float32:
            with quiet_diffusers():
                self.bundle.text_encoder.to(dtype=self.frozen_dtype)
                self.bundle.vae.to(dtype=self.frozen_dtype)
        self.scheduler = training_scheduler(self.bundle)
        self.memorized = list(read_manifest(r.memorized_manifest, require_images=True, strict=True))
        self.utility = load_utility(r.utility)
        self.descriptor = descriptor_for(r.surrogates.descriptor, acc.device)  # the copy metric, on the device
        self.resolution = self.bundle.pixel_resolution
        surrogates = self._surrogates()
        by_id: dict[str, list] = {}
        for s in surrogates:
            by_id.setdefault(s.extra["memorized_id"], []).append(s)
        self.items = [m for m in self.memorized if m.id in by_id]
        # images per VAE call within the budget (the bundle cuts every encode into such chunks)
        wanted = max([len(self.items), *(len(v) for v in by_id.values())])
        self.bundle.batch_limits["vae_encode"] = self.planned_batch("vae_encode", wanted)
        self.target_latents = images_to_latents(self.bundle, [load_image(m) for m in self.items])
        self.surrogate_latents = [images_to_latents(self.bundle, [load_image(s) for s in by_id[m.id]])
                                  for m in self.items]
        self.groups = math.ceil(len(self.items) / self.world)
        self.utility_order = None

    def check_context(self) -> checks.CheckContext:
        """The state memtrain.train.checks reads and writes, built once per run (after setup)."""
        if self._checks is None:
            self._checks = checks.CheckContext(
                acc=self.acc, recipe=self.recipe, out=self.out, defaults=self.defaults, bundle=self.bundle,
                scheduler=self.scheduler, runtime=self.runtime, descriptor=self.descriptor, items=self.items,
                utility=self.utility, craft=self.craft, craft_targets=self.craft_targets,
                planned_batch=self.planned_batch, precision=self.precision, work=self.work, speedups=self.speedups)
        return self._checks

    def _surrogates(self):
        """Surrogate images, generated by every process for its share of the prompts."""
        folder = self.out / "surrogates"
        kept = build_surrogates(self.bundle, self.recipe.surrogates, self.memorized, folder,
                                model_name=self.recipe.model,
                                reference_prompts=[p.caption for p in self.utility[:32]],
                                dtype=self.frozen_dtype, accelerator=self.acc, work=self.work)
        return kept

    def prepare_model(self) -> None:
        r, acc, unet = self.recipe, self.acc, self.bundle.unet
        if r.train.finetune == "lora":
            add_lora(unet, r)
        else:
            unet.requires_grad_(True)
        unet.train()
        if r.train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        params = [p for p in unet.parameters() if p.requires_grad]
        self.ema = None
        if r.train.ema.use:
            self.ema = EMAModel(params, decay=r.train.ema.decay)
            self.ema.to(acc.device)
            acc.register_for_checkpointing(self.ema)
        optimizer = make_optimizer(params, r)
        total = self.total_steps()
        lr_scheduler = get_scheduler(r.train.lr_scheduler, optimizer,
                                     num_warmup_steps=r.train.lr_warmup_steps * self.world,
                                     num_training_steps=total * self.world)
        if acc.state.deepspeed_plugin is not None:  # no dataloader: DeepSpeed needs the micro batch
            acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = (
                r.train.surrogate_batch_size + r.train.utility_batch)
        whole = zero3.whole_copy(unet, acc, ema=self.ema is not None)
        self.model, self.optimizer, self.lr_scheduler = acc.prepare(unet, optimizer, lr_scheduler)
        if whole is not None:  # ZeRO-3: no-grad uses read a whole copy (memtrain.train.zero3)
            self.bundle.unet = zero3.attach(self.model, whole)
        self.params = params
        # what the U-Net's inputs are cast to: fp32 under accelerate's autocast; DeepSpeed's half
        # precision under DeepSpeed, which runs the module in it and adds no autocast
        self.unet_dtype = self.bundle.unet.dtype
        self.runtime.record("finetune", r.train.surrogate_batch_size + r.train.utility_batch)

    def planned_batch(self, stage: str, wanted: int) -> int:
        """The largest batch of a no-grad stage ("vae_encode", "unet_loss"), at most `wanted`,
        whose estimated peak fits the runtime budget (memtrain.core.memory.plan_memory), less the
        optimizer's state once the model is prepared. Planned in the wider of the frozen parts'
        and the U-Net's dtypes: one plan covers both, erring large."""
        dtype = max(self.frozen_dtype, self.unet_dtype, key=lambda d: torch.empty((), dtype=d).element_size())
        # ZeRO-3 leaves 0-sized placeholders in the module: count the whole weight (ds_numel)
        trained = sum(getattr(p, "ds_numel", p.numel()) for p in getattr(self, "params", []))
        budget = self.runtime.budget_bytes - TRAINING_STATE_BYTES * trained
        plan = plan_memory(self.bundle, dtype, budget, {stage: max(1, wanted)}, device=str(self.runtime.device))
        return plan.batch(stage)

    def total_steps(self) -> int:
        t = self.recipe.train
        micro = t.epochs * self.groups * t.updates_per_embedding
        steps = math.ceil(micro / t.gradient_accumulation_steps)
        return min(steps, t.max_steps) if t.max_steps else steps

    # data of one micro-step ----------------------------------------------------------------------
    def utility_batch(self, pos: Position, g: torch.Generator):
        """Utility latents and text embeddings: a per-epoch permutation read round-robin."""
        r = self.recipe
        n, bs = len(self.utility), r.train.utility_batch
        perm = torch.randperm(n, generator=generator(r.seed, pos.epoch, 7)).tolist()
        step = pos.group * r.train.updates_per_embedding + pos.update
        start = (step * self.world + self.rank) * bs
        pairs = [self.utility[perm[(start + j) % n]] for j in range(bs)]
        pixels = to_pixels([p.image for p in pairs], self.resolution)
        latents = self.bundle.encode_images(pixels).float().cpu()
        embeddings = encode_prompts(self.bundle, [p.caption for p in pairs]).embeddings
        return latents, embeddings

    def surrogate_batch(self, image: int, g: torch.Generator) -> torch.Tensor:
        pool = self.surrogate_latents[image]
        pick = torch.randint(0, len(pool), (self.recipe.train.surrogate_batch_size,), generator=g)
        return pool[pick]

    # one micro-step ------------------------------------------------------------------------------
    def losses(self, surr: torch.Tensor, y_adv: torch.Tensor, util: torch.Tensor, y_util: torch.Tensor,
               g: torch.Generator, concat: bool = True):
        """(loss_adv, loss_dm): the model's own prediction-type target on noised latents."""
        dev = self.acc.device
        x0 = torch.cat([surr, util])
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(x0),), generator=g)
        x_t = self.scheduler.add_noise(x0, noise, t)
        target = regression_target(self.scheduler, x0, noise, t).to(dev)
        # inputs in the U-Net's own dtype: DeepSpeed's half-precision module gets no autocast
        y = torch.cat([y_adv.expand(len(surr), -1, -1).to(dev), y_util.to(dev)]).to(self.unet_dtype)
        x_t, t = x_t.to(dev, self.unet_dtype), t.to(dev)
        n = len(surr)
        if concat:
            out = self.model(x_t, t, encoder_hidden_states=y).sample.float()
            return F.mse_loss(out[:n], target[:n]), F.mse_loss(out[n:], target[n:])
        out_adv = self.model(x_t[:n], t[:n], encoder_hidden_states=y[:n]).sample.float()
        loss_adv = F.mse_loss(out_adv, target[:n])
        out_dm = self.model(x_t[n:], t[n:], encoder_hidden_states=y[n:]).sample.float()
        return loss_adv, F.mse_loss(out_dm, target[n:])

    def craft(self, epoch: int, image: int) -> tuple[torch.Tensor, float]:
        """y_adv (1, 77, D) for one memorized image against the current unwrapped U-Net."""
        embeddings, losses = self.craft_targets(epoch, [image], derived_seed(self.recipe.seed, epoch, image))
        return embeddings, float(losses.mean())

    def craft_targets(self, epoch: int, images: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Adversarial embeddings (len(images), 77, D) and their final losses, all targets in one
        batched attack against the current unwrapped U-Net."""
        config = self.recipe.attack.for_epoch(epoch, seed=seed)
        # bf16 under accelerate: its autocast, as the U-Net trains. Not fp16: the attack scales its
        # loss by the model's dtype, and the fp32 master weights would hide fp16 gradient underflow.
        # Under DeepSpeed the module itself is half precision and the attack casts to it. Checkpointing
        # off (speedups): the attack wants grads w.r.t. y only, recomputing the U-Net buys nothing.
        bf16 = self.acc.mixed_precision == "bf16" and self.acc.distributed_type != DistributedType.DEEPSPEED
        with self.acc.autocast() if bf16 else contextlib.nullcontext(), checkpointing_off(self.bundle.unet,
                                                                                           self.speedups):
            result = attack(self.bundle, self.target_latents[images], [self.items[i].prompt for i in images], config)
        self.runtime.record("attack", min(config.noise_samples * len(images), config.max_batch))
        return result.embeddings, result.final_loss

    def check_finite(self, loss: torch.Tensor, step: int) -> None:
        check_finite(self.acc, loss, step, self.ckpt_root)

    # checkpoints -----------------------------------------------------------------------------------
    def save_checkpoint(self, step: int, pos: Position, y_adv: torch.Tensor | None) -> None:
        """Save into a temp folder, then rename (memtrain.train.checkpoints.save_checkpoint)."""
        def adv(folder: Path) -> None:  # mid-image: the resumed run must reuse this epoch's embedding
            if y_adv is not None:
                torch.save(y_adv, folder / f"adv_rank{self.rank}.pt")

        state = {"global_step": step, "epoch": pos.epoch, "group": pos.group, "update": pos.update,
                 "world_size": self.world, "recipe": self.recipe.to_dict()}
        save_checkpoint(self.acc, self.ckpt_root, step, state, adv, self.recipe.checkpointing.total_limit)

    def resume(self) -> tuple[int, Position, torch.Tensor | None]:
        loaded = load_checkpoint(self.acc, self.resume_arg, self.ckpt_root, self.recipe.to_dict(), first_difference,
                                 self.world)
        if loaded is None:
            return 0, Position(), None
        path, state = loaded
        adv = path / f"adv_rank{self.rank}.pt"
        y_adv = torch.load(adv, weights_only=True) if adv.is_file() else None
        return state["global_step"], Position(state["epoch"], state["group"], state["update"]), y_adv

    # the loop --------------------------------------------------------------------------------------
    def train(self) -> Path:
        self.setup()
        self.prepare_model()
        r, acc = self.recipe, self.acc
        step, pos, y_adv = self.resume()
        init_trackers(acc, r.project, flat_items(r.to_dict()), self.out)
        if r.audit.closing:
            checks.utility_before(self.check_context())
        total = self.total_steps()
        S, t_spec = r.train.updates_per_embedding, r.train
        while pos.epoch < t_spec.epochs and step < total:
            epoch = pos.epoch
            while pos.epoch == epoch and step < total:
                image = (pos.group * self.world + self.rank) % len(self.items)
                attack_loss = float("nan")
                if y_adv is None or pos.update == 0:
                    y_adv, attack_loss = self.craft(epoch, image)
                t0 = time.perf_counter()
                g = generator(r.seed, epoch, pos.group, pos.update, self.rank)
                with acc.accumulate(self.model):
                    util, y_util = self.utility_batch(pos, g)
                    surr = self.surrogate_batch(image, g)
                    if t_spec.concat_forward:
                        loss_adv, loss_dm = self.losses(surr, y_adv, util, y_util, g)
                        loss = loss_adv + loss_dm
                        self.check_finite(loss, step)
                        acc.backward(loss)
                    else:
                        loss_adv, loss_dm = self.losses(surr, y_adv, util, y_util, g, concat=False)
                        loss = loss_adv + loss_dm
                        self.check_finite(loss, step)
                        acc.backward(loss)
                    if acc.sync_gradients and t_spec.max_grad_norm:
                        acc.clip_grad_norm_(self.params, t_spec.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                pos = pos.advance(self.groups, S)
                self.work["train/micro_steps"] += 1
                if acc.sync_gradients:
                    step += 1
                    if self.ema is not None:
                        self.ema.step(self.params)
                    dt = time.perf_counter() - t0
                    logs = {"loss/adv": loss_adv.item(), "loss/dm": loss_dm.item(), "loss/total": loss.item(),
                            "lr": self.lr_scheduler.get_last_lr()[0], "epoch": epoch + 1,
                            "throughput/samples_per_s": (len(surr) + len(util)) * self.world / max(dt, 1e-9)}
                    if math.isfinite(attack_loss):
                        logs["loss/attack"] = attack_loss
                    acc.log(logs, step=step)
                    every = r.checkpointing.steps
                    if every and step % every == 0:
                        self.save_checkpoint(step, pos, y_adv if pos.update else None)
                if pos.update == 0:
                    y_adv = None
            if pos.epoch > epoch and r.audit.epoch_end:
                checks.epoch_audit(self.check_context(), epoch, step)
        acc.wait_for_everyone()
        model_dir = outputs.save_final(self)
        if r.debug_rank_checksums:
            outputs.write_checksum(self)
        if r.audit.closing:
            checks.closing_audit(self.check_context(), model_dir)
        outputs.write_summary(self, model_dir, step)
        finish_trackers(acc)
        acc.wait_for_everyone()
        outputs.drop_previous(acc, self.previous_run)
        return model_dir

    # outputs (memtrain.train.outputs) -------------------------------------------------------------
    def precision(self) -> dict:
        """What ran in which precision: the launch, the trained U-Net and the frozen parts."""
        return outputs.precision(self)


def train(recipe: Recipe, resume_from_checkpoint: str | None = None, defaults: ModelDefaults | None = None) -> Path:
    """Run adversarial fine-tuning; returns output_dir/model. `defaults`: the model's manifests,
    CLIP and audit recipe for the closing audit (the testbed resolver's, on the testbed)."""
    return AdvFinetuner(recipe, resume_from_checkpoint, defaults).train()
