"""Evaluate memorization of a model on a manifest: generate, score, report.

`evaluate(EvaluateConfig(...), defaults)` generates `seeds` images per manifest prompt, scores
them with `memtrain.eval.measure` (the testbed card's path, so the figures agree with it), and
writes OUT/metrics.json, report.md and grids/*.png (eval.evaluate_report), optionally to W&B too.
Under `accelerate launch` the prompts are split across processes; each image depends only on its
prompt and seed, so the figures do not depend on the number of processes. Only the main process
writes, into a staged folder renamed to OUT at the very end (core.run.OutputRun).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from memtrain.core import progress, report
from memtrain.core import run as dist
from memtrain.core.bundle import ModelDefaults, load_for_runtime, weights_checksum
from memtrain.core.memory import folder_plan, plan_for_run
from memtrain.core.runtime import resolve_runtime
from memtrain.core.cli import option, section
from memtrain.core.options import MetricOptions, ModelOptions, OutputOptions
from memtrain.core.errors import MemtrainError
from memtrain.core.files import check_output_dir
from memtrain.core.journal import NoJournal, WorkJournal, check_fresh_start, decoder, encode_records, file_digests, json_unit
from memtrain.core.manifest import ManifestItem, load_image, read_manifest
from memtrain.core.sampling import SamplerOverrides, SamplerSettings, check_seeds, sample
from memtrain.eval import evaluate_report
from memtrain.eval.measure import Measurement, measure
from memtrain.eval.utility import (ReferenceFeatures, alignment_figures, check_images, fid_kid, metric_backends,
                                   metric_devices, versions)
from memtrain.metrics import MR_THRESHOLD, PAPER002_THRESHOLD, diversity_dsscd, lpips_diversity, not_computed, paper002_score

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class EvaluateConfig(ModelOptions, OutputOptions, MetricOptions):
    """What to evaluate. `memtrain evaluate`'s config: the shared model/output/metric options and these."""

    manifest: str | None = option(None, "JSONL manifest (id, prompt, image); default: the model's memorized set")
    seeds: int = option(10, "generations per prompt, seeds 0..N-1")
    strict: bool = option(False, "a missing training image fails instead of being skipped")
    lpips_model: str | None = option(None, "TorchScript LPIPS file for cross-seed LPIPS diversity")
    fid_manifest: str | None = option(None, "FID/KID of generations vs this manifest's images (shipped Inception)")
    fid_prompts: int | None = option(None, "use at most N items of the FID manifest (without --fid_manifest: the "
                                         "model's utility manifest)")
    sampler: SamplerOverrides = section(SamplerOverrides, "changes to the model's sampler", flat=True)
    threshold: float = option(MR_THRESHOLD, "SSCD_Orig above this in any seed = replicated")
    project: str | None = option("memtrain-evaluate", "tracker project name")
    # Prompts per work unit (bounds memory at SD sizes). Units are cut before they are spread
    # over processes, so at a fixed value any process count gives bit-identical figures.
    chunk_items: int = option(16, "prompts per work unit spread over processes (figures identical for any "
                                "process count at a fixed value)")
    grid_items: int = option(32, "prompts shown in the image grids")
    grid_cell: int = option(128, "grid cell size in pixels")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seeds < 1:
            raise MemtrainError(f"--seeds must be >= 1, got {self.seeds}")
        if self.fid_prompts is not None and self.fid_prompts < 2:
            raise MemtrainError(f"--fid_prompts must be >= 2 (FID needs two images per set), got {self.fid_prompts}")
        if self.chunk_items < 1 or self.grid_items < 0:
            raise MemtrainError("chunk_items must be >= 1 and grid_items >= 0")

    def check_files(self) -> None:
        """The output folder and the manifests named (read before any model loads)."""
        self.check_output(self.manifest, self.fid_manifest)


@dataclass
class Inputs:
    """Everything resolved before the expensive part starts."""

    model_dir: str
    manifest_path: Path
    items: list[ManifestItem]
    skipped: list[dict]
    has_images: bool
    output_dir: Path


@dataclass
class ItemResult:
    """One prompt's scores; picklable so processes can exchange it."""

    index: int
    sscd_orig: np.ndarray | None  # (S,)
    gen_embeddings: np.ndarray  # (S, D)
    a_clip: np.ndarray | None = None  # (S,) raw cosines
    lpips: float | None = None
    grid_row: list[np.ndarray] | None = None  # uint8 thumbnails: training image, generations


def load_items(path: Path, strict: bool) -> tuple[list[ManifestItem], list[dict], bool]:
    """Manifest items to evaluate, skipped items with reasons, and whether images are used.

    A manifest without any image field is evaluated prompt-only (no SSCD_Orig / MR); otherwise
    items whose image is missing are skipped and reported (strict: refused).
    """
    items = read_manifest(path)
    if not any(item.image for item in items):
        return list(items), [], False
    kept = read_manifest(path, require_images=True, strict=strict)
    skipped = [{"id": m.id, "reason": "no image" if m.image is None else f"image not found: {m.image}"}
               for m in getattr(kept, "missing", [])]
    return list(kept), skipped, True


def default_output_dir(model_dir: str, manifest: Path) -> Path:
    """A fresh output folder name from the model's name (and the time)."""
    name = Path(model_dir).name if Path(model_dir).name != "model" else Path(model_dir).parent.name
    return Path("evaluations") / f"{name}-{manifest.stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_inputs(cfg: EvaluateConfig, defaults: ModelDefaults, accelerator=None) -> Inputs:
    """Every input checked before the model loads or anything is written."""
    if cfg.output_dir is not None:  # before any work: never overwrite, fail in a second
        check_output_dir(cfg.output_dir, cfg.overwrite)
    manifest = cfg.manifest or defaults.manifest("memorized")
    if manifest is None:
        raise MemtrainError(f"no --manifest given and the model '{defaults.model_dir}' brings none: pass --manifest")
    manifest = Path(manifest).expanduser()
    items, skipped, has_images = load_items(manifest, cfg.strict)
    out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(defaults.model_dir, manifest)
    out = Path(dist.gather_list([str(out)], accelerator)[0])  # the main process's choice, everywhere
    check_output_dir(out, cfg.overwrite)
    check_fresh_start(out, cfg.resume, cfg.overwrite)
    return Inputs(defaults.model_dir, manifest.absolute(), items, skipped, has_images, out)


def sampler_settings(bundle, overrides: SamplerOverrides) -> SamplerSettings:
    """The model's defaults (memtrain.json) with the command line's overrides."""
    settings = bundle.sampler_settings.with_overrides(overrides)
    bundle.make_scheduler(settings.scheduler)  # an unknown name fails here, in one line
    return settings


def _grid_row(train_image, images: torch.Tensor, cell: int) -> list[np.ndarray]:
    cells = ([None] if train_image is None else [train_image]) + list(images)
    return [np.asarray(report.thumbnail(c, cell)) if c is not None else np.full((cell, cell, 3), 200, np.uint8)
            for c in cells]


def _score_chunk(chunk: Sequence[tuple[int, ManifestItem]], ctx: dict, cfg: EvaluateConfig) -> list[tuple[int, ItemResult]]:
    prompts = [item.prompt for _, item in chunk]
    train = [load_image(item) for _, item in chunk] if ctx["has_images"] else None
    m = measure(ctx["bundle"], prompts, ctx["seeds"], ctx["descriptor"], ctx["settings"], train_images=train)
    n_seeds = len(ctx["seeds"])
    cos = None
    if ctx["scorer"] is not None:  # A_CLIP of every generation with its own prompt
        flat = [p for p in prompts for _ in range(n_seeds)]
        cos = ctx["scorer"].score(m.images.flatten(0, 1), flat).reshape(len(chunk), n_seeds)
    lp = None
    if cfg.lpips_model and n_seeds > 1:
        lp = lpips_diversity([m.images[k] for k in range(len(chunk))], cfg.lpips_model)
    out = []
    for k, (index, _) in enumerate(chunk):
        row = _grid_row(train[k] if train else None, m.images[k], cfg.grid_cell) if index < cfg.grid_items else None
        out.append((index, ItemResult(
            index=index, sscd_orig=None if m.sscd_orig is None else m.sscd_orig[k],
            gen_embeddings=m.gen_embeddings[k], a_clip=None if cos is None else cos[k],
            lpips=None if lp is None else float(lp[k]), grid_row=row,
        )))
    return out


def score_items(items: list[ManifestItem], ctx: dict, cfg: EvaluateConfig, accelerator=None,
                journal=None) -> list[ItemResult]:
    """This process's chunks of prompts, scored (each chunk a unit of work of `journal`, reused on
    --resume); every process gets all results in order."""
    journal = journal or NoJournal()
    chunks = dist.shard_chunks(items, cfg.chunk_items, accelerator)
    if ctx["has_images"]:  # all processes fail together on a bad image, none waits forever
        dist.run_checked(lambda: [check_images([it for _, it in c]) for c in chunks], accelerator)

    local = []
    show = cfg.progress and dist.is_main(accelerator)
    with progress.stage(f"evaluate: prompts (process 0 of {dist.world(accelerator)[1]})", sum(map(len, chunks)),
                        "prompts", show) as bar:
        for chunk in chunks:
            local += journal.unit(f"items.{chunk[0][0]}", lambda: _score_chunk(chunk, ctx, cfg), encode_records,
                                  decoder(ItemResult))
            bar.advance(len(chunk))
    return dist.gather_in_order(local, accelerator)


# ----------------------------------------------------------------------------- figures


def measurement_of(results: Sequence[ItemResult]) -> Measurement:
    """Rebuild the Measurement the single-process path would have produced (figures only)."""
    orig = None if results[0].sscd_orig is None else np.stack([r.sscd_orig for r in results])
    gen = np.stack([r.gen_embeddings for r in results])
    return Measurement(sscd_orig=orig, gen_embeddings=gen, images=torch.empty(0))


def overall_figures(m: Measurement, threshold: float) -> dict:
    """metrics.json's top-level figures, with not-computed records where they cannot be had."""
    figures = m.figures(threshold=threshold)
    if m.sscd_orig is None:
        reason = "the manifest has no training images"
        for key in ("mr", "median_sscd", "sscd_orig_median", "sscd_orig_mean", "sscd_orig_std"):
            figures[key] = not_computed(reason)
    if m.gen_embeddings.shape[1] < 2:
        figures["d_sscd"] = not_computed("D_SSCD needs at least 2 seeds per prompt")
    return figures


def paper002_figures(m: Measurement) -> tuple[dict, dict | None]:
    """Paper 002's combined score: (SSCD_train + mean pairwise SSCD of the generations) / 2."""
    if m.sscd_orig is None:
        return not_computed("the manifest has no training images"), None
    if m.gen_embeddings.shape[1] < 2:
        return not_computed("needs at least 2 seeds per prompt"), None
    s = paper002_score(m.sscd_orig, diversity_dsscd(m.gen_embeddings), threshold=PAPER002_THRESHOLD)
    brief = {"threshold": s["threshold"], "input_rate": s["input_rate"], "sample_rate": s["sample_rate"],
             "median_input_max_score": float(np.median(s["input_max_score"]))}
    return brief, s


def lpips_figures(results: Sequence[ItemResult], cfg: EvaluateConfig, n_seeds: int) -> dict:
    """Cross-seed LPIPS diversity with user weights, else a not-computed record."""
    if not cfg.lpips_model:
        return not_computed("no LPIPS weights given (none ship offline): pass --lpips_model FILE")
    if n_seeds < 2:
        return not_computed("needs at least 2 seeds per prompt")
    values = np.array([r.lpips for r in results])
    return {"value": float(values.mean()), "backend": Path(cfg.lpips_model).name}


def item_rows(items: Sequence[ManifestItem], results: Sequence[ItemResult], m: Measurement,
              p002: dict | None, threshold: float) -> list[dict]:
    """metrics.json's per-prompt rows."""
    rows = m.per_item([it.id for it in items])
    for k, (item, res, row) in enumerate(zip(items, results, rows)):
        row.update(prompt=item.prompt, label=item.label, image=item.image)
        if res.sscd_orig is not None:
            row["memorized"] = bool(res.sscd_orig.max() > threshold)
        if res.a_clip is not None:
            row["a_clip"] = float(np.mean(res.a_clip))
        if res.lpips is not None:
            row["lpips_diversity"] = res.lpips
        if p002 is not None:
            row["paper002_max_score"] = float(p002["input_max_score"][k])
            row["paper002_memorized"] = bool(p002["memorized"][k].any())
    return rows


# ----------------------------------------------------------------------------- entry point


def evaluate(cfg: EvaluateConfig, defaults: ModelDefaults | None = None, accelerator=None,
             extra_outputs: Callable[[Path, dict, list[ManifestItem]], None] | None = None) -> dict:
    """Run the evaluation; returns metrics.json's content (on every process) and writes the
    outputs (main process only). `defaults`: the model's manifests and CLIP (scripts get them
    from the testbed resolver); without them `cfg.model` and `cfg.manifest` must be given.
    `extra_outputs(folder, metrics, items)` adds files to the staged output folder before it is
    renamed into place (triage's manifests). Bad input raises MemtrainError before anything is
    written."""
    start = time.time()
    defaults = defaults or ModelDefaults.plain(cfg.model)
    if cfg.runtime.plan:
        return evaluate_plan(cfg, defaults)
    owns = accelerator is None
    accelerator = accelerator or dist.make_accelerator(cfg.report_to, timeout_minutes=cfg.runtime.timeout_minutes)
    inputs = resolve_inputs(cfg, defaults, accelerator)
    seeds = check_seeds(range(cfg.seeds))
    runtime = resolve_runtime(cfg.runtime, accelerator)  # the metrics run where the model does
    descriptor, scorer, clip_reason = metric_backends(cfg, cfg.clip_model or defaults.clip_model, runtime.device)
    bundle = load_for_runtime(inputs.model_dir, runtime, cfg.lora)
    settings = sampler_settings(bundle, cfg.sampler)
    plan = plan_for_run(bundle, runtime, evaluate_stages(settings))
    settings = dataclasses.replace(settings, batch_size=plan.batch("generation"))
    fid_manifest = cfg.fid_manifest or (defaults.manifest("utility") if cfg.fid_prompts is not None else None)
    with dist.OutputRun(accelerator, inputs.output_dir, cfg.overwrite, cfg.project, dataclasses.asdict(cfg),
                        trackers=owns) as out:
        ctx = {"bundle": bundle, "seeds": seeds, "descriptor": descriptor, "settings": settings,
               "scorer": scorer, "has_images": inputs.has_images}
        journal = WorkJournal(inputs.output_dir, fingerprint(cfg, inputs, bundle, fid_manifest), cfg.resume,
                              accelerator)
        results = score_items(inputs.items, ctx, cfg, accelerator, journal)
        fid_entry, kid_entry, fid_notes = journal.unit("fid", lambda: fid_kid(
            fid_manifest, lambda prompts, s: sample(bundle, prompts, s, settings), max_prompts=cfg.fid_prompts,
            seed=0, chunk_items=cfg.chunk_items, strict=cfg.strict, progress=cfg.progress, accelerator=accelerator,
            device=runtime.device, reference=ReferenceFeatures()), *json_unit(), collective=True)
        metrics = assemble(cfg, defaults, inputs, results, descriptor, scorer, clip_reason, bundle, settings, seeds,
                           accelerator, fid_entry, kid_entry, fid_notes, time.time() - start)
        metrics["runtime"] = runtime.to_dict()
        if out.folder is not None:
            grids = evaluate_report.write_outputs(out.folder, metrics, inputs.items, results, cfg.grid_cell)
            evaluate_report.log_tracker(accelerator, metrics, grids)
            if extra_outputs is not None:
                extra_outputs(out.folder, metrics, inputs.items)
    journal.close()
    if owns:
        accelerator.end_training()
    return metrics


def evaluate_stages(settings: SamplerSettings) -> dict[str, int]:
    """Sampling batches and their decode: evaluate's model stages."""
    return {"generation": settings.batch_size, "vae_decode": settings.batch_size}


def evaluate_plan(cfg: EvaluateConfig, defaults: ModelDefaults) -> dict:
    """`--plan`: batch sizes and estimated peaks from the model folder's configs (meta device)."""
    settings = SamplerSettings.for_model(defaults.model_dir).with_overrides(cfg.sampler)
    return folder_plan(defaults.model_dir, cfg.runtime, evaluate_stages(settings))


def fingerprint(cfg: EvaluateConfig, inputs: Inputs, bundle, fid_manifest: str | None) -> dict:
    """What a resumed evaluation must share with the interrupted one: the command line (but how
    it is run and shown), the model's weights and the bytes of the manifests and images."""
    # the budget only sizes batches (round-off, not figures): a resume may run on another card
    run_only = ("resume", "overwrite", "progress", "report_to", "project", "max_memory", "plan", "timeout_minutes")
    command = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in run_only}
    return {"command": command,
            "weights": weights_checksum(bundle), "manifests": file_digests([inputs.manifest_path, fid_manifest]),
            "images": file_digests([it.image for it in inputs.items if inputs.has_images])}


def assemble(cfg, defaults: ModelDefaults, inputs: Inputs, results, descriptor, scorer, clip_reason, bundle, settings, seeds,
             accelerator, fid_entry, kid_entry, fid_notes, seconds) -> dict:
    """metrics.json: overall figures at the top level, per-prompt figures under `items`."""
    m = measurement_of(results)
    p002_summary, p002 = paper002_figures(m)
    a_clip, clipscore = alignment_figures(results, scorer, clip_reason)
    standin = descriptor.name.startswith("standin")
    notes = list(fid_notes)
    if standin:
        notes.insert(0, f"copy descriptor is the stand-in '{descriptor.name}', NOT SSCD")
    if inputs.skipped:
        notes.append(f"{len(inputs.skipped)} prompt(s) skipped: training image missing (see manifest.skipped)")
    return {
        **overall_figures(m, cfg.threshold),
        "threshold": cfg.threshold,
        "paper002": p002_summary,
        "a_clip": a_clip,
        "clipscore": clipscore,
        "lpips_diversity": lpips_figures(results, cfg, len(seeds)),
        "fid": fid_entry,
        "kid": kid_entry,
        "metric_backend": descriptor.name,
        "metric_is_standin": standin,
        "metric_devices": metric_devices(descriptor, scorer, fid_entry, bundle.device),
        "model": {"source": cfg.model or defaults.label or defaults.model_dir, "path": inputs.model_dir,
                  "defaults": defaults.label},
        "manifest": {"path": str(inputs.manifest_path), "n_evaluated": len(inputs.items),
                     "n_items": len(inputs.items) + len(inputs.skipped), "skipped": inputs.skipped},
        "sampler": settings.to_dict(),
        "seeds": list(seeds),
        "num_processes": dist.world(accelerator)[1],
        "device": str(bundle.device),
        "dtype": str(bundle.dtype).replace("torch.", ""),
        "versions": versions(),
        "seconds": round(seconds, 1),
        "output_dir": str(inputs.output_dir.absolute()),
        "notes": notes,
        "items": item_rows(inputs.items, results, m, p002, cfg.threshold),
    }


