"""`memtrain analyze`'s run: one or several analyses into one staged output folder.

OUT/<analysis>.json, its PNG plots, OUT/<analysis>.md embedding them, OUT/index.md linking them
all; with --report_to wandb every plot is also logged as a W&B image.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path


from PIL import Image

from memtrain.core import progress
from memtrain.core import run as dist
from memtrain.core.bundle import ModelDefaults, load_for_runtime
from memtrain.core.cli import option, section
from memtrain.core.command_line import merge
from memtrain.core.config import build, packaged_recipe, read_yaml
from memtrain.core.errors import MemtrainError
from memtrain.core.registry import Registry
from memtrain.core.files import check_output_dir, write_json
from memtrain.core.memory import folder_plan, plan_for_run
from memtrain.core.options import MetricOptions, ModelOptions, OutputOptions
from memtrain.core.runtime import resolve_runtime
from memtrain.core.manifest import read_manifest
from memtrain.core.report import MarkdownReport, to_jsonable, versioned
from memtrain.core.sampling import SamplerOverrides, SamplerSettings, check_seeds
from memtrain.eval.analyses import guidance, interventions, locality, localization, overestimation
from memtrain.eval.analyses.inputs import AnalysisInputs
from memtrain.eval.utility import versions
from memtrain.metrics import get_descriptor

MODEL_RECIPE = "analyze_sd14.yaml"

# name -> run(inputs, settings, folder) -> (JSON, Markdown); `all` is every one but localization
ANALYSES = Registry("analysis")
for _module in (interventions, guidance, overestimation, locality, localization):
    ANALYSES.add(_module.__name__.rsplit(".", 1)[1], _module.run)


@dataclass
class AnalysisRecipe:
    """Per-model analysis settings (recipes/analyze_*.yaml)."""

    seeds: int = 10
    max_prompts: int | None = None  # per group
    sampler: SamplerOverrides = section(SamplerOverrides, "changes to the model's sampler", flat=True)
    interventions: interventions.InterventionSettings = field(default_factory=interventions.InterventionSettings)
    guidance: guidance.GuidanceSettings = field(default_factory=guidance.GuidanceSettings)
    overestimation: overestimation.OverestimationSettings = field(default_factory=overestimation.OverestimationSettings)
    locality: locality.LocalitySettings = field(default_factory=locality.LocalitySettings)
    localization: localization.LocalizationSettings = field(default_factory=localization.LocalizationSettings)

    def __post_init__(self) -> None:
        if self.seeds < 1:  # one seed runs, but the across-seed spreads (diversity, covariance) are then None
            raise MemtrainError(f"recipe key 'seeds' must be >= 1, got {self.seeds}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise MemtrainError(f"recipe key 'max_prompts' must be >= 1, got {self.max_prompts}")



@dataclass(kw_only=True)
class AnalyzeConfig(ModelOptions, OutputOptions, MetricOptions, AnalysisRecipe):
    """Which analyses, on which prompts. `memtrain analyze`'s config: the shared options, these
    fields, and the per-model settings (AnalysisRecipe) whose defaults come from the model's recipe
    (`analysis_config`)."""

    analyses: list[str] = option(dataclasses.MISSING, f"which analyses ({', '.join(ANALYSES)}, or all)", "--analysis")
    manifest: str | None = option(None, "memorized prompts with their images; default: the model's memorized set")
    non_memorized: str | None = option(None, "non-memorized prompts (with images); default: the model's unique set")
    project: str | None = option("memtrain-analyze", "tracker project name")
    recipe_path: str | None = field(default=None, init=False, repr=False)  # where the settings came from

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(a == "all" for a in self.analyses):  # every analysis that needs no ground truth
            self.analyses = [a for a in ANALYSES if a != "localization"]
        for name in self.analyses:
            if name not in ANALYSES:
                raise ANALYSES.unknown(name)
        if self.resume:
            raise MemtrainError("analyze has no --resume: it writes its folder once, at the end (rerun it)")

    def check_files(self) -> None:
        """The output folder and the manifests named (read before any model loads)."""
        self.check_output(self.manifest, self.non_memorized)


def model_recipe(defaults: ModelDefaults, recipe: str | Path | None = None) -> Path:
    """`recipe`, else the analysis twin of the model's audit recipe (audit_X.yaml -> analyze_X.yaml),
    else the packaged analyze_sd14.yaml."""
    if recipe:
        return Path(recipe)
    if defaults.audit_recipe:
        twin = Path(defaults.audit_recipe).with_name(Path(defaults.audit_recipe).name.replace("audit_", "analyze_", 1))
        if twin.is_file():
            return twin
    return packaged_recipe(MODEL_RECIPE)


def analysis_config(defaults: ModelDefaults, values: dict, recipe: str | Path | None = None) -> AnalyzeConfig:
    """The typed way to configure the analyses: `values` over the model's recipe (`recipe` replaces it)."""
    path = model_recipe(defaults, recipe)
    config = build(AnalyzeConfig, merge(read_yaml(path), values))
    config.recipe_path = str(path)
    return config


def _items(path: str | None, flag: str, defaults: ModelDefaults, role: str, limit: int | None):
    path = path or defaults.manifest(role)
    if path is None:
        raise MemtrainError(f"no {flag} given and the model '{defaults.model_dir}' brings none: pass {flag}")
    return str(Path(path).absolute()), list(read_manifest(path))[:limit]


def analyze(cfg: AnalyzeConfig, defaults: ModelDefaults | None = None) -> dict:
    """Run the analyses; returns {analysis: its JSON} and writes the output folder."""
    defaults = defaults or ModelDefaults.plain(cfg.model)
    recipe, path = cfg, Path(cfg.recipe_path or "(config built in code)")  # the per-model settings
    if cfg.runtime.plan:
        batch = SamplerSettings.for_model(defaults.model_dir).with_overrides(recipe.sampler).batch_size
        return {"plan": folder_plan(defaults.model_dir, cfg.runtime, {"generation": batch, "vae_decode": batch})}
    limit = recipe.max_prompts
    mem_path, memorized = _items(cfg.manifest, "--manifest", defaults, "memorized", limit)
    non_path, non_memorized = _items(cfg.non_memorized, "--non_memorized", defaults, "unique", limit)
    name = Path(defaults.model_dir).name if Path(defaults.model_dir).name != "model" else Path(defaults.model_dir).parent.name
    out = Path(cfg.output_dir or Path("analyses") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_output_dir(out, cfg.overwrite)
    if "localization" in cfg.analyses:  # fail before loading anything
        localization.ground_truth_path(recipe.localization, defaults.model_dir)
    report_to = cfg.tracker
    accelerator = dist.make_accelerator(report_to, timeout_minutes=cfg.runtime.timeout_minutes)
    runtime = resolve_runtime(cfg.runtime, accelerator)
    descriptor = get_descriptor(cfg.metric, allow_standin=cfg.allow_standin, device=runtime.device)
    bundle = load_for_runtime(defaults.model_dir, runtime, cfg.lora)
    settings = bundle.sampler_settings.with_overrides(recipe.sampler)
    plan = plan_for_run(bundle, runtime, {"generation": settings.batch_size, "vae_decode": settings.batch_size})
    settings = dataclasses.replace(settings, batch_size=plan.batch("generation"))
    inputs = AnalysisInputs(bundle, settings, check_seeds(range(recipe.seeds)),
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
            with progress.stage(f"analyze: {analysis}", None, "analyses",
                                cfg.progress and dist.is_main(accelerator)) as bar:
                doc, md = ANALYSES[analysis](inputs, getattr(recipe, analysis), folder)
                bar.advance()
            doc = {"analysis": analysis, **common, "settings": dataclasses.asdict(getattr(recipe, analysis)),
                   "seconds": round(time.perf_counter() - start, 1), **doc, "runtime": runtime.to_dict()}
            results[analysis] = doc
            if run.folder is not None:
                write_json(run.folder / f"{analysis}.json", to_jsonable(versioned(doc)))
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
