"""Audit memorization mitigations (paper 004's Table 1): each mitigation on the memorized prompts,
under the Dori attack, and the false-positive control.

    accelerate launch scripts/audit.py --mitigation none nemo wanda pad_eot pad_mask

The same as `memtrain audit ...`; `memtrain audit --help` lists every flag with its default.
"""

from memtrain.commands import script

main = script("audit")

if __name__ == "__main__":
    main()
