"""One removal baseline of paper 004 as a training (ESD, Concept Ablation or SISS).

    accelerate launch scripts/remove.py RECIPE.yaml method=esd

The same as `memtrain remove ...`; `memtrain remove --help` lists every flag with its default.
"""

from memtrain.commands import script

main = script("remove")

if __name__ == "__main__":
    main()
