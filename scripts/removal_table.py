"""Paper 004's Tables 3 and 5: removal methods trained and audited under the same attacker.

    accelerate launch scripts/removal_table.py recipes/removal_testbed.yaml [key=value ...]

The same as `memtrain removal ...`; `memtrain removal --help` lists every flag with its default.
"""

from memtrain.commands import script

main = script("removal")

if __name__ == "__main__":
    main()
