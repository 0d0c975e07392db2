"""Shared command-line plumbing: user errors become one line on stderr and a non-zero exit, and
flags are derived from the config dataclass they fill, never copied by hand."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import sys
import types
import typing
from typing import Any, Callable, Literal, Sequence

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


# ----------------------------------------------------------------------------- flags from dataclasses


def _flag_type(tp) -> tuple[Any, dict]:
    """(argparse type, extra kwargs) for one annotation: Optional[X] -> X, Literal -> choices."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and args:
        if len(args) > 1:  # e.g. float | str: hand argparse the string, the dataclass checks it
            return str, {}
        tp = args[0]
    if typing.get_origin(tp) is Literal:
        return type(typing.get_args(tp)[0]), {"choices": list(typing.get_args(tp))}
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], {"nargs": "+"}
    return tp, {}


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip: Sequence[str] = ()) -> None:
    """One flag per init field of `cls` (`--name`, help from field metadata["help"], extra
    spellings from metadata["flags"]); a nested dataclass field adds its own fields' flags."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            add_dataclass_arguments(parser, tp, skip)
            continue
        names = [f"--{f.name}", *f.metadata.get("flags", ())]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        help_text = f.metadata.get("help")
        if tp is bool:  # a flag flips the default: --name for False defaults, --no_name for True ones
            flip = f.default is True
            parser.add_argument(f"--no_{f.name}" if flip else names[0], *names[1:], dest=f.name,
                                action="store_false" if flip else "store_true", help=help_text)
            continue
        arg_type, extra = _flag_type(tp)
        parser.add_argument(*names, dest=f.name, type=arg_type, required=required,
                            default=None if required else dataclasses.MISSING, help=help_text, **extra)


def dataclass_from_namespace(cls, values: dict):
    """The `cls` instance the flags of add_dataclass_arguments describe (defaults where absent)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = dataclass_from_namespace(hints[f.name], values)
        elif values.get(f.name, dataclasses.MISSING) is not dataclasses.MISSING:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def config_from_cli(cls, doc: str | None, argv: Sequence[str] | None = None, extra: Callable | None = None):
    """Parse argv into `cls` (and, with `extra(parser)` adding flags of its own, also return the
    namespace): the whole argument parsing of a script whose flags mirror a config dataclass."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=dataclasses.MISSING)
    add_dataclass_arguments(parser, cls)
    if extra is not None:
        extra(parser)
    namespace = vars(parser.parse_args(argv))
    config = dataclass_from_namespace(cls, namespace)
    if extra is None:
        return config
    return config, {k: None if v is dataclasses.MISSING else v for k, v in namespace.items()}


def option(default: Any = dataclasses.MISSING, help: str = "", *flags: str) -> Any:
    """A config dataclass field that is also a command-line flag: its help text and any extra
    spellings (`option(None, "targets", "--manifest")`) for add_dataclass_arguments."""
    return dataclasses.field(default=default, metadata={"help": help, "flags": flags})


def section(cls: type, help: str = "", flat: bool = False) -> Any:
    """A nested settings group of a config: flags `--name.field`, recipe keys `name: {field: ...}`;
    `flat` also accepts its fields' own spellings (`--scheduler` for `--sampler.scheduler`)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "flat": flat})
