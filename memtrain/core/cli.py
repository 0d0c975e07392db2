"""Shared command-line plumbing: user errors become one line on stderr and a non-zero exit, and
config fields carry their flag's help (`option`, `section`); memtrain.core.command_line derives
the flags from them, never copied by hand."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
from typing import Any

import torch

from memtrain.core.errors import MemtrainError, collective_timeout_message


def cpu_threads_for_single_process() -> int | None:
    """Threads for a lone CPU process started by `accelerate launch`, or None to leave torch as is.

    `accelerate launch` without --cpu sets OMP_NUM_THREADS=1 for every process, which halves a
    single CPU run on 2 cores. MEMTRAIN_NUM_THREADS, when set, always wins."""
    explicit = os.environ.get("MEMTRAIN_NUM_THREADS")
    if explicit:
        return max(1, int(explicit))
    launched_by_accelerate = any(k.startswith("ACCELERATE_") for k in os.environ)
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if launched_by_accelerate and single and not torch.cuda.is_available() and os.environ.get("OMP_NUM_THREADS") == "1":
        return os.cpu_count() or 1
    return None


def run_main(main):
    """Call main(); MemtrainError (and the metric/manifest errors derived from it) -> exit 2."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        for noisy in ("httpx", "urllib3", "diffusers", "transformers", "accelerate"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        threads = cpu_threads_for_single_process()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            return main(*args, **kwargs)
        except MemtrainError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except RuntimeError as err:  # torch.distributed's DistBackendError is one
            message = collective_timeout_message(err)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper


# ----------------------------------------------------------------------------- config fields that are flags


def chain_post_init(instance: Any, cls: type) -> None:
    """Run the next __post_init__ after `cls`'s in the instance's MRO: option groups combined by
    inheritance (memtrain.core.options) each check their own fields, cooperatively."""
    parent = getattr(super(cls, instance), "__post_init__", None)
    if parent is not None:
        parent()


def option(default: Any = dataclasses.MISSING, help: str = "", *flags: str) -> Any:
    """A config dataclass field that is also a command-line flag: its help text and any extra
    spellings (`option(None, "targets", "--manifest")`) for add_dataclass_arguments."""
    return dataclasses.field(default=default, metadata={"help": help, "flags": flags})


def section(cls: type, help: str = "", flat: bool = False) -> Any:
    """A nested settings group of a config: flags `--name.field`, recipe keys `name: {field: ...}`;
    `flat` also accepts its fields' own spellings (`--scheduler` for `--sampler.scheduler`)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "flat": flat})
