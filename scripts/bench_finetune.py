#!/usr/bin/env python
"""Adversarial fine-tuning speed: concatenated forward vs two forwards, and the trainer's speedups.

    OMP_NUM_THREADS=1 python scripts/bench_finetune.py recipes/testbed.yaml output_dir=/tmp/bench_ft

The same as `memtrain bench finetune ...`; `memtrain bench finetune --help` lists every flag with its default.
"""

from memtrain.commands import script

main = script("bench", "finetune")

if __name__ == "__main__":
    main()
