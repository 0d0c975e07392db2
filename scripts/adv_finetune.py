"""Adversarial fine-tuning against memorization (paper 004 Sec. 4.4, Alg. 2).

    accelerate launch scripts/adv_finetune.py recipes/testbed.yaml train.epochs=1

The same as `memtrain finetune ...`; `memtrain finetune --help` lists every flag with its default.
"""

from memtrain.commands import script

main = script("finetune")

if __name__ == "__main__":
    main()
