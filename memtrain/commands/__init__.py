"""The `memtrain` command: one entry point, one subcommand per task.

    memtrain audit --mitigation none nemo          # or: accelerate launch -m memtrain audit ...
    memtrain finetune recipes/testbed.yaml train.epochs=1

Subcommands are looked up by name and imported only when run (lazy: `memtrain --help` loads no
model code). This package is the top layer: it may import every library layer below it.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from memtrain.commands.base import Dispatcher
from memtrain.core.cli import run_main
from memtrain.core.registry import Registry

# Lazy entries: a command's module (and its model code) loads only when that command runs.
COMMANDS = Registry("command", canonical=str)
SUMMARIES: dict[str, str] = {}
for _name, _where, _summary in (
    ("audit", "audit:COMMAND", "does each mitigation remove memorized images or only hide them?"),
    ("evaluate", "evaluate:COMMAND", "how much does a model replicate its training images (MR, SSCD)?"),
    ("triage", "triage:COMMAND", "which prompts of a release replicate on a model?"),
    ("detect", "detect:COMMAND", "how well do the papers' detectors find memorized prompts?"),
    ("analyze", "analyze:COMMAND", "mechanism analyses with plots (guidance, locality, ...)"),
    ("finetune", "finetune:COMMAND", "adversarial fine-tuning that removes memorized images"),
    ("removal", "removal:COMMAND", "paper 004's removal table: each method trained, then audited under Dori"),
    ("remove", "remove:COMMAND", "a removal baseline as a training: esd, concept_ablation or siss"),
    ("build-testbed", "build:BUILD_TESTBED", "build (or reuse) the small memorizing testbed"),
    ("build-fixture", "build:BUILD_FIXTURE", "a random-weight pipeline with a published SD config"),
    ("fetch", "fetch:COMMAND", "download the training images behind a manifest or release"),
    ("bench", "bench:BENCH", "speed and memory benchmarks (attack, sampling, ...)"),
):
    COMMANDS.lazy(_name, f"memtrain.commands.{_where}")
    SUMMARIES[_name] = _summary

MEMTRAIN = Dispatcher("memtrain", "Audit and remove memorized training images in text-to-image diffusion models.",
                      COMMANDS, SUMMARIES, footer="Under several processes: accelerate launch -m memtrain COMMAND ...")


def usage() -> str:
    """`memtrain --help`."""
    return MEMTRAIN.usage()


def command(name: str):
    """The command registered as `name` (its module is imported now)."""
    return COMMANDS[name]


@run_main
def main(argv: Sequence[str] | None = None) -> None:
    """`memtrain COMMAND ...`: run one subcommand (a refused input: one line, exit 2)."""
    MEMTRAIN.main(argv)


def script(*words: str) -> Callable[[Sequence[str] | None], None]:
    """The `main(argv=None)` of scripts/<name>.py: `memtrain <words> ...` with the script's arguments."""
    def script_main(argv: Sequence[str] | None = None) -> None:
        main([*words, *(sys.argv[1:] if argv is None else argv)])
    return script_main


def standalone(cmd) -> Callable[[Sequence[str] | None], Any]:
    """The `main` of a script that runs one Command outside the `memtrain` table
    (scripts/gpu_check.py): the same one-line errors and exit status 2."""
    return run_main(cmd.main)
