"""The embedded memorizing testbed (top layer): data, tiny CLIP, U-Net training, the build and its
card, the reference model. Importing the package registers its pixel codec with the core loader;
commands reach the testbed only through `memtrain.testbed.resolver`."""

from memtrain.testbed import codec  # noqa: F401  (registers PixelShuffleCodec)
