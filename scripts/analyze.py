"""Mechanism analyses with plots (guidance, overestimation, locality, interventions).

    python scripts/analyze.py guidance overestimation

The same as `memtrain analyze ...`; `memtrain analyze --help` lists every flag with its default.
"""

from memtrain.commands import script

main = script("analyze")

if __name__ == "__main__":
    main()
