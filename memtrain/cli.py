"""Shared command-line plumbing: user errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import functools
import logging
import os
import sys


def cpu_threads_for_single_process() -> int | None:
    """Threads for a lone CPU process started by `accelerate launch`, or None to leave torch as is.

    `accelerate launch` without --cpu sets OMP_NUM_THREADS=1 for every process, which halves a
    single CPU run on 2 cores. MEMTRAIN_NUM_THREADS, when set, always wins."""
    explicit = os.environ.get("MEMTRAIN_NUM_THREADS")
    if explicit:
        return max(1, int(explicit))
    launched_by_accelerate = any(k.startswith("ACCELERATE_") for k in os.environ)
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    import torch

    if launched_by_accelerate and single and not torch.cuda.is_available() and os.environ.get("OMP_NUM_THREADS") == "1":
        return os.cpu_count() or 1
    return None


def run_main(main):
    """Call main(); MemtrainError (and the metric/manifest errors derived from it) -> exit 2."""
    from memtrain.errors import MemtrainError

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        for noisy in ("httpx", "urllib3", "diffusers", "transformers", "accelerate"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        threads = cpu_threads_for_single_process()
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        try:
            return main(*args, **kwargs)
        except MemtrainError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper
