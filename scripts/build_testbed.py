"""Build (or reuse) the memorizing testbed and print its memorization card.

    python scripts/build_testbed.py [--output_dir OUT] [--seed N] [--data_dir DIR]
    python scripts/build_testbed.py --variant planted [--base TESTBED] [--output_dir OUT]

--variant planted: memorization planted in a recorded set of cross-attention value neurons of the
testbed's reference model (memtrain/testbed/planted.py), cached beside the base testbed.
"""

import argparse
import json
from pathlib import Path

from memtrain.core.cli import run_main
from memtrain.core.errors import MemtrainError
from memtrain.testbed.build import build_or_reuse, card_summary, default_testbed_dir
from memtrain.testbed.planted import PlantedConfig, build_planted, planted_dir


@run_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", help="build here (default: the cache, reused when already built)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", help="imagefolder with metadata.jsonl (file_name, text, optional duplicate)")
    parser.add_argument("--duplicate_spec", help='JSON {"id": K, ...} setting duplication by pair id')
    parser.add_argument("--metric", default=None, help="SSCD backend: onnx (default), a TorchScript path, or standin")
    parser.add_argument("--allow_standin", action="store_true", help="permit the named stand-in descriptor")
    parser.add_argument("--device", default="cpu", help="train the U-Net and measure the card here, e.g. cuda "
                        "(default cpu: the reproducible build the README's figures come from)")
    parser.add_argument("--variant", choices=["default", "planted"], default="default",
                        help="planted: the ground-truth variant for localization methods")
    parser.add_argument("--base", help="--variant planted: the testbed to start from (default: the cached one)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args()

    if args.variant == "planted":
        if args.base is None:
            build_or_reuse(None, seed=args.seed, metric=args.metric, progress=not args.no_progress)
        base = Path(args.base) if args.base else default_testbed_dir(args.seed)
        out = Path(args.output_dir) if args.output_dir else planted_dir(base)
        if out.exists() and any(out.iterdir()) and not (out / "testbed_card.json").is_file():
            raise MemtrainError(f"output dir '{out}' exists and is not a planted testbed: choose another")
        card = build_planted(base, out, PlantedConfig(seed=args.seed), metric=args.metric,
                             progress=not args.no_progress, overwrite=args.overwrite)
        print(f"planted testbed at {out}")
        print(card_summary(card))
        return
    spec = None
    if args.duplicate_spec:
        try:
            spec = json.loads(args.duplicate_spec)
        except json.JSONDecodeError:
            raise MemtrainError(f"--duplicate_spec is not valid JSON: {args.duplicate_spec!r}") from None
    card, message = build_or_reuse(args.output_dir, seed=args.seed, data_dir=args.data_dir, duplicate_spec=spec,
                                   metric=args.metric, allow_standin=args.allow_standin, overwrite=args.overwrite,
                                   progress=not args.no_progress, device=args.device)
    print(message)
    print(card_summary(card))


if __name__ == "__main__":
    main()
