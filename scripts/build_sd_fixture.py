"""Build a random-weight pipeline with a published Stable Diffusion config (offline).

    python scripts/build_sd_fixture.py sd14 OUT [--resolution 256] [--seed 0] [--overwrite] [--photos DIR]

Variants: sd14, sd15 (CLIP ViT-L/14 text tower), sd21-base, sd21 (OpenCLIP ViT-H/14, `!`
padding; sd21 predicts v at 768 px). Real shapes, memory and speed, random weights: use it to
try every command at full size where no checkpoint can be downloaded. --resolution changes only
the default image size (256 keeps CPU runs short); weights are the published shapes.
--photos DIR also writes LAION-like manifests (DIR/memorized.jsonl, DIR/held_out.jsonl) from
scikit-image's photos in mixed sizes, modes and formats.
"""

import argparse

from memtrain.core.cli import run_main
from memtrain.core.files import check_output_dir
from memtrain.testbed.full_size import VARIANTS, build_random_sd
from memtrain.testbed.photos import write_photo_manifests


@run_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("output_dir")
    parser.add_argument("--resolution", type=int, default=None, help="default image size (multiple of 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--photos", default=None, help="also write LAION-like manifests into this folder")
    args = parser.parse_args()
    if args.photos:  # refuse a taken folder before minutes of building
        check_output_dir(args.photos, args.overwrite)
    out = build_random_sd(args.variant, args.output_dir, args.resolution, args.seed, args.overwrite)
    print(f"wrote {out} (random-weight {args.variant})")
    if args.photos:
        print(f"wrote {write_photo_manifests(args.photos, args.overwrite)} (memorized.jsonl, held_out.jsonl)")


if __name__ == "__main__":
    main()
