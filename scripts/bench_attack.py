"""Targets per second of the Dori attack, batched vs one target at a time, in one run, and
the attack step's achieved FLOP/s against a 2048x2048 fp32 matmul on the same machine.

    python scripts/bench_attack.py [--model DIR] [--targets 10] [--steps 50] [--noise_samples 8]

Default model: the cached testbed (targets: its memorized manifest). The last line is
`speedup: X.XX` (one-at-a-time seconds / batched seconds). Attack flags are AttackConfig's.
"""

import argparse

import torch

from memtrain.attack import AttackConfig
from memtrain.core.bundle import load_for_runtime
from memtrain.core.cli import config_from_cli, run_main
from memtrain.core.errors import MemtrainError
from memtrain.core.runtime import add_runtime_arguments, resolve_runtime, runtime_options_from
from memtrain.bench.attack_sampling import bench_attack, bench_targets, format_attack_bench
from memtrain.testbed.resolver import resolve_model


def flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="diffusers SD folder or testbed folder; default: the cached testbed")
    p.add_argument("--manifest", help="targets (default: the model's memorized manifest)")
    p.add_argument("--targets", type=int, default=10, help="number of targets (the manifest is cycled)")
    p.add_argument("--repeats", type=int, default=1, help="alternate the two runs this often, keep each's best")
    add_runtime_arguments(p)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


@run_main
def main(argv=None) -> None:
    config, args = config_from_cli(AttackConfig, __doc__, argv, extra=flags)
    if args["targets"] < 1:
        raise MemtrainError("--targets must be >= 1")
    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    runtime = resolve_runtime(runtime_options_from(args))  # bad flags fail before a testbed build
    defaults = resolve_model(args.get("model"))
    bundle = load_for_runtime(defaults.model_dir, runtime)
    latents, prompts, source = bench_targets(bundle, args["targets"], args.get("manifest") or defaults.manifest("memorized"))
    print(f"targets: {source}")
    print(format_attack_bench(bench_attack(bundle, latents, prompts, config, args["repeats"]), defaults.model_dir))


if __name__ == "__main__":
    main()
