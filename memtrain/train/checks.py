"""The fine-tuner's checks (main process; the others wait): the per-epoch memorization audit,
held-out denoising loss and KID before and after, and the closing audit of the fine-tuned model
with memtrain.eval.audit (prompts, full-strength attack, held-out control)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from memtrain.attack import diffusion_loss
from memtrain.core.diffusion import frozen, generator, images_to_latents
from memtrain.core.files import write_json
from memtrain.core.manifest import load_image, read_manifest
from memtrain.core.report import image_grid, reference_rows
from memtrain.core.run import log_to_trackers
from memtrain.core.runtime import run_in_chunks
from memtrain.core.sampling import SamplerSettings, sample
from memtrain.core.text import encode_prompts
from memtrain.eval.audit import AuditConfig, audit
from memtrain.eval.measure import measure
from memtrain.metrics import inception_features, kid, not_computed
from memtrain.train.surrogates import descriptor_for

log = logging.getLogger(__name__)


def _sampler(trainer) -> SamplerSettings:
    return trainer.bundle.sampler_settings.with_overrides(trainer.recipe.audit.sampler)


def memorization_figures(trainer, epoch: int) -> tuple[dict, dict]:
    """MR from the memorized prompts and from fresh Dori embeddings, plus their image grids."""

    a = trainer.recipe.audit
    n = min(len(trainer.items), a.max_items or len(trainer.items))
    items = trainer.items[:n]
    seeds = list(range(a.seeds))
    descriptor = descriptor_for(trainer.recipe.surrogates.descriptor)
    train_images = [load_image(m) for m in items]
    settings = _sampler(trainer)
    figures, grids = {}, {}
    with frozen(trainer.bundle.unet):
        adv = torch.cat([trainer.craft(epoch, i)[0] for i in range(n)])
        for name, cond in (("prompt", [m.prompt for m in items]), ("attack", adv)):
            m = measure(trainer.bundle, cond, seeds, descriptor, settings, train_images=train_images)
            for key, value in m.figures().items():
                figures[f"{name}/{key}"] = value
            grids[name] = image_grid(reference_rows(train_images, [list(row) for row in m.images]), cell=64)
    return figures, grids


def epoch_audit(trainer, epoch: int, step: int) -> None:

    """MR on the prompts and under a fresh attack after an epoch: JSON, grids, trackers."""
    acc = trainer.acc
    if acc.is_main_process:
        figures, grids = memorization_figures(trainer, epoch)
        folder = trainer.out / "audit" / "epochs"
        folder.mkdir(parents=True, exist_ok=True)
        for name, grid in grids.items():
            grid.save(folder / f"epoch{epoch + 1}_{name}.png")
        (folder / f"epoch{epoch + 1}.json").write_text(json.dumps(figures, indent=1))
        log_to_trackers(acc, {f"audit/{k}": v for k, v in figures.items()},
                        images={f"audit/{k}": [v] for k, v in grids.items()}, step=step)
        log.info("epoch %d audit: %s", epoch + 1, {k: v for k, v in figures.items() if "mr" in k})
    acc.wait_for_everyone()


def heldout_loss(trainer) -> float | dict:
    """Mean denoising loss on held-out pairs under fixed noise and timesteps."""

    a = trainer.recipe.audit
    path = Path(a.heldout_manifest) if a.heldout_manifest else Path(trainer.recipe.memorized_manifest).with_name("held_out.jsonl")
    if not path.is_file():
        return not_computed(f"no held-out manifest ({path}); set audit.heldout_manifest")
    items = list(read_manifest(path, require_images=True))
    bundle = trainer.bundle
    # replanned: the optimizer's state now takes part of the budget
    bundle.batch_limits["vae_encode"] = trainer.planned_batch("vae_encode", len(items))
    latents = images_to_latents(bundle, [load_image(m) for m in items])
    emb = encode_prompts(bundle, [m.prompt for m in items]).embeddings.float()
    g = generator(trainer.recipe.seed, 4242)
    k = a.heldout_noise_samples
    noise = torch.randn((len(items), k, *latents.shape[1:]), generator=g)
    t = torch.randint(0, trainer.scheduler.config.num_train_timesteps, (len(items), k), generator=g)
    # one U-Net row per (item, noise sample), in chunks of the planned batch: every item has k
    # rows, so the mean over rows is the mean over items of each item's mean over its k samples
    rows = len(items) * k
    owner = torch.arange(len(items)).repeat_interleave(k)
    noise, t = noise.reshape(rows, 1, *latents.shape[1:]), t.reshape(rows, 1)

    def chunk(start: int, stop: int) -> torch.Tensor:
        own = owner[start:stop]
        return diffusion_loss(bundle, latents[own], emb[own], noise[start:stop], t[start:stop])

    batch = trainer.planned_batch("unet_loss", rows)
    return float(torch.cat(run_in_chunks(rows, batch, chunk, "unet_loss", trainer.runtime)).mean())


def utility_generations_kid(trainer) -> float | dict:
    """KID (inception features) of generations on utility prompts vs the utility images."""

    a = trainer.recipe.audit
    if not a.kid:
        return not_computed("audit.kid is false")
    pairs = trainer.utility[: a.kid_prompts]
    if len(pairs) < 2:
        return not_computed("KID needs at least 2 utility prompts")
    settings = _sampler(trainer)
    try:
        images = sample(trainer.bundle, [p.caption for p in pairs], [0], settings).images[:, 0]
        real = inception_features([p.image for p in pairs], num_threads=1)
        gen = inception_features(images, num_threads=1)
    except Exception as err:  # no Inception weights installed, ...
        return not_computed(f"inception features unavailable ({type(err).__name__}: {str(err)[:120]})")
    return float(kid(gen, real, subsets=10, subset_size=len(pairs))[0])


def utility_before(trainer) -> None:
    """Held-out loss and KID of the model before fine-tuning (kept across a resume)."""

    acc, path = trainer.acc, trainer.out / "audit" / "before.json"
    if acc.is_main_process and not path.is_file():
        with frozen(trainer.bundle.unet):
            write_json(path, {"heldout_loss": heldout_loss(trainer), "kid": utility_generations_kid(trainer)})
    acc.wait_for_everyone()


def full_audit(trainer, model_dir: Path) -> dict | None:
    """memtrain.eval.audit of the fine-tuned model (mitigation 'none'): MR on the prompts, under the
    audit recipe's full-strength attack and on the held-out control, on every process (the
    targets are split across ranks). Its report goes to output_dir/audit/full/."""


    r, a = trainer.recipe, trainer.recipe.audit
    if not a.full:
        return None
    control = Path(a.heldout_manifest) if a.heldout_manifest else Path(r.memorized_manifest).with_name("held_out.jsonl")
    if not control.is_file():
        return {"full_audit": not_computed(f"no held-out manifest ({control}) for the attack's control: "
                                           "set audit.heldout_manifest")}
    lora = r.train.finetune == "lora"  # model_dir then holds only the LoRA weights: fuse them into the base
    config = AuditConfig(
        # the embedding attack: what an attacker holding the fine-tuned weights runs
        mitigations=["none"], threat_models=["embedding"],
        model=r.model if lora else str(model_dir), lora=str(model_dir) if lora else None,
        manifest=r.memorized_manifest,
        control_manifest=str(control), output_dir=str(trainer.out / "audit" / "full"), overwrite=True,
        recipe=a.full_recipe, max_targets=a.full_max_targets, overrides=["robustness_budgets=[]"],
        utility_manifest=r.utility.path if r.utility.format == "manifest" else None,
        metric=None if r.surrogates.descriptor == "auto" else r.surrogates.descriptor,
        allow_standin=r.surrogates.descriptor == "standin", progress=False,
    )
    # the base model's defaults (its reference prompts, CLIP, audit recipe) hold for the fine-tuned one
    defaults = dataclasses.replace(trainer.defaults, model_dir=config.model)
    doc = audit(config, defaults, accelerator=trainer.acc)
    result = doc["results"][0]
    return {"mr_prompt": result["mr_prompt"], "mr_attack": result["mr_attack"], "mr_control": result["mr_control"],
            "metric_backend": doc["metric_backend"], "report": str(trainer.out / "audit" / "full" / "report.json")}


def closing_audit(trainer, model_dir: Path) -> None:
    """output_dir/audit/report.json: memorization after training and the utility block."""

    acc = trainer.acc
    if acc.is_main_process:
        before = json.loads((trainer.out / "audit" / "before.json").read_text())
        with frozen(trainer.bundle.unet):
            figures, grids = memorization_figures(trainer, trainer.recipe.train.epochs)
            after = {"heldout_loss": heldout_loss(trainer), "kid": utility_generations_kid(trainer)}
        folder = trainer.out / "audit"
        for name, grid in grids.items():
            grid.save(folder / f"final_{name}.png")
        report = {
            "model": str(model_dir), "recipe": trainer.recipe.to_dict(), "memorization": figures,
            "precision": trainer.precision(),
            "utility": {"heldout_loss_before": before["heldout_loss"], "heldout_loss_after": after["heldout_loss"],
                        "kid_before": before["kid"], "kid_after": after["kid"]},
        }
    acc.wait_for_everyone()
    full = full_audit(trainer, model_dir)
    if acc.is_main_process:
        if full is not None:
            report.update(full)
        loss_before, loss_after = report["utility"]["heldout_loss_before"], report["utility"]["heldout_loss_after"]
        if isinstance(loss_before, float) and isinstance(loss_after, float):
            report["utility"]["heldout_loss_ratio"] = loss_after / loss_before
        report["runtime"] = trainer.runtime.to_dict()  # batch sizes and peak memory of the whole run
        write_json(folder / "report.json", report)
    acc.wait_for_everyone()
