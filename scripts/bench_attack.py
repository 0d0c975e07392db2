"""Targets per second of the Dori attack, batched vs one target at a time, in one run, and
the attack step's achieved FLOP/s against a 2048x2048 fp32 matmul (last line `speedup: X.XX`).

    python scripts/bench_attack.py [--model DIR] [--targets 10] [--steps 50] [--noise_samples 8]

The same as `memtrain bench attack ...`; `memtrain bench attack --help` lists every flag with its default.
"""

from memtrain.commands import script

main = script("bench", "attack")

if __name__ == "__main__":
    main()
