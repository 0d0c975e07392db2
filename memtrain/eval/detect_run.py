"""memtrain detect's run: every detector of memtrain.eval.detect on memorized against
non-memorized prompts; OUT/detect.json, OUT/detect.md, OUT/roc.png (one staged folder)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from memtrain.core import progress, report
from memtrain.core import run as dist
from memtrain.core.bundle import ModelDefaults, load_for_runtime
from memtrain.core.memory import folder_plan, plan_for_run
from memtrain.core.runtime import resolve_runtime
from memtrain.core.cli import option, section
from memtrain.core.options import ModelOptions, OutputOptions
from memtrain.core.errors import MemtrainError
from memtrain.core.files import check_output_dir, write_json
from memtrain.core.manifest import read_manifest
from memtrain.core.report import CommandResult
from memtrain.core.sampling import SamplerOverrides, SamplerSettings, check_seeds
from memtrain.eval.detect import DETECTORS, auc, roc_points, score_prompts, tpr_at_fpr
from memtrain.eval.utility import versions


@dataclass(kw_only=True)
class DetectConfig(ModelOptions, OutputOptions):
    """What to score. `memtrain detect`'s config: the shared model/output options and these."""

    memorized: str | None = option(None, "manifest of memorized prompts; default: the model's memorized set")
    non_memorized: str | None = option(None, "manifest of non-memorized prompts; default: the model's unique set")
    detectors: list[str] | None = option(None, f"which detectors ({', '.join(DETECTORS)}); default: all")
    seeds: int = option(4, "generations per prompt, seeds 0..N-1")
    max_prompts: int | None = option(None, "at most N prompts from each manifest")
    sampler: SamplerOverrides = section(SamplerOverrides, "changes to the model's sampler", flat=True)
    project: str | None = option("memtrain-detect", "tracker project name")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in self.detectors or ():
            if name not in DETECTORS:
                raise MemtrainError(f"unknown detector '{name}': choose one of {', '.join(DETECTORS)}")
        if self.seeds < 2:
            raise MemtrainError(f"--seeds must be >= 2 (NeMo's score compares seeds), got {self.seeds}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise MemtrainError(f"--max_prompts must be >= 1, got {self.max_prompts}")
        if self.resume:
            raise MemtrainError("detect has no --resume: it writes its folder once, at the end (rerun it)")

    def check_files(self) -> None:
        """The output folder and the manifests named (read before any model loads)."""
        self.check_output(self.memorized, self.non_memorized)


def _prompts(path: str | None, flag: str, defaults: ModelDefaults, role: str, limit: int | None) -> tuple[str, list[str]]:
    path = path or defaults.manifest(role)
    if path is None:
        raise MemtrainError(f"no {flag} given and the model '{defaults.model_dir}' brings none: pass {flag}")
    return str(Path(path).absolute()), [it.prompt for it in read_manifest(path)][:limit]


def detect(cfg: DetectConfig, defaults: ModelDefaults | None = None) -> CommandResult:
    """Score every detector; returns the typed result (detect.json's content, or the --plan) and
    writes it with `write` into the staged output folder."""
    defaults = defaults or ModelDefaults.plain(cfg.model)
    if cfg.runtime.plan:
        batch = SamplerSettings.for_model(defaults.model_dir).with_overrides(cfg.sampler).batch_size
        return CommandResult({}, plan=folder_plan(defaults.model_dir, cfg.runtime, {"generation": batch, "vae_decode": batch}))
    names = list(cfg.detectors or DETECTORS)
    pos_path, positives = _prompts(cfg.memorized, "--memorized", defaults, "memorized", cfg.max_prompts)
    neg_path, negatives = _prompts(cfg.non_memorized, "--non_memorized", defaults, "unique", cfg.max_prompts)
    name = Path(defaults.model_dir).name if Path(defaults.model_dir).name != "model" else Path(defaults.model_dir).parent.name
    out = Path(cfg.output_dir or Path("detections") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_output_dir(out, cfg.overwrite)
    accelerator = dist.make_accelerator(cfg.report_to, timeout_minutes=cfg.runtime.timeout_minutes)
    runtime = resolve_runtime(cfg.runtime, accelerator)
    bundle = load_for_runtime(defaults.model_dir, runtime, cfg.lora)
    settings = bundle.sampler_settings.with_overrides(cfg.sampler)
    plan = plan_for_run(bundle, runtime, {"generation": settings.batch_size, "vae_decode": settings.batch_size})
    settings = dataclasses.replace(settings, batch_size=plan.batch("generation"))
    seeds = check_seeds(range(cfg.seeds))
    results = {}
    for detector in names:
        with progress.stage(f"detect: {detector}", len(positives) + len(negatives), "prompts",
                            cfg.progress and dist.is_main(accelerator)) as bar:
            pos, pos_seconds = score_prompts(bundle, detector, positives, seeds, settings, bar)
            neg, neg_seconds = score_prompts(bundle, detector, negatives, seeds, settings, bar)
        results[detector] = {
            "auc": auc(pos, neg), "tpr_at_1pct_fpr": tpr_at_fpr(pos, neg, 0.01),
            "seconds_per_prompt": (pos_seconds * len(pos) + neg_seconds * len(neg)) / (len(pos) + len(neg)),
            "scores": {"memorized": pos, "non_memorized": neg}, "roc": dict(zip(("fpr", "tpr"), roc_points(pos, neg))),
        }
    doc = {"model": cfg.model or defaults.label or defaults.model_dir, "memorized": pos_path, "non_memorized": neg_path,
           "n_memorized": len(positives), "n_non_memorized": len(negatives), "seeds": seeds,
           "sampler": settings.to_dict(), "device": str(bundle.device), "versions": versions(),
           "tpr_note": (f"TPR at 1% FPR with {len(negatives)} non-memorized prompts: 1% allows "
                        f"{int(0.01 * len(negatives))} of them past the threshold"),
           "detectors": results, "runtime": runtime.to_dict()}
    result = CommandResult(doc, out.absolute())
    with dist.OutputRun(accelerator, out, cfg.overwrite, cfg.project, dataclasses.asdict(cfg),
                        trackers=cfg.tracker is not None) as run:
        if run.folder is not None:
            write(result, run.folder)
            dist.log_to_trackers(accelerator, {f"{n}/auc": r["auc"] for n, r in results.items()})
    return result


def write(result: CommandResult, folder: Path) -> None:
    """detect's writer: detect.json, roc.png and detect.md into `folder`."""
    write_json(folder / "detect.json", report.versioned(result.report))
    plot_roc(result.report["detectors"], folder / "roc.png")
    markdown(result.report).write(folder / "detect.md")


def plot_roc(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, r in results.items():
        ax.plot(r["roc"]["fpr"], r["roc"]["tpr"], drawstyle="steps-post", label=f"{name} (AUC {r['auc']:.2f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false-positive rate (non-memorized prompts)")
    ax.set_ylabel("true-positive rate (memorized prompts)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(doc: dict) -> report.MarkdownReport:
    md = report.MarkdownReport("Memorization detection")
    md.key_values({"model": doc["model"], "memorized": f"{doc['n_memorized']} from {doc['memorized']}",
                   "non-memorized": f"{doc['n_non_memorized']} from {doc['non_memorized']}",
                   "seeds": len(doc["seeds"]), "sampler": doc["sampler"]})
    md.table([{"detector": n, "AUC": r["auc"], "TPR at 1% FPR": r["tpr_at_1pct_fpr"],
               "seconds per prompt": r["seconds_per_prompt"]} for n, r in doc["detectors"].items()],
             ["detector", "AUC", "TPR at 1% FPR", "seconds per prompt"])
    md.paragraph(doc["tpr_note"] + ". Every score is higher for 'memorized'; definitions in memtrain/eval/detect.py.")
    md.image("roc.png", "ROC")
    return md
