"""Evaluate memorization: generate per prompt and seed, score against the training images.

    accelerate launch scripts/evaluate.py --manifest M [--model DIR] [--seeds 10]

The same as `memtrain evaluate ...`; `memtrain evaluate --help` lists every flag with its default.
"""

from memtrain.commands import script

main = script("evaluate")

if __name__ == "__main__":
    main()
