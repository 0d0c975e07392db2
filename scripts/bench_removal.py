#!/usr/bin/env python
"""Removal trainings' speed and memory: ESD, Concept Ablation and SISS, s/step, preparation per
image and peak memory, and a removal table recipe's whole budget projected from them.

    python scripts/bench_removal.py --model fixtures/sd14-256 --manifest fixtures/photos/memorized.jsonl
    python scripts/bench_removal.py --table_recipe recipes/removal_testbed.yaml     # the testbed

The same as `memtrain bench removal ...`; `memtrain bench removal --help` lists every flag with its default.
"""

from memtrain.commands import script

main = script("bench", "removal")

if __name__ == "__main__":
    main()
