"""Speed and memory at full size in one run: generation against diffusers' pipeline (`ratio:`),
the attack's targets/s and TFLOP/s against a large matmul, fine-tuning s/image and peak memory.

    python scripts/bench_full_size.py --model fixtures/sd14-256 --manifest fixtures/photos/memorized.jsonl \\
        [--finetune_steps 2] [key=value ...]   # key=value: the fine-tuning recipe's keys

The same as `memtrain bench full-size ...`; `memtrain bench full-size --help` lists every flag with its default.
"""

from memtrain.commands import script

main = script("bench", "full-size")

if __name__ == "__main__":
    main()
