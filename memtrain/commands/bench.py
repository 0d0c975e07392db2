"""`memtrain bench BENCHMARK`: speed and memory benchmarks, each comparison measured in one run.

    memtrain bench attack [--model DIR] [--targets 10] [--steps 50] [--noise_samples 8]
    memtrain bench sampling [--model DIR] [--prompts 16] [--seeds 1] [--batch 16]
    memtrain bench mitigations [--model DIR] [--prompts 8] [--seeds 2] [--repeats 3]
    OMP_NUM_THREADS=1 memtrain bench finetune recipes/testbed.yaml output_dir=/tmp/bench_ft
    memtrain bench full-size --model fixtures/sd14-256 --manifest fixtures/photos/memorized.jsonl
    memtrain bench removal [--model DIR --manifest M] [--steps 2] [--table_recipe recipes/removal_testbed.yaml]

`memtrain bench BENCHMARK --help`: its flags and defaults. The measuring code is memtrain.bench's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from memtrain.attack import AttackConfig
from memtrain.bench.attack_sampling import (bench_attack, bench_mitigation_overhead, bench_prompts, bench_sampling,
                                            bench_targets, format_attack_bench, format_sampling_bench)
from memtrain.bench.finetune import bench_finetune, bench_speedups
from memtrain.bench.removal import bench_removal, format_removal_bench
from memtrain.bench.gpu_check import GpuCheckConfig, format_check, gpu_check
from memtrain.bench.full_size import (bench_full_attack, bench_full_finetune, bench_generation, finetune_recipe,
                                      format_full_size, precision_overrides)
from memtrain.commands.base import Command, Dispatcher
from memtrain.core.bundle import load_for_runtime
from memtrain.core.cli import option, section
from memtrain.core.command_line import CommandLine
from memtrain.core.config import packaged_recipe
from memtrain.core.errors import MemtrainError
from memtrain.core.options import ModelOptions
from memtrain.core.registry import Registry
from memtrain.core.report import CommandResult
from memtrain.core.runtime import resolve_runtime
from memtrain.core.sampling import SamplerOverrides
from memtrain.mitigations import available_mitigations, get_mitigation
from memtrain.testbed.resolver import resolve_model, resolve_recipe
from memtrain.train.recipe import Recipe
from memtrain.train.removal import REMOVAL_METHODS
from memtrain.train.trainer import AdvFinetuner

NOT_FLAGS = ("lora", "plan")  # the benchmarks time the model as given and plan nothing


def show_message(result: CommandResult) -> str:
    return result.message


# ----------------------------------------------------------------------------- attack

ATTACK = """Targets per second of the Dori attack, batched vs one target at a time, in one run, and
the attack step's achieved FLOP/s against a 2048x2048 fp32 matmul on the same machine.

    memtrain bench attack [--model DIR] [--targets 10] [--steps 50] [--noise_samples 8]

Default model: the cached testbed (targets: its memorized manifest). The last line is
`speedup: X.XX` (one-at-a-time seconds / batched seconds). Attack flags are AttackConfig's.
"""


@dataclass(kw_only=True)
class AttackBenchConfig(ModelOptions):
    """`memtrain bench attack`'s config."""

    manifest: str | None = option(None, "targets (default: the model's memorized manifest)")
    targets: int = option(10, "number of targets (the manifest is cycled)")
    repeats: int = option(1, "alternate the two runs this often, keep each's best")
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)")
    attack: AttackConfig = section(AttackConfig, "the Dori attack", flat=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.targets < 1:
            raise MemtrainError("--targets must be >= 1")


def bench_model(config: ModelOptions):
    """(the model's defaults, its bundle on the runtime): the device and dtype are checked first,
    so bad flags fail before a testbed build."""
    runtime = resolve_runtime(config.runtime)
    defaults = resolve_model(config.model)
    return defaults, load_for_runtime(defaults.model_dir, runtime)


def run_attack(config: AttackBenchConfig, line: CommandLine | None = None) -> CommandResult:
    if config.threads:
        torch.set_num_threads(config.threads)
    defaults, bundle = bench_model(config)
    latents, prompts, source = bench_targets(bundle, config.targets, config.manifest or defaults.manifest("memorized"))
    print(f"targets: {source}", flush=True)
    r = bench_attack(bundle, latents, prompts, config.attack, config.repeats)
    return CommandResult(r, message=format_attack_bench(r, defaults.model_dir))


# ----------------------------------------------------------------------------- sampling

SAMPLING = """Images per second of plain CFG sampling, batched vs one prompt at a time, in one run.

    memtrain bench sampling [--model DIR] [--prompts 16] [--seeds 1] [--batch 16]

Default model: the cached testbed (its memorized prompts, its sampler); sampler overrides are
SamplerOverrides' flags. The last line is `speedup: X.XX` (one-at-a-time / batched seconds).
"""


@dataclass(kw_only=True)
class SamplingBenchConfig(ModelOptions):
    """`memtrain bench sampling`'s config."""

    manifest: str | None = option(None, "prompts to sample (default: the model's memorized manifest, else generic "
                                        "ones)")
    prompts: int = option(16, "number of prompts")
    seeds: int = option(1, "seeds per prompt")
    batch: int = option(16, "images per batch in the batched run")
    sampler: SamplerOverrides = section(SamplerOverrides, "changes to the model's sampler", flat=True)


def run_sampling(config: SamplingBenchConfig, line: CommandLine | None = None) -> CommandResult:
    defaults, bundle = bench_model(config)
    texts = bench_prompts(config.manifest or defaults.manifest("memorized"), config.prompts, config.seeds, config.batch)
    settings = bundle.sampler_settings.with_overrides(config.sampler)
    r = bench_sampling(bundle, texts, list(range(config.seeds)), settings, batch_size=config.batch)
    return CommandResult(r, message=format_sampling_bench(r, defaults.model_dir, config.prompts, config.seeds))


# ----------------------------------------------------------------------------- mitigations

MITIGATIONS = """Overhead of each inference-time mitigation over plain sampling, measured in one run.

    memtrain bench mitigations [--model DIR] [--prompts 8] [--seeds 2] [--repeats 3]

Default model: the cached testbed (its memorized prompts, its sampler). One line per mitigation,
`<name>: X.XXX` (mitigated / plain seconds, median of interleaved repeats); the last line is
`max_overhead: X.XXX`, over those held to the target of at most 1.05 (all but the ones that
optimize at generation time by design, Wen et al.'s, whose ratio is printed and marked).
"""


@dataclass(kw_only=True)
class MitigationsBenchConfig(ModelOptions):
    """`memtrain bench mitigations`' config."""

    prompts: int = option(8, "number of prompts")
    seeds: int = option(2, "seeds per prompt")
    repeats: int = option(3, "interleaved timing repeats")
    sampler: SamplerOverrides = section(SamplerOverrides, "changes to the model's sampler", flat=True)


def run_mitigations(config: MitigationsBenchConfig, line: CommandLine | None = None) -> CommandResult:
    defaults, bundle = bench_model(config)
    prompts = bench_prompts(defaults.manifest("memorized"), config.prompts, 1, config.prompts)
    mitigations = [get_mitigation(n) for n in available_mitigations()]
    mitigations = [m for m in mitigations if m.inference_time]
    ratios = bench_mitigation_overhead(bundle, prompts, list(range(config.seeds)),
                                       bundle.sampler_settings.with_overrides(config.sampler), mitigations,
                                       config.repeats)
    by_design = [m.name for m in mitigations if m.optimizes_at_generation]
    return CommandResult({"ratios": ratios, "optimizes_by_design": by_design})


def show_mitigations(result: CommandResult) -> str:
    ratios, by_design = result.report["ratios"], set(result.report["optimizes_by_design"])
    marked = " (optimizes by design: reported, not held to the target)"
    lines = [f"{name}: {ratio:.3f}" + (marked if name in by_design else "") for name, ratio in ratios.items()]
    held = [r for n, r in ratios.items() if n not in by_design]
    return "\n".join([*lines, f"max_overhead: {max(held):.3f}"])


# ----------------------------------------------------------------------------- finetune

FINETUNE = """Adversarial fine-tuning speed: concatenated forward vs two forwards, and the trainer's speedups.

    OMP_NUM_THREADS=1 memtrain bench finetune recipes/testbed.yaml output_dir=/tmp/bench_ft

Sets up the trainer from a recipe (surrogates are generated or reused from output_dir), fixes
y_adv to the prompt embedding, times `--steps` optimizer steps per mode after `--warmup` steps
and prints samples/s and their ratio. Then times `--steps` full steps (crafting y_adv every
updates_per_embedding steps) plus one per-epoch audit on a fresh trainer with speedups=False and
one with speedups=True, and prints the seconds of each and the "speedup" ratio. RECIPE.yaml,
key=value and the recipe's flags are `memtrain finetune`'s.
"""

BENCH_KEYS = ("steps", "warmup")


@dataclass(kw_only=True)
class FinetuneBenchConfig(Recipe):
    """`memtrain bench finetune`'s config: a fine-tuning recipe and the benchmark's budget."""

    steps: int = option(10, "optimizer steps timed per mode")
    warmup: int = option(2, "untimed steps before them")


def run_finetune(config: FinetuneBenchConfig, line: CommandLine) -> CommandResult:
    """The recipe without the benchmark's own keys, resolved as `memtrain finetune` resolves it."""
    values = {k: v for k, v in line.values.items() if k not in BENCH_KEYS}
    recipe, defaults = resolve_recipe(dataclasses.replace(line, values=values).config(Recipe))
    print(bench_finetune(AdvFinetuner(recipe, defaults=defaults), config.steps, config.warmup), flush=True)
    return CommandResult({}, message=bench_speedups(recipe, defaults, config.steps))


# ----------------------------------------------------------------------------- full size

FULL_SIZE = """Speed and memory at full size in one run: generation against diffusers' pipeline (`ratio:`),
the attack's targets/s and TFLOP/s against a large matmul, fine-tuning s/image and peak memory.

    memtrain bench full-size --model fixtures/sd14-256 --manifest fixtures/photos/memorized.jsonl \\
        [--prompts 2 --seeds 2 --steps 4 --attack_targets 2 --attack_steps 2] [--finetune_steps 2] [key=value ...]

Budgets: --prompts/--seeds/--steps, --attack_targets/--attack_steps/--noise_samples, --finetune_steps (0 skips
it); --device/--dtype/--max_memory; key=value: the packaged sd14.yaml recipe's keys for the fine-tuning part
(utility: the manifest's held_out.jsonl).
"""


@dataclass(kw_only=True)
class FullSizeBenchConfig(ModelOptions):
    """`memtrain bench full-size`'s config."""

    manifest: str | None = option(None, "memorized pairs (required)")
    prompts: int = option(2, "prompts of the generation part")
    seeds: int = option(2, "seeds per prompt of the generation part")
    steps: int = option(4, "sampling steps of the generation part")
    attack_targets: int = option(2, "targets of the attack part")
    attack_steps: int = option(2, "attack steps")
    noise_samples: int = option(2, "the attack's (eps, t) draws per target and step")
    finetune_steps: int = option(2, "fine-tuning steps timed (0 skips the fine-tuning part)")
    output_dir: str = option("runs/bench_full_size", "scratch folder of the fine-tuning part")
    finetune_overrides: list[str] = dataclasses.field(default_factory=list)  # key=value of the fine-tuning recipe

    def __post_init__(self) -> None:
        super().__post_init__()
        missing = [f"--{k}" for k in ("model", "manifest") if not getattr(self, k)]
        if missing:
            raise MemtrainError(f"{' and '.join(missing)} required: the full-size model folder and its memorized "
                                "manifest (e.g. memtrain build-fixture sd14 DIR --photos DIR)")


def run_full_size(config: FullSizeBenchConfig, line: CommandLine | None = None) -> CommandResult:
    bundle = load_for_runtime(config.model, runtime := resolve_runtime(config.runtime))
    settings = bundle.sampler_settings.with_overrides(SamplerOverrides(num_inference_steps=config.steps))
    seeds = list(range(config.seeds))
    gen = bench_generation(bundle, bench_prompts(config.manifest, config.prompts, config.seeds, 1), seeds, settings)
    att = bench_full_attack(bundle, config.manifest, config.attack_targets,
                            AttackConfig(steps=config.attack_steps, noise_samples=config.noise_samples, lr=0.1))
    device, ft = str(bundle.device), None
    del bundle  # the fine-tuning part loads its own copy
    if config.finetune_steps > 0:  # the bench's precision; key=value wins
        overrides = [*precision_overrides(runtime.dtype_name), *config.finetune_overrides]
        recipe = finetune_recipe(str(packaged_recipe("sd14.yaml")), config.model, config.manifest, config.output_dir,
                                 overrides)
        ft = bench_full_finetune(AdvFinetuner(recipe), config.finetune_steps)
    report = {"generation": gen, "attack": att, "finetune": ft}
    return CommandResult(report, message=format_full_size(config.model, device, gen, att, ft))


# ----------------------------------------------------------------------------- removal

REMOVAL = """Time and peak memory of each removal training (ESD, Concept Ablation, SISS) per memorized
image, measured in one run, and a removal table recipe's whole budget projected from it.

    memtrain bench removal --manifest fixtures/photos/memorized.jsonl --model fixtures/sd14-256 [--steps 2]
    memtrain bench removal [--table_recipe recipes/removal_testbed.yaml]      # the testbed

Each method runs its preparation (SISS's generations, Concept Ablation's anchor images: 4 per item)
and --steps optimizer steps at the recipe's settings (default: removal_sd14.yaml, paper 004's);
the memorized images are the model's own generations (see memtrain.bench.removal). Writes
OUT/removal_bench.json.
"""


@dataclass(kw_only=True)
class RemovalBenchConfig(ModelOptions):
    """`memtrain bench removal`'s config."""

    manifest: str | None = option(None, "prompts to remove (default: the model's memorized manifest)")
    methods: list[str] | None = option(None, "removal methods (default: esd concept_ablation siss)", "--method")
    items: int = option(1, "memorized items per method")
    steps: int = option(2, "optimizer steps timed per method (the recipe's batch and accumulation)")
    table_recipe: str | None = option(None, "the removal table recipe whose settings run and whose budget is "
                                             "projected (default: the packaged removal_sd14.yaml)")
    seed: int = option(0, "the runs' seed")
    output_dir: str = option("runs/bench_removal", "scratch folder (the trained models, removal_bench.json)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.items < 1 or self.steps < 1:
            raise MemtrainError(f"--items and --steps must be >= 1, got {self.items} and {self.steps}")
        unknown = [m for m in self.methods or [] if m not in REMOVAL_METHODS]
        if unknown:
            raise MemtrainError(f"--method {unknown[0]}: not a removal method ({', '.join(REMOVAL_METHODS.names())})")


def run_removal(config: RemovalBenchConfig, line: CommandLine | None = None) -> CommandResult:
    defaults = resolve_model(config.model)
    manifest = config.manifest or defaults.manifest("memorized")
    if manifest is None:
        raise MemtrainError(f"--manifest required: the model '{config.model}' brings no memorized manifest")
    doc = bench_removal(defaults.model_dir, str(manifest), config.output_dir, config.methods, config.items,
                        config.steps, config.seed, config.table_recipe)
    return CommandResult(doc, Path(config.output_dir), message=format_removal_bench(doc))


# ----------------------------------------------------------------------------- the dispatcher

BENCHES = Registry("benchmark", canonical=str)
BENCHES.add("attack", Command("bench attack", ATTACK, AttackBenchConfig, run_attack, show_message, skip=NOT_FLAGS))
BENCHES.add("sampling", Command("bench sampling", SAMPLING, SamplingBenchConfig, run_sampling, show_message,
                                skip=NOT_FLAGS))
BENCHES.add("mitigations", Command("bench mitigations", MITIGATIONS, MitigationsBenchConfig, run_mitigations,
                                   show_mitigations, skip=NOT_FLAGS))
BENCHES.add("finetune", Command("bench finetune", FINETUNE, FinetuneBenchConfig, run_finetune, show_message,
                                recipe="required"))
BENCHES.add("full-size", Command("bench full-size", FULL_SIZE, FullSizeBenchConfig, run_full_size, show_message,
                                 recipe="none", skip=(*NOT_FLAGS, "finetune_overrides"),
                                 overrides_to="finetune_overrides"))
BENCHES.add("removal", Command("bench removal", REMOVAL, RemovalBenchConfig, run_removal, show_message, recipe="none",
                               skip=NOT_FLAGS))

SUMMARIES = {  # one line each for `memtrain bench --help`
    "attack": "Dori attack targets/s, batched vs one target at a time, and its FLOP/s (`speedup:`)",
    "sampling": "sampling images/s, batched vs one prompt at a time (`speedup:`)",
    "mitigations": "each inference-time mitigation's time over plain sampling (`max_overhead:`)",
    "finetune": "fine-tuning: concatenated vs two forwards, the trainer with vs without its speedups",
    "full-size": "generation vs diffusers' pipeline (`ratio:`), attack TFLOP/s, fine-tuning s/image and memory",
    "removal": "ESD, Concept Ablation and SISS: s/step, preparation per image, peak memory, the recipe's budget projected",
}

BENCH = Dispatcher("memtrain bench", "Speed and memory benchmarks, each comparison measured in one run.",
                   BENCHES, SUMMARIES)


def run_gpu_check(config: GpuCheckConfig, line: CommandLine | None = None) -> CommandResult:
    doc = gpu_check(config.output_dir, config.runtime, config.budget, config.fixture, config.overwrite,
                    config.keep_work)
    return CommandResult(doc, Path(config.output_dir))


def show_gpu_check(result: CommandResult) -> str:
    return f"{format_check(result.report)}\nwrote {result.output_dir}/gpu_check.json"


GPU_CHECK_DOC = """One prepared GPU check: on one CUDA GPU and no network, build the SD v1.4-shaped random-weight
fixture at 512 px and measure, in one run, generation against diffusers' pipeline (`ratio:`),
the attack's TFLOP/s against a large matmul, adversarial fine-tuning s/image and peak memory,
and a small audit (none pad_mask nemo, 4 targets x 4 seeds) in half precision. Writes
OUT/gpu_check.json (and OUT/logs/); see docs/gpu.md.

    python scripts/gpu_check.py --output_dir runs/gpu_check            # GPU: bf16 (fp16 without bf16)
    python scripts/gpu_check.py --device cpu --resolution 64 --output_dir OUT \\
        --steps 2 --attack_steps 1 --noise_samples 1 --finetune lora --finetune_steps 1 ...   # CPU try-out

The fixture (4 GB: SD's weights at any resolution) is built in OUT's scratch and deleted at the
end (--keep_work keeps it, --fixture DIR reuses a built one). Goals on an H100: ratio >= 1.3,
attack >= 40% of the matmul, all of it under 8 minutes.
"""

# scripts/gpu_check.py: the prepared check for a lent GPU (a script, not a `memtrain` command)
GPU_CHECK = Command("gpu_check", GPU_CHECK_DOC, GpuCheckConfig, run_gpu_check, show_gpu_check, recipe="none")
