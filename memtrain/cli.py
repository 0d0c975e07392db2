"""Shared command-line plumbing: user errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import functools
import logging
import sys


def run_main(main):
    """Call main(); MemtrainError (and the metric/manifest errors derived from it) -> exit 2."""
    from memtrain.errors import MemtrainError

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        for noisy in ("httpx", "urllib3", "diffusers", "transformers", "accelerate"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        try:
            return main(*args, **kwargs)
        except MemtrainError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper
