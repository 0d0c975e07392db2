"""Images per second of plain CFG sampling, batched vs one prompt at a time, in one run.

    python scripts/bench_sampling.py [--model DIR] [--prompts 16] [--seeds 1] [--batch 16]

Default model: the cached testbed (its memorized prompts, its sampler); sampler overrides are
SamplerOverrides' flags. The last line is `speedup: X.XX` (one-at-a-time / batched seconds).
"""

import argparse

from memtrain.core.bundle import load_for_runtime
from memtrain.core.cli import config_from_cli, run_main
from memtrain.core.runtime import add_runtime_arguments, resolve_runtime, runtime_options_from
from memtrain.core.sampling import SamplerOverrides
from memtrain.bench.attack_sampling import bench_prompts, bench_sampling, format_sampling_bench
from memtrain.testbed.resolver import resolve_model


def flags(p: argparse.ArgumentParser) -> None:
    add_runtime_arguments(p)
    p.add_argument("--model", help="diffusers SD folder or hub id (or a testbed folder); default: the cached testbed")
    p.add_argument("--manifest", help="prompts to sample (default: the model's memorized manifest, else generic ones)")
    p.add_argument("--prompts", type=int, default=16, help="number of prompts")
    p.add_argument("--seeds", type=int, default=1, help="seeds per prompt")
    p.add_argument("--batch", type=int, default=16, help="images per batch in the batched run")


@run_main
def main(argv=None) -> None:
    overrides, args = config_from_cli(SamplerOverrides, __doc__, argv, extra=flags)
    runtime = resolve_runtime(runtime_options_from(args))  # bad flags fail before a testbed build
    defaults = resolve_model(args.get("model"))
    bundle = load_for_runtime(defaults.model_dir, runtime)
    texts = bench_prompts(args.get("manifest") or defaults.manifest("memorized"), args["prompts"], args["seeds"],
                          args["batch"])
    settings = bundle.sampler_settings.with_overrides(overrides)
    r = bench_sampling(bundle, texts, list(range(args["seeds"])), settings, batch_size=args["batch"])
    print(format_sampling_bench(r, defaults.model_dir, args["prompts"], args["seeds"]))


if __name__ == "__main__":
    main()
