"""What every `memtrain` subcommand is: a config dataclass (shared option groups plus its own
fields), a `run(config, line) -> result` that returns a typed result, and a one-paragraph
summary of that result for the console. `Command.main` is the same for all of them: parse,
check the values, check the files, run, show."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from memtrain.core.command_line import CommandLine, Positional, command_parser, parse_command_line
from memtrain.core.registry import Registry
from memtrain.core.report import CommandResult
from memtrain.core.run import is_main_process


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, config class, positionals, run and summary."""

    name: str
    description: str
    config: type
    run: Callable[[Any, CommandLine], Any]
    show: Callable[[Any], str | None]
    positionals: Sequence[Positional] = ()
    recipe: str = "optional"  # optional | required | none: the RECIPE.yaml positional
    skip: Sequence[str] = ()  # config fields that are not flags (set from positionals only)
    overrides_to: str | None = None  # a list field the bare key=value go to (another config's keys), unapplied

    def parser(self):
        """Its argparse parser (flags derived from the config; defaults in the help)."""
        return command_parser(f"memtrain {self.name}", self.description, self.config, self.positionals,
                              self.recipe, self.skip)

    def main(self, argv: Sequence[str] | None = None) -> Any:
        """Parse argv, check the config (values, then files), run it, print its summary."""
        line = parse_command_line(self.parser(), argv, self.positionals, self.recipe)
        if self.overrides_to is not None:
            line.values[self.overrides_to], line.overrides = list(line.overrides), []
        config = line.config(self.config)  # values only: a bad one fails before anything is read
        check_files = getattr(config, "check_files", None)
        if check_files is not None:
            check_files()
        result = self.run(config, line)
        text = self.show(result)
        if text and is_main_process():
            print(text)
        return result


def result_of(doc: dict, plan: bool) -> CommandResult:
    """A library run's document as a typed result: under --plan the document is the memory plan."""
    return CommandResult({}, plan=doc) if plan else CommandResult(doc, doc["output_dir"])


@dataclass(frozen=True)
class Dispatcher:
    """A command made of subcommands (`memtrain COMMAND`, `memtrain bench BENCHMARK`): the next
    word picks an entry of `registry` (lazy entries import only when picked), the rest is its."""

    name: str
    description: str
    registry: Registry
    summaries: dict[str, str]  # one line per entry, for the listing (no import needed)
    footer: str = ""

    def usage(self) -> str:
        width = max(map(len, self.summaries))
        kind = self.registry.kind.upper()
        lines = [f"usage: {self.name} {kind} [ARGS ...]   ({self.name} {kind} --help: its flags and defaults)", "",
                 self.description, "", f"{self.registry.kind}s:"]
        lines += [f"  {name:<{width}}  {summary}" for name, summary in self.summaries.items()]
        return "\n".join(lines + ([f"\n{self.footer}"] if self.footer else []))

    def main(self, argv: Sequence[str] | None = None) -> Any:
        """Run the entry the first word names with the rest; no word or --help: the listing."""
        argv = list(sys.argv[1:] if argv is None else argv)
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(self.usage())
            return None
        return self.registry[argv[0]].main(argv[1:])
