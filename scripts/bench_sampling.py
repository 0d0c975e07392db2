"""Images per second of plain CFG sampling, batched vs one prompt at a time, in one run.

    python scripts/bench_sampling.py [--model DIR] [--prompts 16] [--seeds 1] [--batch_size 16]

Default model: the cached testbed (its memorized prompts, its sampler). The last line is
`speedup: X.XX` (one-at-a-time seconds / batched seconds).
"""

import argparse

from memtrain.cli import run_main


@run_main
def main(argv=None) -> None:
    from memtrain.evaluate import bench_main

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="diffusers SD folder or hub id (or a testbed folder); default: the cached testbed")
    p.add_argument("--manifest", help="prompts to sample (default: the testbed's memorized manifest, else generic prompts)")
    p.add_argument("--prompts", type=int, default=16, help="number of prompts")
    p.add_argument("--seeds", type=int, default=1, help="seeds per prompt (each prompt-seed image is one call in the one-at-a-time run)")
    p.add_argument("--batch_size", type=int, default=16, help="images per batch in the batched run")
    p.add_argument("--steps", type=int, help="override the model's default number of steps")
    p.add_argument("--guidance_scale", type=float, help="override the model's default guidance")
    p.add_argument("--scheduler", help="override the model's default scheduler")
    args = p.parse_args(argv)
    print(bench_main(**vars(args)))


if __name__ == "__main__":
    main()
