"""The embedded memorizing testbed (top layer): data, tiny CLIP, U-Net training, the build and its
card, the reference model. The core loader finds its pixel codec by name (a lazy entry of
memtrain.core.bundle.CODECS), so a testbed folder loads without importing this package;
commands reach the testbed only through `memtrain.testbed.resolver`."""
