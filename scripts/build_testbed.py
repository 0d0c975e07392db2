"""Build (or reuse) the memorizing testbed and print its memorization card.

    python scripts/build_testbed.py [--output_dir OUT] [--seed N] [--data_dir DIR]
    python scripts/build_testbed.py --variant planted [--base TESTBED] [--output_dir OUT]
"""

import argparse
import json

from memtrain.core.cli import run_main
from memtrain.core.errors import MemtrainError
from memtrain.testbed.build import build_or_reuse, card_summary
from memtrain.testbed.planted import planted_variant


@run_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", help="build here (default: the cache, reused when already built)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", help="imagefolder with metadata.jsonl (file_name, text, optional duplicate)")
    parser.add_argument("--duplicate_spec", help='JSON {"id": K, ...} setting duplication by pair id')
    parser.add_argument("--metric", default=None, help="SSCD backend: onnx (default), a TorchScript path, or standin")
    parser.add_argument("--allow_standin", action="store_true", help="permit the named stand-in descriptor")
    parser.add_argument("--device", default="cpu", help="train and measure here, e.g. cuda (default cpu: the README's)")
    parser.add_argument("--variant", choices=["default", "planted"], default="default",
                        help="planted: memorization gated by recorded value neurons (memtrain/testbed/planted.py)")
    parser.add_argument("--base", help="--variant planted: the testbed to start from (default: the cached one)")
    for flag in ("--overwrite", "--no_progress"):
        parser.add_argument(flag, action="store_true")
    args = parser.parse_args()
    if args.variant == "planted":
        card, out = planted_variant(args.base, args.output_dir, args.seed, args.metric, not args.no_progress, args.overwrite)
        print(f"planted testbed at {out}\n{card_summary(card)}")
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
    print(f"{message}\n{card_summary(card)}")


if __name__ == "__main__":
    main()
