"""Overhead of each inference-time mitigation over plain sampling, measured in one run (last
line `max_overhead: X.XXX`).

    python scripts/bench_mitigations.py [--model DIR] [--prompts 8] [--seeds 2] [--repeats 3]

The same as `memtrain bench mitigations ...`; `memtrain bench mitigations --help` lists every flag with its default.
"""

from memtrain.commands import script

main = script("bench", "mitigations")

if __name__ == "__main__":
    main()
