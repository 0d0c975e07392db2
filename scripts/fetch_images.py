"""Download the training images behind a manifest's (or a public release's) URLs.

    python scripts/fetch_images.py MANIFEST --output_dir DIR

The same as `memtrain fetch ...`; `memtrain fetch --help` lists every flag with its default.
"""

from memtrain.commands import script

main = script("fetch")

if __name__ == "__main__":
    main()
