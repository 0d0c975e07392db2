"""Targets per second of the Dori attack, batched vs one target at a time, in one run, and
the attack step's achieved FLOP/s against a 2048x2048 fp32 matmul on the same machine.

    python scripts/bench_attack.py [--model DIR] [--targets 10] [--steps 50] [--noise_samples 8]

Default model: the cached testbed (targets: its memorized manifest). The last line is
`speedup: X.XX` (one-at-a-time seconds / batched seconds).
"""

import argparse

from memtrain.cli import run_main


@run_main
def main(argv=None) -> None:
    import torch

    from memtrain.attack import AttackConfig
    from memtrain.bench import bench_attack, bench_targets, format_attack_bench, resolve_attack_model
    from memtrain.errors import MemtrainError
    from memtrain.models import load_bundle

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="diffusers SD folder or testbed folder; default: the cached testbed")
    p.add_argument("--manifest", help="targets (default: the testbed's memorized manifest)")
    p.add_argument("--targets", type=int, default=10, help="number of targets (the manifest is cycled)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--noise_samples", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--max_batch", type=int, default=64, help="U-Net rows per forward in the batched run")
    p.add_argument("--repeats", type=int, default=1, help="alternate the two runs this often, keep each's best")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)

    if args.targets < 1:
        raise MemtrainError("--targets must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = AttackConfig(steps=args.steps, lr=args.lr, noise_samples=args.noise_samples,
                          max_batch=args.max_batch)
    model_dir = resolve_attack_model(args.model)
    bundle = load_bundle(model_dir, device=args.device)
    latents, prompts, source = bench_targets(bundle, model_dir, args.targets, args.manifest)
    print(f"targets: {source}")
    print(format_attack_bench(bench_attack(bundle, latents, prompts, config, args.repeats), str(model_dir)))


if __name__ == "__main__":
    main()
