"""Build (or reuse) the memorizing testbed and print its memorization card.

    python scripts/build_testbed.py [--output_dir OUT] [--seed N]

The same as `memtrain build-testbed ...`; `memtrain build-testbed --help` lists every flag with its default.
"""

from memtrain.commands import script

main = script("build-testbed")

if __name__ == "__main__":
    main()
