"""One prepared GPU check: speed and memory of every heavy path on the SD v1.4-shaped random-weight
fixture at full size, measured in one run and written to OUT/gpu_check.json.

Stages, each in a fresh child process (so one stage's peak memory is its own: CUDA's max
allocated bytes on a GPU, the child's peak resident set on the CPU, and no stage inherits
another's cached blocks):

  build     memtrain build-fixture sd14 at --resolution, with its LAION-like photo manifests
  speed     generation images/s against diffusers' StableDiffusionPipeline at the same weights,
            dtype and settings (`ratio`), then the Dori attack's TFLOP/s against a large matmul
            (memtrain.bench.full_size's functions)
  finetune  adversarial fine-tuning seconds per image and peak memory (bench_full_finetune)
  audit     `none pad_mask nemo` on 4 targets x 4 seeds, as `memtrain audit` runs it

The children are `python -m memtrain.bench.gpu_check STAGE SPEC.json RESULT.json`; the parent
only validates the flags, starts them and writes the JSON. Random weights: the figures are about
speed and memory at SD's real shapes, never about memorization.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memtrain.attack import AttackConfig
from memtrain.bench.attack_sampling import bench_metrics, bench_prompts
from memtrain.bench.removal import bench_removal
from memtrain.bench.full_size import (bench_full_attack, bench_full_finetune, bench_generation, finetune_recipe,
                                      precision_overrides)
from memtrain.core.bundle import load_bundle
from memtrain.core.cli import option, section
from memtrain.core.command_line import command_parser, parse_command_line
from memtrain.core.config import packaged_recipe
from memtrain.core.errors import MemtrainError
from memtrain.core.files import StagedOutput, write_json
from memtrain.core.report import versioned
from memtrain.core.runtime import RuntimeOptions, resolve_runtime
from memtrain.core.sampling import SamplerOverrides
from memtrain.eval.audit import AuditConfig, audit, config_for_model
from memtrain.testbed.photos import write_photo_manifests
from memtrain.testbed.resolver import resolve_model
from memtrain.train.trainer import AdvFinetuner

SD_RECIPE = packaged_recipe("sd14.yaml")
AUDIT_RECIPE = packaged_recipe("audit_smoke.yaml")  # every audit stage once; budgets set below
AUDIT_MITIGATIONS = ["none", "pad_mask", "nemo"]
GOALS = {"generation_ratio": 1.3, "attack_fraction_of_matmul": 0.4, "wall_seconds_on_h100": 480}


@dataclass
class CheckBudget:
    """How much each stage runs. The defaults are the GPU check's; the CPU test shrinks them."""

    resolution: int = 512
    prompts: int = 4                # generation: prompts x seeds images, one batch for memtrain
    seeds: int = 4
    steps: int = 20                 # sampling steps of the generation benchmark
    repeats: int = 2                # timed runs of each generator, alternating (the best counts)
    attack_targets: int = 4
    attack_steps: int = 5
    noise_samples: int = 8
    matmul_size: int = 8192         # the reference matmul (n x n, bf16 on a GPU)
    finetune: str = "full"          # full or lora
    finetune_steps: int = 5
    finetune_batch: int = 4         # surrogate images per step (utility images: as many again)
    removal_steps: int = 1          # ESD, Concept Ablation, SISS: optimizer steps each (0 skips them)
    # SISS trains the whole U-Net with two gradient buffers: ~21 GB at SD's size in fp32, too much for a CPU
    removal_methods: list[str] = field(default_factory=lambda: ["esd", "concept_ablation", "siss"],
                                       metadata={"help": "the removal methods timed"})
    audit_targets: int = 4
    audit_seeds: int = 4
    audit_steps: int = 20           # the audit's sampling steps
    audit_attack_steps: int = 10

    def __post_init__(self) -> None:
        if self.resolution < 64 or self.resolution % 64:
            raise MemtrainError(f"--resolution {self.resolution}: use a multiple of 64 (512 is SD v1.4's)")
        if self.finetune not in ("full", "lora"):
            raise MemtrainError(f"--finetune '{self.finetune}': use full or lora")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            least = 0 if f.name in ("finetune_steps", "removal_steps") else 1
            if isinstance(value, int) and value < least:
                raise MemtrainError(f"--{f.name} {value}: must be >= {least}")


@dataclass(kw_only=True)
class GpuCheckConfig:
    """scripts/gpu_check.py's config: where it writes, the device and precision, the budgets."""

    output_dir: str | None = option(None, "where gpu_check.json and logs/ go (required)")
    overwrite: bool = option(False, "replace an existing output dir")
    fixture: str | None = option(None, "an sd14 fixture folder built before (else one is built)")
    keep_work: bool = option(False, "keep OUT/work (the fixture, the audit's output)")
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda where there is one)")
    dtype: str = option("auto", "auto (bf16 on a GPU that has it, else fp16; fp32 on the CPU), fp32, fp16, bf16")
    budget: CheckBudget = section(CheckBudget, "how much each stage runs", flat=True)

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise MemtrainError("--output_dir is required: the folder gpu_check.json and logs/ go to")
        self.runtime  # a bad --device or --dtype stops here, before anything is written

    @property
    def runtime(self) -> RuntimeOptions:
        return RuntimeOptions(device=self.device, dtype=self.dtype)


# ----------------------------------------------------------------------------- what each stage runs


def finetune_overrides(dtype: str, budget: CheckBudget) -> list[str]:
    """Recipe overrides of the fine-tuning stage (on top of full_size.SMALL)."""
    return [*precision_overrides(dtype), f"train.finetune={budget.finetune}", f"train.surrogate_batch_size={budget.finetune_batch}", f"surrogates.per_prompt={budget.finetune_batch}"]


def audit_argv(model: Path, photos: Path, output_dir: Path, device: str, dtype: str, budget: CheckBudget) -> list[str]:
    """`memtrain audit`'s command line for the audit stage (4 targets x 4 seeds by default)."""
    argv = ["--mitigation", *AUDIT_MITIGATIONS, "--model", str(model), "--manifest", str(photos / "memorized.jsonl"),
            "--control_manifest", str(photos / "held_out.jsonl"), "--reference_manifest", str(photos / "held_out.jsonl"),
            "--recipe", str(AUDIT_RECIPE), "--seeds", str(budget.audit_seeds), "--max_targets", str(budget.audit_targets),
            "--attack.steps", str(budget.audit_attack_steps), "--output_dir", str(output_dir), "--no_progress",
            "--set", f"control_targets={budget.audit_targets}", f"sampler.num_inference_steps={budget.audit_steps}",
            f"chunk_targets={budget.audit_targets}", "attack.max_batch=32",
            f"mitigation_settings.nemo.num_inference_steps={budget.audit_steps}"]
    return argv + ["--device", device, "--dtype", dtype]  # the audit's runtime: the check's own


# ----------------------------------------------------------------------------- the children


def _stage_runtime(spec: dict):
    return resolve_runtime(RuntimeOptions(device=spec["device"], dtype=spec["dtype"]))


def speed_stage(spec: dict) -> dict:
    """Generation against diffusers' pipeline, then the attack against a matmul (one bundle)."""

    b = CheckBudget(**spec["budget"])
    runtime = _stage_runtime(spec)
    bundle = load_bundle(spec["model"], runtime.device, runtime.dtype)
    n = b.prompts * b.seeds  # every (prompt, seed) image in one batch: the batching the ratio is about
    settings = bundle.sampler_settings.with_overrides(SamplerOverrides(num_inference_steps=b.steps, batch_size=n))
    gen = bench_generation(bundle, bench_prompts(spec["manifest"], b.prompts, b.seeds, 1), list(range(b.seeds)),
                           settings, repeats=b.repeats)
    gen["peak_memory_gb"] = runtime.peak_memory_gb()
    if runtime.device.type == "cuda":  # the attack's own peak, not generation's
        torch.cuda.reset_peak_memory_stats(runtime.device)
    att = bench_full_attack(bundle, spec["manifest"], b.attack_targets,
                            AttackConfig(steps=b.attack_steps, noise_samples=b.noise_samples, lr=0.1), b.matmul_size)
    att["peak_memory_gb"] = runtime.peak_memory_gb()
    metrics = bench_metrics(runtime.device, images=b.prompts * b.seeds, resolution=b.resolution)
    return {"generation": gen, "attack": att, "metrics": metrics, "dtype": runtime.dtype_name,
            "device": str(runtime.device)}


def finetune_stage(spec: dict) -> dict:
    """Seconds per image of adversarial fine-tuning steps at the check's dtype."""

    b = CheckBudget(**spec["budget"])
    runtime = _stage_runtime(spec)
    recipe = finetune_recipe(str(SD_RECIPE), spec["model"], spec["manifest"], spec["output_dir"],
                             finetune_overrides(spec["dtype"], b))
    ft = bench_full_finetune(AdvFinetuner(recipe), b.finetune_steps)
    images = 2 * b.finetune_batch  # surrogate and utility halves of a step
    ft.update(peak_memory_gb=runtime.peak_memory_gb(), images_per_step=images,
              peak_memory_gb_per_image=runtime.peak_memory_gb() / images)
    return ft


def removal_stage(spec: dict) -> dict:
    """ESD, Concept Ablation and SISS at paper 004's settings: s/step, preparation, peak memory."""

    b = CheckBudget(**spec["budget"])
    precision = {"bf16": "bf16", "fp16": "fp16"}.get(spec["dtype"], "no")
    doc = bench_removal(spec["model"], spec["manifest"], spec["output_dir"], b.removal_methods, steps=b.removal_steps,
                        mixed_precision=precision)
    return {m["method"]: {k: m[k] for k in ("seconds_per_step", "preparation_seconds_per_item", "peak_memory_gb",
                                             "gradient_accumulation_steps")} for m in doc["methods"]}


def audit_stage(spec: dict) -> dict:
    """`memtrain audit`'s audit in this process (its peak memory is then this child's)."""

    runtime = _stage_runtime(spec)
    line = parse_command_line(command_parser("memtrain audit", "", AuditConfig), spec["argv"])
    defaults = resolve_model(line.values["model"], progress=False)
    start = time.perf_counter()
    doc = audit(config_for_model(line, defaults), defaults).report
    seconds = time.perf_counter() - start
    ran = doc.get("runtime", {})  # the audit's own account of the device and dtype it ran in
    return {"seconds": seconds, "peak_memory_gb": runtime.peak_memory_gb(), "mitigations": AUDIT_MITIGATIONS,
            "dtype": ran.get("dtype", spec["dtype"]),
            "device": ran.get("device", str(runtime.device)), "rows": len(doc.get("results", []))}


STAGES = {"speed": speed_stage, "finetune": finetune_stage, "removal": removal_stage, "audit": audit_stage}


def child_env(device: torch.device) -> dict[str, str]:
    """The children's environment: the chosen GPU as their only (cuda:0), or no GPU at all."""
    env = {"WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if device.type == "cpu":  # accelerate (fine-tuning, audit) would otherwise take a visible GPU
        env.update(ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="")
    elif device.type == "cuda" and device.index is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(device.index)
    return env


def run_stage(name: str, spec: dict, work: Path, device: torch.device) -> dict:
    """Run one stage in a child; its result with wall seconds (log: WORK/NAME.log). A failed
    stage is a one-line error quoting its log's last line."""
    spec_path, result_path, log = work / f"{name}.spec.json", work / f"{name}.result.json", work / f"{name}.log"
    write_json(spec_path, spec)
    argv = [sys.executable, "-m", "memtrain.bench.gpu_check", name, str(spec_path), str(result_path)]
    return _run(name, argv, log, device, result_path)


def _run(name: str, argv: list[str], log: Path, device: torch.device, result_path: Path | None = None) -> dict:
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, env={**os.environ, **child_env(device)}, stdout=out,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        lines = log.read_text().strip().splitlines() or ["no output"]
        raise MemtrainError(f"gpu_check stage '{name}' failed: {lines[-1][:300]} (log: {log})")
    result = json.loads(result_path.read_text()) if result_path else {}
    return {**result, "wall_seconds": round(seconds, 1), "child_peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)}


def _finite(value: float, digits: int = 4) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MemtrainError(f"gpu_check measured a non-finite figure ({value!r}): see the stage logs")
    return round(float(value), digits)


# ----------------------------------------------------------------------------- the whole check


def gpu_check(output_dir: str | Path, options: RuntimeOptions, budget: CheckBudget, fixture: str | Path | None = None,
              overwrite: bool = False, keep_work: bool = False) -> dict:
    """Build the fixture, run every stage, write OUT/gpu_check.json (and OUT/logs/); the document.

    Nothing is written when a flag is wrong: the device and dtype are resolved first. The fixture
    (4 GB at any resolution: SD's weights) is built in scratch and deleted unless `keep_work`."""
    runtime = resolve_runtime(options)
    if fixture is not None and not (Path(fixture) / "model_index.json").is_file():
        raise MemtrainError(f"--fixture '{fixture}' is not a built fixture folder (no model_index.json)")
    device, dtype = runtime.device, runtime.dtype_name
    child_device = "cpu" if device.type == "cpu" else "cuda"  # children see the chosen GPU as cuda:0
    started = time.perf_counter()
    with StagedOutput(output_dir, overwrite) as out:
        work, logs = out / "work", out / "logs"
        work.mkdir()
        logs.mkdir()
        model, photos = Path(fixture) if fixture else work / f"sd14-{budget.resolution}", work / "photos"
        stages: dict[str, dict] = {}
        if fixture is None:
            build = [sys.executable, "-m", "memtrain", "build-fixture", "sd14", str(model),
                     "--resolution", str(budget.resolution), "--photos", str(photos)]
            stages["build"] = _run("build", build, logs / "build.log", device)
        else:
            write_photo_manifests(photos)
        base = {"device": child_device, "dtype": dtype, "model": str(model),
                "manifest": str(photos / "memorized.jsonl"), "budget": dataclasses.asdict(budget)}
        stages["speed"] = run_stage("speed", base, logs, device)
        if budget.finetune_steps > 0:
            stages["finetune"] = run_stage("finetune", {**base, "output_dir": str(work / "finetune")}, logs, device)
        if budget.removal_steps > 0:
            stages["removal"] = run_stage("removal", {**base, "output_dir": str(work / "removal")}, logs, device)
        argv = audit_argv(model, photos, work / "audit", child_device, dtype, budget)
        stages["audit"] = run_stage("audit", {**base, "argv": argv}, logs, device)
        doc = summarize(runtime, budget, stages, time.perf_counter() - started)
        if not keep_work:
            shutil.rmtree(work)
        write_json(out / "gpu_check.json", versioned(doc))
    return doc


def summarize(runtime, budget: CheckBudget, stages: dict[str, dict], seconds: float) -> dict:
    """gpu_check.json: the issue's keys first, each stage's full figures under `details`."""
    gen, att = stages["speed"]["generation"], stages["speed"]["attack"]
    ft, audit = stages.get("finetune"), stages["audit"]
    name = torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else \
        f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    doc = {
        "device": {"name": name, "device": str(runtime.device), "dtype": runtime.dtype_name,
                   "torch": torch.__version__, "cuda": torch.version.cuda},
        "generation": {"images_per_s": _finite(gen["memtrain_images_per_s"]),
                       "pipeline_images_per_s": _finite(gen["pipeline_images_per_s"]),
                       "ratio": _finite(gen["ratio"], 3), "images": gen["images"], "resolution": gen["resolution"],
                       "sampler": gen["sampler"], "peak_memory_gb": gen["peak_memory_gb"]},
        "attack": {"tflops": _finite(att["step_tflops_per_s"], 6), "matmul_tflops": _finite(att["matmul_tflops_per_s"], 6),
                   "fraction": _finite(att["fraction_of_matmul"]), "matmul": att["matmul"],
                   "targets_per_s": _finite(att["targets_per_s"], 6), "targets": att["targets"], "steps": att["steps"],
                   "noise_samples": att["noise_samples"], "peak_memory_gb": att["peak_memory_gb"]},
        "finetune": None if ft is None else {
            "seconds_per_image": _finite(ft["seconds_per_image"]), "peak_memory_gb": _finite(ft["peak_memory_gb"], 3),
            "peak_memory_gb_per_image": _finite(ft["peak_memory_gb_per_image"], 3), "finetune": ft["finetune"],
            "steps": ft["steps"], "images_per_step": ft["images_per_step"], "mixed_precision": ft["mixed_precision"],
            "gradient_checkpointing": ft["gradient_checkpointing"]},
        "removal": None if "removal" not in stages else {
            m: {k: _finite(v, 4) for k, v in fig.items()} for m, fig in stages["removal"].items()
            if isinstance(fig, dict)},
        "audit": {"seconds": _finite(audit["seconds"], 1), "peak_memory_gb": _finite(audit["peak_memory_gb"], 3),
                  "mitigations": audit["mitigations"], "targets": budget.audit_targets, "seeds": budget.audit_seeds,
                  "dtype": audit["dtype"], "device": audit["device"], "rows": audit["rows"]},
        "metrics": {name: {"placement": m["placement"], "images_per_s": _finite(m["images_per_s"], 3)}
                    for name, m in stages["speed"]["metrics"].items() if isinstance(m, dict)},
        "goals": GOALS,
        "met": {"generation_ratio": gen["ratio"] >= GOALS["generation_ratio"],
                "attack_fraction_of_matmul": att["fraction_of_matmul"] >= GOALS["attack_fraction_of_matmul"],
                "wall_seconds": seconds <= GOALS["wall_seconds_on_h100"]},
        "peak_memory": "CUDA max allocated bytes per stage" if runtime.device.type == "cuda" else
                       "peak resident set of each stage's process (weights included)",
        "budget": dataclasses.asdict(budget),
        "wall_seconds": round(seconds, 1),
        "stage_wall_seconds": {k: v["wall_seconds"] for k, v in stages.items()},
    }
    return doc


def format_check(doc: dict) -> str:
    """The lines the command prints; the last is `ratio:`."""
    g, a, f, au = doc["generation"], doc["attack"], doc["finetune"], doc["audit"]
    lines = [f"device: {doc['device']['name']} ({doc['device']['device']}, {doc['device']['dtype']}), "
             f"{g['resolution']} px, {doc['wall_seconds']:.0f} s in all",
             f"generation: {g['images_per_s']:.3f} images/s, diffusers pipeline {g['pipeline_images_per_s']:.3f} "
             f"images/s ({g['images']} images, {g['sampler']['num_inference_steps']} steps; goal ratio >= "
             f"{GOALS['generation_ratio']})",
             f"attack: {a['tflops']:.3f} TFLOP/s = {100 * a['fraction']:.0f}% of a {a['matmul']} matmul "
             f"({a['matmul_tflops']:.3f} TFLOP/s; goal >= {100 * GOALS['attack_fraction_of_matmul']:.0f}%)"]
    if f is not None:
        lines.append(f"finetune ({f['finetune']}, mixed precision {f['mixed_precision']}): {f['seconds_per_image']:.3f} "
                     f"s/image, peak memory {f['peak_memory_gb']:.2f} GB ({f['peak_memory_gb_per_image']:.2f} GB/image)")
    if doc.get("removal"):
        lines.append("removal (s/step, peak memory): " + ", ".join(
            f"{m} {r['seconds_per_step']:.2f} s, {r['peak_memory_gb']:.2f} GB" for m, r in doc["removal"].items()))
    lines += [f"{name}: {m['images_per_s']:.2f} images/s on {m['placement']}" for name, m in doc["metrics"].items()]
    lines += [f"audit ({' '.join(au['mitigations'])}, {au['targets']} targets x {au['seeds']} seeds, {au['dtype']}): "
              f"{au['seconds']:.1f} s, peak memory {au['peak_memory_gb']:.2f} GB",
              f"ratio: {g['ratio']:.2f}"]
    return "\n".join(lines)


def _child_main(argv: list[str]) -> None:
    name, spec_path, result_path = argv
    result = STAGES[name](json.loads(Path(spec_path).read_text()))
    write_json(result_path, result)


if __name__ == "__main__":
    from memtrain.core.cli import run_main

    run_main(_child_main)(sys.argv[1:])
