"""The `memtrain` command: one entry point, one subcommand per task.

    memtrain audit --mitigation none nemo          # or: accelerate launch -m memtrain audit ...
    memtrain finetune recipes/testbed.yaml train.epochs=1

Subcommands are looked up by name and imported only when run (lazy: `memtrain --help` loads no
model code). This package is the top layer: it may import every library layer below it.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Sequence

from memtrain.core.cli import run_main

# name -> (module holding its COMMAND, one line for `memtrain --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "audit": ("memtrain.commands.audit", "does each mitigation remove memorized images or only hide them?"),
    "evaluate": ("memtrain.commands.evaluate", "how much does a model replicate its training images (MR, SSCD)?"),
    "triage": ("memtrain.commands.triage", "which prompts of a release replicate on a model?"),
    "detect": ("memtrain.commands.detect", "how well do the papers' detectors find memorized prompts?"),
    "analyze": ("memtrain.commands.analyze", "mechanism analyses with plots (guidance, locality, ...)"),
    "finetune": ("memtrain.commands.finetune", "adversarial fine-tuning that removes memorized images"),
    "build-testbed": ("memtrain.commands.build", "build (or reuse) the small memorizing testbed"),
    "build-fixture": ("memtrain.commands.build", "a random-weight pipeline with a published SD config"),
    "fetch": ("memtrain.commands.fetch", "download the training images behind a manifest or release"),
    "bench": ("memtrain.commands.bench", "speed and memory benchmarks (attack, sampling, ...)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: memtrain COMMAND [ARGS ...]   (memtrain COMMAND --help: its flags and defaults)", "",
             "Audit and remove memorized training images in text-to-image diffusion models.", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "Under several processes: accelerate launch -m memtrain COMMAND ..."]
    return "\n".join(lines)


def command(name: str):
    """The Command registered as `name` (its module is imported now)."""
    module = importlib.import_module(COMMANDS[name][0])
    return getattr(module, "COMMANDS", {}).get(name) or module.COMMAND


@run_main
def main(argv: Sequence[str] | None = None) -> None:
    """`memtrain COMMAND ...`: run one subcommand (a refused input: one line, exit 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if argv[0] not in COMMANDS:
        print(f"error: unknown command '{argv[0]}': choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    command(argv[0]).main(argv[1:])


def script(*words: str) -> Callable[[Sequence[str] | None], None]:
    """The `main(argv=None)` of scripts/<name>.py: `memtrain <words> ...` with the script's arguments."""
    def script_main(argv: Sequence[str] | None = None) -> None:
        main([*words, *(sys.argv[1:] if argv is None else argv)])
    return script_main


def standalone(cmd) -> Callable[[Sequence[str] | None], Any]:
    """The `main` of a script that runs one Command outside the `memtrain` table
    (scripts/gpu_check.py): the same one-line errors and exit status 2."""
    return run_main(cmd.main)
