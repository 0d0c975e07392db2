"""Build a random-weight pipeline with a published Stable Diffusion config (offline).

    python scripts/build_sd_fixture.py sd14 OUT [--resolution 256] [--photos DIR]

The same as `memtrain build-fixture ...`; `memtrain build-fixture --help` lists every flag with its default.
"""

from memtrain.commands import script

main = script("build-fixture")

if __name__ == "__main__":
    main()
