"""Triage a release: which prompts replicate their training image on a model?

    accelerate launch scripts/triage.py RELEASE --model /path/to/sd-v1-4 --output_dir OUT

The same as `memtrain triage ...`; `memtrain triage --help` lists every flag with its default.
"""

from memtrain.commands import script

main = script("triage")

if __name__ == "__main__":
    main()
