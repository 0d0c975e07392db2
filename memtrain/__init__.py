"""memtrain: find out whether a diffusion model still holds memorized images, and remove them."""

__version__ = "0.1.0"
