"""scripts/analyze.py's run: one or several analyses into one staged output folder.

OUT/<analysis>.json, its PNG plots, OUT/<analysis>.md embedding them, OUT/index.md linking them
all; with --report_to wandb every plot is also logged as a W&B image.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from memtrain.core import run as dist
from memtrain.core.bundle import ModelDefaults, load_bundle
from memtrain.core.config import build
from memtrain.core.memory import folder_plan, plan_for_run
from memtrain.core.runtime import RuntimeOptions, resolve_runtime
from memtrain.core.cli import option
from memtrain.core.config import apply_overrides, build, read_yaml
from memtrain.core.errors import MemtrainError
from memtrain.core.files import check_output_dir, write_json
from memtrain.core.manifest import read_manifest
from memtrain.core.report import MarkdownReport, to_jsonable
from memtrain.core.sampling import SamplerOverrides, SamplerSettings, check_seeds
from memtrain.eval.analyses import guidance, interventions, locality, localization, overestimation
from memtrain.eval.analyses.inputs import AnalysisInputs
from memtrain.eval.utility import versions
from memtrain.metrics import get_descriptor

REPO_RECIPES = Path(__file__).resolve().parents[3] / "recipes"
MODEL_RECIPE = "analyze_sd14.yaml"

ANALYSES: dict[str, Callable] = {
    "interventions": interventions.run, "guidance": guidance.run,
    "overestimation": overestimation.run, "locality": locality.run, "localization": localization.run,
}


@dataclass
class AnalysisRecipe:
    """Per-model analysis settings (recipes/analyze_*.yaml)."""

    seeds: int = 10
    max_prompts: int | None = None  # per group
    sampler: SamplerOverrides = field(default_factory=SamplerOverrides)
    interventions: interventions.InterventionSettings = field(default_factory=interventions.InterventionSettings)
    guidance: guidance.GuidanceSettings = field(default_factory=guidance.GuidanceSettings)
    overestimation: overestimation.OverestimationSettings = field(default_factory=overestimation.OverestimationSettings)
    locality: locality.LocalitySettings = field(default_factory=locality.LocalitySettings)
    localization: localization.LocalizationSettings = field(default_factory=localization.LocalizationSettings)

    def __post_init__(self) -> None:
        if self.seeds < 2:
            raise MemtrainError(f"recipe key 'seeds' must be >= 2 (diversity and covariance compare seeds), got {self.seeds}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise MemtrainError(f"recipe key 'max_prompts' must be >= 1, got {self.max_prompts}")


def load_analysis_recipe(path: str | Path, overrides=()) -> AnalysisRecipe:
    return build(AnalysisRecipe, apply_overrides(read_yaml(path), list(overrides)))


@dataclass
class AnalyzeConfig:
    """What scripts/analyze.py sets (its flags are these fields)."""

    analyses: list[str] = option(dataclasses.MISSING, f"which analyses ({', '.join(ANALYSES)}, or all)", "--analysis")
    model: str | None = option(None, "diffusers SD folder or hub id (or a testbed folder); default: the cached testbed")
    manifest: str | None = option(None, "memorized prompts with their images; default: the model's memorized set")
    non_memorized: str | None = option(None, "non-memorized prompts (with images); default: the model's unique set")
    recipe: str | None = option(None, "analysis recipe YAML (default: the model's own, else recipes/analyze_sd14.yaml)")
    overrides: list[str] | None = option(None, "recipe keys to change, key=value (e.g. locality.n_embeddings=8)", "--set")
    seeds: int | None = option(None, "generations per prompt (default: the recipe's)")
    max_prompts: int | None = option(None, "at most N prompts per group (default: the recipe's)")
    metric: str | None = option(None, "SSCD backend: onnx (default), a TorchScript/.onnx path, or standin")
    allow_standin: bool = option(False, "permit the named stand-in descriptor")
    output_dir: str | None = option(None, "default: analyses/<model>-<time>")
    overwrite: bool = option(False, "replace an existing output dir (once the new one is complete)")
    report_to: str | None = option(None, "also log the plots to a tracker: wandb (or none)")
    project: str = option("memtrain-analyze", "tracker project name")
    progress: bool = option(True, "progress logging")
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)  # --device --dtype --max_memory --plan

    def __post_init__(self) -> None:
        self.runtime = build(RuntimeOptions, self.runtime, "runtime")  # a mapping from a recipe or test
        if any(a == "all" for a in self.analyses):  # every analysis that needs no ground truth
            self.analyses = [a for a in ANALYSES if a != "localization"]
        for name in self.analyses:
            if name not in ANALYSES:
                raise MemtrainError(f"unknown analysis '{name}': choose from {', '.join(ANALYSES)} or all")
        if self.report_to not in (None, "none", "wandb"):
            raise MemtrainError(f"--report_to must be wandb or none, got '{self.report_to}'")
        if self.output_dir is not None:
            check_output_dir(self.output_dir, self.overwrite)
        for path in (self.manifest, self.non_memorized):
            if path is not None:
                read_manifest(path)
        if self.recipe is not None or self.overrides:
            load_analysis_recipe(self.recipe or REPO_RECIPES / MODEL_RECIPE, self.overrides or ())


def recipe_path(cfg: AnalyzeConfig, defaults: ModelDefaults) -> Path:
    """--recipe, else the analysis twin of the model's audit recipe (audit_X.yaml -> analyze_X.yaml)."""
    if cfg.recipe:
        return Path(cfg.recipe)
    if defaults.audit_recipe:
        twin = Path(defaults.audit_recipe).with_name(Path(defaults.audit_recipe).name.replace("audit_", "analyze_", 1))
        if twin.is_file():
            return twin
    return REPO_RECIPES / MODEL_RECIPE


def _items(path: str | None, flag: str, defaults: ModelDefaults, role: str, limit: int | None):
    path = path or defaults.manifest(role)
    if path is None:
        raise MemtrainError(f"no {flag} given and the model '{defaults.model_dir}' brings none: pass {flag}")
    return str(Path(path).absolute()), list(read_manifest(path))[:limit]


def analyze(cfg: AnalyzeConfig, defaults: ModelDefaults | None = None) -> dict:
    """Run the analyses; returns {analysis: its JSON} and writes the output folder."""
    defaults = defaults or ModelDefaults.plain(cfg.model)
    path = recipe_path(cfg, defaults)
    recipe = load_analysis_recipe(path, cfg.overrides or ())
    if cfg.runtime.plan:
        batch = SamplerSettings.for_model(defaults.model_dir).with_overrides(recipe.sampler).batch_size
        return {"plan": folder_plan(defaults.model_dir, cfg.runtime, {"generation": batch, "vae_decode": batch})}
    limit = cfg.max_prompts or recipe.max_prompts
    mem_path, memorized = _items(cfg.manifest, "--manifest", defaults, "memorized", limit)
    non_path, non_memorized = _items(cfg.non_memorized, "--non_memorized", defaults, "unique", limit)
    name = Path(defaults.model_dir).name if Path(defaults.model_dir).name != "model" else Path(defaults.model_dir).parent.name
    out = Path(cfg.output_dir or Path("analyses") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_output_dir(out, cfg.overwrite)
    if "localization" in cfg.analyses:  # fail before loading anything
        localization.ground_truth_path(recipe.localization, defaults.model_dir)
    report_to = None if cfg.report_to in (None, "none") else cfg.report_to
    accelerator = dist.make_accelerator(report_to, timeout_minutes=cfg.runtime.timeout_minutes)
    runtime = resolve_runtime(cfg.runtime, accelerator)
    descriptor = get_descriptor(cfg.metric, allow_standin=cfg.allow_standin, device=runtime.device)
    bundle = load_bundle(defaults.model_dir, device=runtime.device, dtype=runtime.dtype)
    settings = bundle.sampler_settings.with_overrides(recipe.sampler)
    plan = plan_for_run(bundle, runtime, {"generation": settings.batch_size, "vae_decode": settings.batch_size})
    settings = dataclasses.replace(settings, batch_size=plan.batch("generation"))
    inputs = AnalysisInputs(bundle, settings, check_seeds(range(cfg.seeds or recipe.seeds)),
                            {"memorized": memorized, "non_memorized": non_memorized}, descriptor,
                            defaults.label or name)
    common = {"model": cfg.model or defaults.label or defaults.model_dir, "recipe": str(path.absolute()),
              "memorized": mem_path, "non_memorized": non_path, "seeds": inputs.seeds,
              "sampler": settings.to_dict(), "metric_backend": descriptor.name, "device": str(bundle.device),
              "metric_devices": {"sscd": descriptor.placement},
              "versions": versions()}
    results, pages = {}, {}
    with dist.OutputRun(accelerator, out, cfg.overwrite, cfg.project, dataclasses.asdict(cfg),
                        trackers=report_to is not None) as run:
        folder = run.folder or Path(".")
        for analysis in cfg.analyses:
            start = time.perf_counter()
            doc, md = ANALYSES[analysis](inputs, getattr(recipe, analysis), folder)
            doc = {"analysis": analysis, **common, "settings": dataclasses.asdict(getattr(recipe, analysis)),
                   "seconds": round(time.perf_counter() - start, 1), **doc, "runtime": runtime.to_dict()}
            results[analysis] = doc
            if run.folder is not None:
                write_json(run.folder / f"{analysis}.json", to_jsonable(doc))
                md.key_values({"model": common["model"], "sampler": common["sampler"], "seeds": len(inputs.seeds),
                               "copy descriptor": descriptor.name, "seconds": doc["seconds"]})
                md.write(run.folder / f"{analysis}.md")
                pages[analysis] = sorted(p.name for p in run.folder.glob(f"{analysis}*.png"))
        if run.folder is not None:
            index = MarkdownReport("memtrain analyses")
            index.bullets([f"[{a}]({a}.md): {', '.join(pages[a])}" for a in cfg.analyses])
            index.write(run.folder / "index.md")
            images = {f"{a}/{p}": [Image.open(run.folder / p).convert("RGB")] for a in cfg.analyses for p in pages[a]}
            dist.log_to_trackers(accelerator, {f"{a}/seconds": results[a]["seconds"] for a in cfg.analyses}, images=images)
    for doc in results.values():
        doc["output_dir"] = str(out.absolute())
    return results
