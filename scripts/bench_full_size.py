"""Speed and memory at full size in one run: generation against diffusers' pipeline (`ratio:`),
the attack's targets/s and TFLOP/s against a large matmul, fine-tuning s/image and peak memory.
    python scripts/bench_full_size.py --model fixtures/sd14-256 --manifest fixtures/photos/memorized.jsonl \\
        [--prompts 2 --seeds 2 --steps 4 --attack_targets 2 --attack_steps 2] [--finetune_steps 2] [key=value ...]
Budgets: --prompts/--seeds/--steps, --attack_targets/--attack_steps/--noise_samples, --finetune_steps (0 skips
it); --device/--dtype/--max_memory; key=value: recipes/sd14.yaml overrides (utility: the manifest's held_out.jsonl).
"""

import argparse
from pathlib import Path

from memtrain.attack import AttackConfig
from memtrain.core.bundle import load_for_runtime
from memtrain.core.cli import run_main
from memtrain.core.runtime import add_runtime_arguments, resolve_runtime, runtime_options_from
from memtrain.core.sampling import SamplerOverrides
from memtrain.bench.attack_sampling import bench_prompts
from memtrain.bench.full_size import (bench_full_attack, bench_full_finetune, bench_generation,
                                            finetune_recipe, format_full_size, precision_overrides)
from memtrain.train.trainer import AdvFinetuner

SD_RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "sd14.yaml")


@run_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True), p.add_argument("--manifest", required=True, help="memorized pairs")
    for name in ("prompts", "seeds", "attack_targets", "attack_steps", "noise_samples", "finetune_steps", "steps"):
        p.add_argument(f"--{name}", type=int, default=4 if name == "steps" else 2)
    p.add_argument("--output_dir", default="runs/bench_full_size", help="scratch folder of the fine-tuning part")
    p.add_argument("overrides", nargs="*")  # recipe keys of the fine-tuning part
    add_runtime_arguments(p)
    a = p.parse_args(argv)
    bundle = load_for_runtime(a.model, runtime := resolve_runtime(runtime_options_from(vars(a))))
    settings = bundle.sampler_settings.with_overrides(SamplerOverrides(num_inference_steps=a.steps))
    gen = bench_generation(bundle, bench_prompts(a.manifest, a.prompts, a.seeds, 1), list(range(a.seeds)), settings)
    att = bench_full_attack(bundle, a.manifest, a.attack_targets,
                            AttackConfig(steps=a.attack_steps, noise_samples=a.noise_samples, lr=0.1))
    device, ft = str(bundle.device), None
    del bundle  # the fine-tuning part loads its own copy
    if a.finetune_steps > 0:
        overrides = [*precision_overrides(runtime.dtype_name), *a.overrides]  # the bench's precision; key=value wins
        recipe = finetune_recipe(SD_RECIPE, a.model, a.manifest, a.output_dir, overrides)
        ft = bench_full_finetune(AdvFinetuner(recipe), a.finetune_steps)
    print(format_full_size(a.model, device, gen, att, ft))


if __name__ == "__main__":
    main()
