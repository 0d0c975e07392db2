"""Run every command on random-weight full-size SD fixtures with the smallest budgets and check
what each wrote; wall time and peak memory per step go to WORK/smoke.json.

    python tools/smoke_full_size.py [--work runs/smoke] [--variants sd14 sd21-base] [--only audit ...] [--resolution 256]
        [--keep_checkpoints]

Fixtures are built once into WORK (4 GB each) and reused. `--resolution` sets the fixtures' image
size (multiple of 64): SD's weights and shapes at any size, CPU time shrinking with the pixels.
Fine-tuning checkpoints (~10 GB each at full size) are deleted once checked unless
`--keep_checkpoints`; plan on ~25 GB free besides. Exit 1 if any step failed.
"""

import argparse
import sys
from pathlib import Path

from memtrain.core.cli import run_main
from memtrain.testbed.full_size import VARIANTS
from smoke import run_smoke  # tools/smoke.py, beside this script (its folder is on sys.path when run)


@run_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/smoke")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["sd14", "sd21-base"])
    parser.add_argument("--resolution", type=int, default=256, help="fixture image size (multiple of 64)")
    parser.add_argument("--only", nargs="+", default=None, help="step names (evaluate, triage, audit, ...)")
    parser.add_argument("--keep_checkpoints", action="store_true", help="keep the fine-tuning checkpoints")
    args = parser.parse_args()
    results = run_smoke(Path(args.work), args.variants, set(args.only) if args.only else None, args.resolution,
                        args.keep_checkpoints)
    failed = [f"{r['variant']}/{r['step']}" for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} of {len(results)} steps passed" + (f"; failed: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
