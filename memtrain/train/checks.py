"""The fine-tuner's checks: the per-epoch memorization audit, held-out denoising loss and KID
before and after, and the closing audit of the fine-tuned model with memtrain.eval.audit
(prompts, full-strength attack, held-out control).

Every check is collective: each process takes its share of the targets, loss rows and KID
prompts in batches cut before sharding (memtrain.core.run.shard_chunks), the results are
gathered in order, and only the main process writes. The figures therefore do not depend on
the number of processes, and no process idles in a collective while another works alone.

The checks see the trainer's state only through a CheckContext (AdvFinetuner.check_context builds
it once per run): what they read, the two crafting hooks, and what they write (the work counter,
the stage it counts under, the KID reference features)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from memtrain.attack import diffusion_loss
from memtrain.core.diffusion import derived_seed, frozen, generator, images_to_latents
from memtrain.core.files import write_json
from memtrain.core.manifest import load_image, read_manifest
from memtrain.core.report import image_grid, reference_rows, versioned
from memtrain.core.run import gather_in_order, gather_list, log_to_trackers, shard_chunks
from memtrain.core.sampling import SamplerSettings, sample
from memtrain.core.text import encode_prompts
from memtrain.eval.audit import audit, audit_config
from memtrain.eval.measure import Measurement, measure
from memtrain.metrics import MetricBackendError, inception_features, inception_placement, kid, not_computed
from memtrain.train.recipe import Recipe

log = logging.getLogger(__name__)
GRID_CELL = 64  # pixels per image in the audit grids
KID_CHUNK = 8
HELDOUT_CHUNK = 16  # held-out loss rows (item x noise sample) per U-Net call, at most  # utility prompts per sampling call and Inception batch


@dataclasses.dataclass(eq=False)
class CheckContext:
    """Exactly the state the checks need (the trainer builds it once per run, after setup)."""

    acc: Any  # the accelerator: processes, collectives, trackers
    recipe: Recipe  # audit, seed, manifests, utility, surrogates, train.epochs/finetune
    out: Path  # the run's output_dir
    defaults: Any  # the base model's ModelDefaults (the full audit's)
    bundle: Any  # the model, its U-Net the one being trained
    scheduler: Any  # the training noise scheduler (held-out loss timesteps)
    runtime: Any  # device, memory budget; records batch sizes
    descriptor: Any  # the copy descriptor (SSCD or stand-in)
    items: list  # the memorized manifest items that have surrogates, in training order
    utility: list  # the utility pairs (KID prompts and images)
    craft: Callable  # (epoch, image) -> (y_adv, loss): the trainer's per-image attack
    craft_targets: Callable  # (epoch, images, seed) -> (y_adv, losses): one batched attack
    planned_batch: Callable  # (stage, wanted) -> batch within the memory budget, planned now
    precision: Callable  # () -> what ran in which precision (the closing report's)
    work: Counter  # this process's items per stage (run_summary.json): the checks add theirs
    speedups: bool = True  # False: the epoch audit attacks one target at a time (bench baseline)
    stage: str = "setup"  # the stage `work` counts under
    kid_reference: Any = None  # Inception features of the KID images, once per run


def _sampler(ctx: CheckContext) -> SamplerSettings:
    return ctx.bundle.sampler_settings.with_overrides(ctx.recipe.audit.sampler)


def thumbnails(images: torch.Tensor) -> torch.Tensor:
    """(N, S, 3, H, W) -> (N, S, 3, GRID_CELL, GRID_CELL): what the grids show, and all that is
    gathered from the other processes (not the full-size images)."""
    small = F.interpolate(images.flatten(0, 1).float(), size=(GRID_CELL, GRID_CELL), mode="area")
    return small.reshape(*images.shape[:2], 3, GRID_CELL, GRID_CELL)


def memorization_figures(ctx: CheckContext, epoch: int) -> tuple[dict, dict]:
    """MR from the memorized prompts and from fresh Dori embeddings, plus their image grids.
    Targets go in batches of audit.targets_per_attack (one batched attack and one measurement
    per batch; one target at a time with ctx.speedups off), spread over the processes."""
    a = ctx.recipe.audit
    n = min(len(ctx.items), a.max_items or len(ctx.items))
    seeds = list(range(a.seeds))
    descriptor = ctx.descriptor
    settings = _sampler(ctx)
    per_batch = a.targets_per_attack if ctx.speedups else 1
    local = []
    with frozen(ctx.bundle.unet):
        for chunk in shard_chunks(range(n), per_batch, ctx.acc):
            images = [i for _, i in chunk]
            if ctx.speedups:
                adv, _ = ctx.craft_targets(epoch, images, derived_seed(ctx.recipe.seed, epoch, images[0], 1))
            else:  # the ctx's own per-image crafting
                adv = torch.cat([ctx.craft(epoch, i)[0] for i in images])
            train_images = [load_image(ctx.items[i]) for i in images]
            rows = {}
            for name, cond in (("prompt", [ctx.items[i].prompt for i in images]), ("attack", adv)):
                m = measure(ctx.bundle, cond, seeds, descriptor, settings, train_images=train_images)
                rows[name] = (m.sscd_orig, m.gen_embeddings, thumbnails(m.images))
            local.append((images[0], (train_images, rows)))
            ctx.work[f"{ctx.stage}/targets"] += len(images)
    parts = gather_in_order(local, ctx.acc)
    train_images = [im for part, _ in parts for im in part]
    figures, grids = {}, {}
    for name in ("prompt", "attack"):
        orig = np.concatenate([rows[name][0] for _, rows in parts])
        gen = np.concatenate([rows[name][1] for _, rows in parts])
        small = torch.cat([rows[name][2] for _, rows in parts])
        m = Measurement(sscd_orig=orig, gen_embeddings=gen, images=small)
        figures.update({f"{name}/{key}": value for key, value in m.figures().items()})
        grids[name] = image_grid(reference_rows(train_images, [list(row) for row in small]), cell=GRID_CELL)
    return figures, grids


def epoch_audit(ctx: CheckContext, epoch: int, step: int) -> None:
    """MR on the prompts and under a fresh attack after an epoch: JSON, grids, trackers."""
    acc = ctx.acc
    ctx.stage = "epoch_audit"
    figures, grids = memorization_figures(ctx, epoch)
    if acc.is_main_process:
        folder = ctx.out / "audit" / "epochs"
        folder.mkdir(parents=True, exist_ok=True)
        for name, grid in grids.items():
            grid.save(folder / f"epoch{epoch + 1}_{name}.png")
        (folder / f"epoch{epoch + 1}.json").write_text(json.dumps(figures, indent=1))
        log_to_trackers(acc, {f"audit/{k}": v for k, v in figures.items()},
                        images={f"audit/{k}": [v] for k, v in grids.items()}, step=step)
        log.info("epoch %d audit: %s", epoch + 1, {k: v for k, v in figures.items() if "mr" in k})
    acc.wait_for_everyone()


def heldout_loss(ctx: CheckContext) -> float | dict:
    """Mean denoising loss on held-out pairs under fixed noise and timesteps."""
    a = ctx.recipe.audit
    path = Path(a.heldout_manifest) if a.heldout_manifest else Path(ctx.recipe.memorized_manifest).with_name("held_out.jsonl")
    if not path.is_file():
        return not_computed(f"no held-out manifest ({path}); set audit.heldout_manifest")
    items = list(read_manifest(path, require_images=True))
    bundle = ctx.bundle
    # replanned: the optimizer's state now takes part of the budget
    bundle.batch_limits["vae_encode"] = ctx.planned_batch("vae_encode", len(items))
    latents = images_to_latents(bundle, [load_image(m) for m in items])
    emb = encode_prompts(bundle, [m.prompt for m in items]).embeddings.float()
    g = generator(ctx.recipe.seed, 4242)
    k = a.heldout_noise_samples
    noise = torch.randn((len(items), k, *latents.shape[1:]), generator=g)
    t = torch.randint(0, ctx.scheduler.config.num_train_timesteps, (len(items), k), generator=g)
    # one U-Net row per (item, noise sample): every item has k rows, so the mean over rows is the
    # mean over items of each item's mean over its k samples. Rows go in chunks of the planned
    # batch, spread over the processes; the per-row losses are gathered in order.
    rows = len(items) * k
    owner = torch.arange(len(items)).repeat_interleave(k)
    noise, t = noise.reshape(rows, 1, *latents.shape[1:]), t.reshape(rows, 1)
    # a fixed chunk (within the plan) keeps the chunks alike on any number of processes
    batch = ctx.planned_batch("unet_loss", min(rows, HELDOUT_CHUNK))
    local = []
    for chunk in shard_chunks(range(rows), batch, ctx.acc):
        start, stop = chunk[0][0], chunk[-1][0] + 1
        own = owner[start:stop]
        losses = diffusion_loss(bundle, latents[own], emb[own], noise[start:stop], t[start:stop])
        local.append((start, losses.float().cpu()))
        ctx.runtime.record("unet_loss", stop - start)
        ctx.work[f"{ctx.stage}/heldout_rows"] += stop - start
    return float(torch.cat(gather_in_order(local, ctx.acc)).mean())


def kid_reference(ctx: CheckContext) -> np.ndarray:
    """Inception features of the KID utility images: computed once per run (before and after
    training share them), each process embedding its share."""
    if ctx.kid_reference is None:
        pairs = ctx.utility[: ctx.recipe.audit.kid_prompts]
        local = [(chunk[0][0], inception_features([p.image for _, p in chunk], num_threads=1,
                                                        device=ctx.runtime.device))
                 for chunk in shard_chunks(pairs, KID_CHUNK, ctx.acc)]
        ctx.kid_reference = np.concatenate(gather_in_order(local, ctx.acc))
    return ctx.kid_reference


def utility_generations_kid(ctx: CheckContext) -> float | dict:
    """KID (inception features) of generations on utility prompts vs the utility images."""
    a = ctx.recipe.audit
    if not a.kid:
        return not_computed("audit.kid is false")
    pairs = ctx.utility[: a.kid_prompts]
    if len(pairs) < 2:
        return not_computed("KID needs at least 2 utility prompts")
    settings = _sampler(ctx)
    try:
        real = kid_reference(ctx)
        local = []
        for chunk in shard_chunks(pairs, KID_CHUNK, ctx.acc):
            images = sample(ctx.bundle, [p.caption for _, p in chunk], [0], settings).images[:, 0]
            local.append((chunk[0][0], inception_features(images, num_threads=1, device=ctx.runtime.device)))
            ctx.work[f"{ctx.stage}/kid_prompts"] += len(chunk)
        gen = np.concatenate(gather_in_order(local, ctx.acc))
    except MetricBackendError as err:  # no Inception weights installed, ...
        return not_computed(f"inception features unavailable ({err})")
    return float(kid(gen, real, subsets=10, subset_size=len(pairs))[0])


def utility_before(ctx: CheckContext) -> None:
    """Held-out loss and KID of the model before fine-tuning (kept across a resume)."""
    acc, path = ctx.acc, ctx.out / "audit" / "before.json"
    if gather_list([path.is_file()], acc)[0]:  # the main process's view decides for all
        return
    ctx.stage = "utility_before"
    with frozen(ctx.bundle.unet):
        figures = {"heldout_loss": heldout_loss(ctx), "kid": utility_generations_kid(ctx)}
    if acc.is_main_process:
        write_json(path, figures)
    acc.wait_for_everyone()


def full_audit(ctx: CheckContext, model_dir: Path) -> dict | None:
    """memtrain.eval.audit of the fine-tuned model (mitigation 'none'): MR on the prompts, under the
    audit recipe's full-strength attack and on the held-out control, on every process (the
    targets are split across ranks). Its report goes to output_dir/audit/full/. Configured and read
    through the audit's typed API (audit_config, AuditResult.row)."""
    r, a = ctx.recipe, ctx.recipe.audit
    if not a.full:
        return None
    control = Path(a.heldout_manifest) if a.heldout_manifest else Path(r.memorized_manifest).with_name("held_out.jsonl")
    if not control.is_file():
        return {"full_audit": not_computed(f"no held-out manifest ({control}) for the attack's control: "
                                           "set audit.heldout_manifest")}
    lora = r.train.finetune == "lora"  # model_dir then holds only the LoRA weights: fuse them into the base
    model = r.model if lora else str(model_dir)
    # the base model's defaults (its reference prompts, CLIP, audit recipe) hold for the fine-tuned one
    defaults = dataclasses.replace(ctx.defaults, model_dir=model)
    values = {
        # the embedding attack: what an attacker holding the fine-tuned weights runs
        "mitigations": ["none"], "threat_models": ["embedding"], "model": model,
        "lora": str(model_dir) if lora else None, "manifest": r.memorized_manifest,
        "control_manifest": str(control), "output_dir": str(ctx.out / "audit" / "full"), "overwrite": True,
        "budget": "full", "robustness_budgets": [], "progress": False,
        "utility_manifest": r.utility.path if r.utility.format == "manifest" else None,
        "metric": None if r.surrogates.descriptor == "auto" else r.surrogates.descriptor,
        "allow_standin": r.surrogates.descriptor == "standin",
    }
    if a.full_max_targets is not None:
        values["max_targets"] = a.full_max_targets
    result = audit(audit_config(defaults, values, recipe=a.full_recipe), defaults, accelerator=ctx.acc)
    row = result.row("none", "embedding")
    return {"mr_prompt": row.mr_prompt, "mr_attack": row.mr_attack, "mr_control": row.mr_control,
            "metric_backend": result.report["metric_backend"], "report": str(result.output_dir / "report.json")}


def closing_audit(ctx: CheckContext, model_dir: Path) -> None:
    """output_dir/audit/report.json: memorization after training and the utility block."""
    acc = ctx.acc
    before = json.loads((ctx.out / "audit" / "before.json").read_text())
    ctx.stage = "closing_audit"
    with frozen(ctx.bundle.unet):
        figures, grids = memorization_figures(ctx, ctx.recipe.train.epochs)
        after = {"heldout_loss": heldout_loss(ctx), "kid": utility_generations_kid(ctx)}
    full = full_audit(ctx, model_dir)
    if acc.is_main_process:
        folder = ctx.out / "audit"
        for name, grid in grids.items():
            grid.save(folder / f"final_{name}.png")
        report = {
            "model": str(model_dir), "recipe": ctx.recipe.to_dict(), "memorization": figures,
            "precision": ctx.precision(),
            "utility": {"heldout_loss_before": before["heldout_loss"], "heldout_loss_after": after["heldout_loss"],
                        "kid_before": before["kid"], "kid_after": after["kid"]},
        }
        if full is not None:
            report.update(full)
        loss_before, loss_after = report["utility"]["heldout_loss_before"], report["utility"]["heldout_loss_after"]
        if isinstance(loss_before, float) and isinstance(loss_after, float):
            report["utility"]["heldout_loss_ratio"] = loss_after / loss_before
        report["runtime"] = ctx.runtime.to_dict()  # batch sizes and peak memory of the whole run
        report["metric_devices"] = {"sscd": ctx.descriptor.placement,
                                    "inception": (inception_placement(ctx.runtime.device)
                                                  if isinstance(after["kid"], float) else "not computed")}
        write_json(folder / "report.json", versioned(report))
    acc.wait_for_everyone()
