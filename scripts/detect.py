"""Detection benchmark: the papers' memorization detectors on memorized vs other prompts.

    python scripts/detect.py --max_prompts 10

The same as `memtrain detect ...`; `memtrain detect --help` lists every flag with its default.
"""

from memtrain.commands import script

main = script("detect")

if __name__ == "__main__":
    main()
