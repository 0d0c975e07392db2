"""`python -m memtrain` and `accelerate launch -m memtrain`: the `memtrain` command."""

from memtrain.commands import main

if __name__ == "__main__":
    main()
