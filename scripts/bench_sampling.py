"""Images per second of plain CFG sampling, batched vs one prompt at a time, in one run
(last line `speedup: X.XX`).

    python scripts/bench_sampling.py [--model DIR] [--prompts 16] [--seeds 1] [--batch 16]

The same as `memtrain bench sampling ...`; `memtrain bench sampling --help` lists every flag with its default.
"""

from memtrain.commands import script

main = script("bench", "sampling")

if __name__ == "__main__":
    main()
